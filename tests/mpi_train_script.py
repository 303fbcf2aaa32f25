"""A small data-parallel training run, started by tests/test_distributed.py under mpiexec.

    mpiexec -n 2 python tests/mpi_train_script.py OUT_DIR CASE [CASE ...]
    mpiexec -n 2 python tests/mpi_train_script.py OUT_DIR --fail-rank 1
    mpiexec -n 2 python tests/mpi_train_script.py OUT_DIR --mismatch|--diverge|--bad-data|--drift
    mpiexec -n 2 python tests/mpi_train_script.py OUT_DIR --cli ARGS...

Each CASE (see ``CASES``) trains with ``fit(..., comm=init())`` and every rank writes its
final parameters and history to ``OUT_DIR/CASE-rank<r>.npz``; the test compares them with
one process training on the same global batches. ``make_problem`` is shared with the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

#: name -> (loss, dtype, rows, global batch)
CASES = {
    "xent32": ("cross_entropy", "float32", 200, 32),
    "xent64": ("cross_entropy", "float64", 200, 32),
    "mse32": ("mse", "float32", 200, 32),
    "mse64": ("mse", "float64", 200, 32),
    # 3 ranks: 10 rows do not divide by 3, and the last batch has 1 row (ranks left idle).
    "odd_xent64": ("cross_entropy", "float64", 61, 10),
    "odd_mse32": ("mse", "float32", 61, 10),
    # CuPy arrays, summed through NCCL: one GPU per rank.
    "gpu_xent32": ("cross_entropy", "float32", 200, 32),
}


def make_problem(case: str):
    """(model, X, y, fit keyword arguments) of ``case``; the same on every call."""
    from gradcore import nn, optim

    loss, dtype, rows, batch = CASES[case]
    rng = np.random.default_rng(7)
    X = rng.normal(size=(rows, 5))
    Xv = rng.normal(size=(23, 5))
    kwargs: dict = {"loss": loss, "epochs": 3, "batch_size": batch, "seed": 3}
    if loss == "cross_entropy":
        y = rng.integers(0, 4, size=rows)
        yv = rng.integers(0, 4, size=23)
        # Every third row unlabelled, and unequal class weights: the mean's divisor is
        # the sum of the labelled rows' weights, different on every rank's slice.
        y[::3] = -1
        kwargs["loss_kwargs"] = {"ignore_index": -1, "weight": np.array([1.0, 2.5, 0.5, 4.0])}
        kwargs["optimizer"] = optim.SGD(lr=0.2, momentum=0.9)
        model = nn.MLP([5, 8, 4], "tanh", seed=1, dtype=dtype)
    else:
        y = rng.normal(size=(rows, 2))
        yv = rng.normal(size=(23, 2))
        kwargs["optimizer"] = optim.Adam(lr=0.01)
        model = nn.MLP([5, 8, 2], "tanh", seed=1, dtype=dtype)
    kwargs["validation"] = (Xv, yv)
    if case.startswith("gpu_"):
        kwargs["backend"] = "cupy"
    return model, X, y, kwargs


def _train_case(comm, out: Path, case: str) -> None:
    from gradcore import to_numpy
    from gradcore.train import fit

    if case.startswith("gpu_"):
        import cupy

        cupy.cuda.Device(comm.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
    model, X, y, kwargs = make_problem(case)
    if comm.rank != 0:
        # The other ranks start from different weights: fit must broadcast rank 0's.
        model.load_state_dict({k: to_numpy(v) + 1.0 for k, v in model.state_dict().items()})
    history = fit(model, X, y, comm=comm, progress=False, **kwargs)
    arrays = {f"param/{k}": to_numpy(v) for k, v in model.state_dict().items()}
    arrays["loss"] = np.asarray(history.loss)
    arrays["step_loss"] = np.asarray(history.step_loss)
    arrays["val_loss"] = np.asarray(history.val_loss, dtype=float)
    if history.accuracy[0] is not None:
        arrays["accuracy"] = np.asarray(history.accuracy)
        arrays["val_accuracy"] = np.asarray(history.val_accuracy)
    np.savez(out / f"{case}-rank{comm.rank}.npz", **arrays)


def _fail(comm, rank: int) -> None:
    from gradcore import losses
    from gradcore.train import fit

    calls = {"n": 0}

    def loss(out, y, *, xp=None, **options):
        calls["n"] += 1
        if comm.rank == rank and calls["n"] == 3:
            raise RuntimeError("bad data in this rank's shard")
        return losses.mse(out, y, xp=xp, **options)

    model, X, y, kwargs = make_problem("mse64")
    kwargs["loss"] = loss
    fit(model, X, y, comm=comm, progress=False, **kwargs)


def _mismatch(comm) -> None:
    from gradcore.train import fit

    model, X, y, kwargs = make_problem("mse64")
    if comm.rank == 1:
        X, y = X[:-1], y[:-1]
    fit(model, X, y, comm=comm, progress=False, **kwargs)


def _bad_data(comm, out: Path) -> None:
    # Rank 1 alone has a NaN: it fails its data checks while rank 0 goes on to train.
    from gradcore.train import fit

    model, X, y, kwargs = make_problem("mse64")
    if comm.rank == 1:
        X[5, 0] = np.nan
    try:
        fit(model, X, y, comm=comm, progress=False, **kwargs)
    except ValueError:
        # Too late: the job is ended before a rank could carry on alone.
        (out / f"caught-rank{comm.rank}").write_text("", encoding="utf-8")


def _drift(comm) -> None:
    # A callback that touches rank 1's model alone: the replicas differ from then on.
    from gradcore.train import fit

    model, X, y, kwargs = make_problem("mse64")

    def nudge(epoch, history):
        if comm.rank == 1 and epoch == 1:
            w = model.state_dict()["0.W"]
            w[0, 0] = np.nextafter(w[0, 0], np.inf)

    fit(model, X, y, comm=comm, progress=False, callback=nudge, **kwargs)


def _diverge(comm, out: Path) -> None:
    # The loss becomes NaN on every rank at the same step (it is reduced): every rank
    # raises NonFiniteLossError, which the script may catch; nothing is aborted.
    from gradcore import nn, optim
    from gradcore.train import NonFiniteLossError, fit

    _, X, y, kwargs = make_problem("mse64")
    model = nn.MLP([5, 2], seed=1, dtype="float64")  # linear: nothing saturates
    kwargs["optimizer"] = optim.SGD(lr=1e3)
    kwargs["epochs"] = 30  # enough steps to overflow
    try:
        fit(model, X, y, comm=comm, progress=False, **kwargs)
    except NonFiniteLossError as exc:
        (out / f"caught-rank{comm.rank}").write_text(str(exc), encoding="utf-8")


def _cli(comm, out: Path, argv: list[str]) -> int:
    # Record which ranks write a checkpoint, then run the command line as mpiexec would.
    import gradcore.train
    from gradcore import cli

    real_save = gradcore.train.save

    def save(*args, **kwargs):
        (out / f"saved-by-rank{comm.rank}").write_text("", encoding="utf-8")
        return real_save(*args, **kwargs)

    gradcore.train.save = save
    return cli.main(argv)


def main(argv: list[str]) -> int:
    from gradcore.distributed import init

    comm = init()
    out = Path(argv[0])
    if argv[1] == "--fail-rank":
        _fail(comm, int(argv[2]))
        return 0
    if argv[1] == "--mismatch":
        _mismatch(comm)
        return 0
    if argv[1] == "--bad-data":
        _bad_data(comm, out)
        return 0
    if argv[1] == "--drift":
        _drift(comm)
        return 0
    if argv[1] == "--diverge":
        _diverge(comm, out)
        return 0
    if argv[1] == "--cli":
        return _cli(comm, out, argv[2:])
    for case in argv[1:]:
        _train_case(comm, out, case)
    if comm.rank == 0:
        (out / "done.json").write_text(json.dumps({"size": comm.size}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
