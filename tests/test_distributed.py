"""Data-parallel training over MPI: gradcore.distributed and fit(..., comm=).

The multi-rank tests start ``mpiexec`` (the one that ``pip install mpich`` puts next to
the interpreter, or any on the PATH) on tests/mpi_train_script.py over loopback, and
compare every rank's final parameters with one process trained in this process on the
same global batches (``fit`` without ``comm``). They skip when mpi4py or mpiexec is
missing.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gradcore
from gradcore import distributed, nn, optim
from gradcore.distributed import Communicator, _shard
from gradcore.train import fit, load

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "mpi_train_script.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("mpi_train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_mpiexec() -> str | None:
    here = Path(sys.executable)
    for folder in (here.parent, here.resolve().parent, Path(sys.base_prefix) / "bin"):
        candidate = folder / "mpiexec"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("mpiexec")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    env.pop("GRADCORE_MPI", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["GRADCORE_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def mpiexec() -> str:
    pytest.importorskip("mpi4py")
    found = _find_mpiexec()
    if found is None:
        pytest.skip("no mpiexec (pip install mpich)")
    return found


def _run(mpiexec: str, ranks: int, args: list[str], timeout: float = 240):
    return subprocess.run(
        [mpiexec, "-n", str(ranks), sys.executable, str(SCRIPT), *args],
        env=_env(),
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the communicator without MPI -----------------------------------------------------------


def test_import_gradcore_does_not_import_mpi4py():
    code = (
        "import sys, gradcore, gradcore.train, gradcore.distributed as d\n"
        "c = d.init()\n"
        "assert c.size == 1 and c.rank == 0, c\n"
        "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n"
    )
    env = _env()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), check=True, timeout=120)


def test_single_process_communicator_is_a_no_op():
    comm = Communicator()
    a, b = np.arange(3.0), np.ones((2, 2), dtype=np.float32)
    out = comm.allreduce_([a, b])
    assert out[0] is a
    assert out[1] is b
    np.testing.assert_array_equal(a, [0.0, 1.0, 2.0])
    assert comm.broadcast_([a])[0] is a
    comm.barrier()
    with pytest.raises(ValueError, match="root"):
        comm.broadcast_([a], root=1)


def test_init_is_single_process_outside_mpiexec(monkeypatch):
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setenv("GRADCORE_MPI", "0")
    comm = distributed.init()
    assert (comm.rank, comm.size, comm.local_rank) == (0, 1, 0)
    assert distributed.init() is comm


class _FakeWorld:
    """``size`` ranks holding identical arrays: a sum is ``size`` times each array."""

    def __init__(self, size):
        self.size = size
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def Split_type(self, kind, key=0):
        return _FakeWorld(1)

    def Free(self):
        pass

    def Allreduce(self, inplace, buf, op):
        self.calls.append(("allreduce", buf.dtype, buf.size))
        buf *= self.size

    def Bcast(self, buf, root):
        self.calls.append(("bcast", buf.dtype, buf.size))
        buf[...] = 7


class _FakeMPI:
    IN_PLACE = SUM = COMM_TYPE_SHARED = None


def test_host_arrays_travel_in_one_flat_buffer(monkeypatch):
    monkeypatch.setattr(distributed, "_mpi", lambda: _FakeMPI)
    world = _FakeWorld(3)
    comm = Communicator(world)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    frozen = np.ones(4, dtype=np.float32)
    frozen.flags.writeable = False
    out = comm.allreduce_([a, b, frozen])
    assert world.calls == [("allreduce", np.dtype(np.float32), 16)]
    assert out[0] is a
    assert out[1] is b
    np.testing.assert_array_equal(a, 3 * np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(b, 3 * np.arange(6).reshape(3, 2))
    assert out[2] is not frozen
    np.testing.assert_array_equal(frozen, 1)  # read-only input left alone
    np.testing.assert_array_equal(out[2], 3)
    # Mixed dtypes share one buffer of the wider type; results keep their own dtype.
    c, d = np.ones(2, dtype=np.float32), np.ones(3, dtype=np.float64)
    comm.allreduce_([c, d])
    assert world.calls[-1] == ("allreduce", np.dtype(np.float64), 5)
    assert c.dtype == np.float32
    np.testing.assert_array_equal(c, 3)
    comm.broadcast_([c])
    assert world.calls[-1] == ("bcast", np.dtype(np.float32), 2)
    np.testing.assert_array_equal(c, 7)
    with pytest.raises(TypeError, match="real numeric"):
        comm.allreduce_([np.ones(2, dtype=bool)])
    with pytest.raises(TypeError, match="must be an array"):
        comm.allreduce_([[1.0, 2.0]])


def test_torch_and_jax_arrays_go_through_host_copies(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(distributed, "_mpi", lambda: _FakeMPI)
    comm = Communicator(_FakeWorld(2))
    t = torch.arange(4, dtype=torch.float32)
    assert comm.allreduce_([t])[0] is t  # written in place
    np.testing.assert_array_equal(t.numpy(), [0, 2, 4, 6])
    jnp = pytest.importorskip("jax.numpy")
    j = jnp.arange(3.0)
    out = comm.allreduce_([j])[0]
    np.testing.assert_array_equal(np.asarray(out), [0, 2, 4])
    np.testing.assert_array_equal(np.asarray(j), [0, 1, 2])  # JAX arrays are immutable


@pytest.mark.parametrize(("rows", "size"), [(10, 3), (32, 2), (1, 3), (0, 2), (7, 7), (100, 8)])
def test_shards_cover_a_batch_once_and_balanced(rows, size):
    parts = [_shard(5, 5 + rows, r, size) for r in range(size)]
    assert parts[0][0] == 5
    assert parts[-1][1] == 5 + rows
    for (_, hi), (lo, _) in itertools.pairwise(parts):
        assert hi == lo
    counts = [hi - lo for lo, hi in parts]
    assert max(counts) - min(counts) <= 1


def test_fit_with_a_size_one_communicator_is_plain_fit():
    # comm of size 1 must change nothing, bit for bit.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.integers(0, 3, size=50)
    results = []
    for comm in (None, Communicator()):
        model = nn.MLP([3, 6, 3], seed=0, dtype="float64")
        fit(model, X, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=8,
            progress=False, comm=comm)  # fmt: skip
        results.append(model.state_dict())
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])


def test_fit_accepts_ignored_labels_and_class_weights():
    # Independent reference: one SGD step on the full batch, from the formulas in float64.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 3))
    y = rng.integers(0, 3, size=12)
    y[::4] = -1
    w = np.array([1.0, 3.0, 0.5])
    model = nn.MLP([3, 3], seed=2, dtype="float64")
    W0 = np.array(model.state_dict()["0.W"], copy=True)
    b0 = np.array(model.state_dict()["0.b"], copy=True)
    fit(model, X, y, loss="cross_entropy", optimizer=optim.SGD(lr=0.5), epochs=1,
        batch_size=12, progress=False, loss_kwargs={"ignore_index": -1, "weight": w})  # fmt: skip
    logits = X @ W0 + b0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    keep = y != -1
    onehot = np.eye(3)[np.where(keep, y, 0)]
    wy = np.where(keep, w[np.where(keep, y, 0)], 0.0)
    g = wy[:, None] * (p - onehot) / wy.sum()
    np.testing.assert_allclose(model.state_dict()["0.W"], W0 - 0.5 * X.T @ g, atol=1e-12)
    np.testing.assert_allclose(model.state_dict()["0.b"], b0 - 0.5 * g.sum(0), atol=1e-12)


def test_loss_kwargs_reject_what_fit_controls():
    model = nn.MLP([2, 2], seed=0)
    X, y = np.zeros((4, 2)), np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="reduction"):
        fit(model, X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=2,
            progress=False, loss_kwargs={"reduction": "sum"})  # fmt: skip


# --- many ranks ------------------------------------------------------------------------------


def _compare(out: Path, ranks: int, case: str) -> None:
    script = _load_script()
    model, X, y, kwargs = script.make_problem(case)
    history = fit(model, X, y, progress=False, **kwargs)
    runs = [np.load(out / f"{case}-rank{r}.npz") for r in range(ranks)]
    tol = 1e-6 if "32" in case else 1e-12
    for name, value in model.state_dict().items():
        ref = gradcore.to_numpy(value)
        np.testing.assert_allclose(runs[0][f"param/{name}"], ref, rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_allclose(runs[0]["loss"], history.loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(runs[0]["step_loss"], history.step_loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(runs[0]["val_loss"], history.val_loss, rtol=tol, atol=tol)
    if "accuracy" in runs[0].files:
        np.testing.assert_allclose(runs[0]["accuracy"], history.accuracy)
        np.testing.assert_allclose(runs[0]["val_accuracy"], history.val_accuracy)
    # Every rank applied the same updates: identical bits, and an identical history.
    for other in runs[1:]:
        assert sorted(other.files) == sorted(runs[0].files)
        for key in runs[0].files:
            np.testing.assert_array_equal(other[key], runs[0][key], err_msg=key)


def test_two_ranks_train_like_one_process(mpiexec, tmp_path):
    cases = ["xent32", "xent64", "mse32", "mse64"]
    result = _run(mpiexec, 2, [str(tmp_path), *cases])
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "done.json").read_text())["size"] == 2
    for case in cases:
        _compare(tmp_path, 2, case)


def test_three_ranks_with_batches_that_do_not_divide(mpiexec, tmp_path):
    cases = ["odd_xent64", "odd_mse32"]
    result = _run(mpiexec, 3, [str(tmp_path), *cases])
    assert result.returncode == 0, result.stdout + result.stderr
    for case in cases:
        _compare(tmp_path, 3, case)


@pytest.mark.gpu
def test_two_ranks_on_two_gpus_through_nccl(mpiexec, tmp_path):
    cupy = pytest.importorskip("cupy")
    pytest.importorskip("cupy.cuda.nccl")
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices (NCCL refuses two ranks on one device)")
    result = _run(mpiexec, 2, [str(tmp_path), "gpu_xent32"])
    assert result.returncode == 0, result.stdout + result.stderr
    _compare(tmp_path, 2, "gpu_xent32")


def test_a_failing_rank_ends_the_job_quickly(mpiexec, tmp_path):
    start = time.monotonic()
    try:
        result = _run(mpiexec, 2, [str(tmp_path), "--fail-rank", "1"], timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank raised and the job hung for 30 s")
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 of 2" in result.stderr, result.stderr
    assert "bad data in this rank's shard" in result.stderr
    assert elapsed < 30


def test_bad_data_on_one_rank_ends_the_job(mpiexec, tmp_path):
    try:
        result = _run(mpiexec, 2, [str(tmp_path), "--bad-data"], timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("one rank's data check failed and the job hung for 30 s")
    assert result.returncode != 0
    assert "rank 1 of 2 failed in fit" in result.stderr, result.stderr
    assert "NaN" in result.stderr
    assert not list(tmp_path.glob("caught-*"))


def test_replicas_that_drift_apart_are_detected(mpiexec, tmp_path):
    result = _run(mpiexec, 2, [str(tmp_path), "--drift"], timeout=60)
    assert result.returncode != 0
    assert "after epoch 2 the parameters of rank(s) 1 differ from rank 0's" in result.stderr


def test_ranks_with_different_data_fail_alike(mpiexec, tmp_path):
    result = _run(mpiexec, 2, [str(tmp_path), "--mismatch"], timeout=60)
    assert result.returncode != 0
    assert "rank 1 has the number of training rows = 199 but rank 0 has 200" in result.stderr


def test_a_nan_loss_is_raised_on_every_rank_without_aborting(mpiexec, tmp_path):
    result = _run(mpiexec, 2, [str(tmp_path), "--diverge"], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    messages = [(tmp_path / f"caught-rank{r}").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "step" in messages[0]


def test_command_line_under_mpiexec(mpiexec, tmp_path):
    # The same run on 2 ranks and on 1 process: same final weights; rank 0 alone saved
    # the checkpoint, wrote the JSON and printed.
    common = ["train", "--dataset", "spirals", "--epochs", "3", "--dtype", "float64",
              "--no-progress"]  # fmt: skip
    multi = tmp_path / "multi"
    multi.mkdir()
    result = _run(
        mpiexec,
        2,
        [str(multi), "--cli", *common, "--save", str(multi / "m.npz"), "--json",
         str(multi / "m.json")],
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in multi.iterdir()) == ["m.json", "m.npz", "saved-by-rank0"]
    assert result.stdout.count("test accuracy:") == 1
    assert "data-parallel over 2 ranks" in result.stdout
    single = tmp_path / "single.npz"
    env = _env()
    subprocess.run(
        [sys.executable, "-m", "gradcore", *common, "--quiet", "--save", str(single)],
        env=env,
        cwd=str(ROOT),
        check=True,
        timeout=240,
        capture_output=True,
    )
    got, want = load(multi / "m.npz"), load(single)
    for name, value in want.params.items():
        np.testing.assert_allclose(got.params[name], value, rtol=1e-12, atol=1e-12)
    history = json.loads((multi / "m.json").read_text())["history"]
    assert len(history["loss"]) == 3


def test_command_line_error_on_every_rank_exits_nonzero(mpiexec, tmp_path):
    result = _run(
        mpiexec,
        2,
        [str(tmp_path), "--cli", "train", "--dataset", str(tmp_path / "missing.csv")],
        timeout=60,
    )
    assert result.returncode != 0
    assert "rank" in result.stderr
    assert "missing.csv" in result.stderr
