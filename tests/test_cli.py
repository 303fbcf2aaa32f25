"""The gradcore command: end to end in a subprocess, and in process for the options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from gradcore import cli


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "gradcore", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def _test_accuracy(stdout: str) -> float:
    match = re.search(r"test accuracy: ([0-9.]+)", stdout)
    assert match, stdout
    return float(match.group(1))


# --- subprocess: what a user types ---------------------------------------------------------


def test_default_run_trains_on_spirals():
    proc = _run("train")
    assert proc.returncode == 0, proc.stderr
    assert "spirals" in proc.stdout
    assert "numpy" in proc.stdout
    epochs = re.findall(r"^epoch +(\d+)/40 ", proc.stdout, flags=re.MULTILINE)
    assert [int(e) for e in epochs] == list(range(1, 41))
    assert _test_accuracy(proc.stdout) >= 0.95
    assert "Traceback" not in proc.stderr


def test_plot_and_json(tmp_path):
    png, js = tmp_path / "curves.png", tmp_path / "metrics.json"
    proc = _run("train", "--epochs", "3", "--plot", str(png), "--json", str(js), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(js.read_text())
    assert metrics["backend"] == "numpy"
    assert metrics["epochs"] == 3
    assert metrics["history"]["epoch"] == [1, 2, 3]
    assert len(metrics["history"]["val_accuracy"]) == 3
    assert metrics["test"]["accuracy"] == pytest.approx(_test_accuracy(proc.stdout), abs=1e-4)
    assert metrics["model"]["sizes"] == [2, 64, 64, 3]


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["train", "--epochs", "zero"], 2, "positive integer"),
        (["train", "--backend", "tensorflow"], 2, "invalid choice"),
        (["train", "--dataset", "missing.csv"], 1, "no such data file"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_no_traceback(args, status, needle):
    proc = _run(*args)
    assert proc.returncode == status
    assert needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_unavailable_backend_is_one_line():
    from gradcore import available_backends

    if "cupy" in available_backends():
        pytest.skip("CuPy and a GPU are available here")
    proc = _run("train", "--backend", "cupy")
    assert proc.returncode == 1
    assert "cupy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- in process: options -------------------------------------------------------------------


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "torch", "jax", "dask", "array_api_strict", "cupy"):
        assert re.search(rf"^  {name} ", out, flags=re.MULTILINE), out
    assert "cpu" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out


def test_linear_dataset_recovers_w_and_b(capsys):
    assert cli.main(["train", "--dataset", "linear", "--dtype", "float64", "--quiet"]) == 0
    out = capsys.readouterr().out
    w = re.search(r"learned w = \[\s*([-0-9.]+)\s+([-0-9.]+)\]", out)
    b = re.search(r"b = \[\s*([-0-9.]+)\]", out)
    assert w, out
    assert b, out
    np.testing.assert_allclose([float(w.group(1)), float(w.group(2))], [2.0, -3.4], atol=1e-2)
    assert float(b.group(1)) == pytest.approx(4.2, abs=1e-2)


def test_torch_backend_softmax_model_sgd(capsys):
    pytest.importorskip("torch")
    args = [
        "train",
        "--backend",
        "torch",
        "--model",
        "softmax",
        "--optimizer",
        "sgd",
        "--epochs",
        "2",
        "--schedule",
        "cosine",
        "--quiet",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert 0 < _test_accuracy(out) < 0.8  # a linear model cannot separate the spirals


def test_save_then_resume(tmp_path, capsys):
    ckpt = tmp_path / "run.npz"
    base = ["train", "--hidden", "16", "--activation", "tanh", "--epochs", "2", "--seed", "3"]
    assert cli.main([*base, "--save", str(ckpt), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "epoch   2/2" in out
    assert "saved checkpoint" in out
    assert (
        cli.main(
            [
                "train",
                "--resume",
                str(ckpt),
                "--epochs",
                "2",
                "--seed",
                "3",
                "--backend",
                "array_api_strict",
                "--save",
                str(ckpt),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "epoch   3/4" in out
    assert "epoch   4/4" in out
    assert "activation='tanh'" in out
    assert cli.main(["train", "--resume", str(ckpt), "--dataset", "digits", "--quiet"]) == 1
    assert "2 features" in capsys.readouterr().err


def test_csv_dataset(tmp_path, capsys):
    from gradcore import data

    X, y = data.spirals(120, classes=2, noise=0.1, seed=0)
    path = tmp_path / "two.csv"
    rows = [",".join(f"{v:.6f}" for v in X[i]) + f",{y[i]}" for i in range(len(y))]
    path.write_text("x0,x1,label\n" + "\n".join(rows) + "\n")
    assert cli.main(["train", "--dataset", str(path), "--epochs", "5", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    path.write_text("x0,x1,label\n1,2,0\n3,nan,1\n")
    assert cli.main(["train", "--dataset", str(path)]) == 1
    err = capsys.readouterr().err
    assert "NaN" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--model", "linear"], "classification set"),
        (["train", "--dataset", "linear", "--model", "softmax"], "regression set"),
        (["train", "--model", "softmax", "--hidden", "8"], "--hidden applies"),
        (["train", "--resume", "nowhere.npz"], "no such checkpoint"),
        (["train", "--dataset", "mnist"], "unknown dataset"),
        (["train", "--hidden", "8,x"], "layer widths"),
    ],
)
def test_option_errors(capsys, args, needle):
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1


def test_diverging_run_reports_the_step(capsys):
    args = ["train", "--dataset", "linear", "--optimizer", "sgd", "--lr", "1e6", "--epochs", "3"]
    with np.errstate(all="ignore"):
        assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert re.search(r"at step \d+", err)
    assert len(err.strip().splitlines()) == 1


def test_bench_runs_the_training_benchmark(capsys):
    from pathlib import Path

    if not (Path(cli.__file__).resolve().parent.parent / "benches" / "train_bench.py").is_file():
        pytest.skip("not a source checkout")
    pytest.importorskip("torch")  # the benchmark compares with PyTorch
    assert cli.main(["bench", "--case", "digits", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| digits \| 64-128-10 \| 64 \| 1797 \|", out, flags=re.MULTILINE), out


# --- resuming, output paths, whole-number regression targets --------------------------------


def test_resume_keeps_the_saved_optimizer_and_refuses_another_model(tmp_path, capsys):
    ckpt = tmp_path / "sgd.npz"
    common = ["train", "--hidden", "8", "--epochs", "1", "--quiet"]
    assert cli.main([*common, "--optimizer", "sgd", "--save", str(ckpt)]) == 0
    capsys.readouterr()
    # Without --optimizer the run continues with SGD (it used to build Adam and fail on
    # the saved momentum buffers).
    assert cli.main(["train", "--resume", str(ckpt), "--epochs", "1"]) == 0
    assert " sgd lr=0.1" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(ckpt), "--model", "softmax", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint holds a mlp model" in err
    assert len(err.strip().splitlines()) == 1


def test_resumed_cosine_schedule_starts_afresh(tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    metrics = tmp_path / "m.json"
    base = ["train", "--epochs", "1", "--quiet", "--schedule", "cosine"]
    assert cli.main([*base, "--hidden", "8", "--save", str(ckpt)]) == 0
    assert cli.main([*base, "--resume", str(ckpt), "--json", str(metrics)]) == 0
    capsys.readouterr()
    lr = json.loads(metrics.read_text())["optimizer"]["lr"]
    steps = lr["total_steps"]  # one epoch of 675 samples in batches of 32
    assert steps == 22
    from gradcore import optim

    schedule = optim.Schedule(**lr)
    # the resumed optimizer's updates are numbered from 22 on: they must not all get
    # the final rate 0 of the first run's schedule
    assert schedule(22) == 0.01
    assert schedule(33) == pytest.approx(0.005)
    assert schedule(44) == 0.0


@pytest.mark.parametrize("option", ["--save", "--plot", "--json"])
def test_unwritable_output_is_refused_before_training(tmp_path, capsys, option):
    target = tmp_path / "missing" / "out"
    assert cli.main(["train", "--epochs", "1", option, str(target)]) == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out  # nothing trained
    assert "does not exist" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_whole_number_targets_can_be_regressed(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 2))
    y = np.round(1000 * X[:, 0] + 5000)  # prices in whole units, not classes
    path = tmp_path / "prices.npz"
    np.savez(path, X=X, y=y)
    assert cli.main(["train", "--dataset", str(path), "--epochs", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "too many classes" in err
    assert "--model linear" in err
    args = ["train", "--dataset", str(path), "--model", "linear", "--quiet"]
    assert cli.main([*args, "--epochs", "30", "--lr", "0.05"]) == 0
    assert "test mse" in capsys.readouterr().out


# --- interrupting a run saves the last completed epoch ----------------------------------------


def _train_until(tmp_path, *args: str, lines: int = 3):
    """Start `gradcore train ...` and return (process, the stdout lines read) after
    ``lines`` epoch lines; everything bounded by timeouts."""
    import queue
    import threading

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "GRADCORE_NUM_THREADS": "1"}
    # Ctrl-C must reach the child even when this runner ignores SIGINT (a child
    # inherits that), so the child turns Python's handler back on first.
    start = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'gradcore'; runpy.run_module('gradcore', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", start, "train", "--no-progress", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    got: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [got.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        # The header line comes first, once the signal handlers are in place.
        while not seen or sum(line.startswith("epoch") for line in seen) < lines:
            seen.append(got.get(timeout=120))
    except queue.Empty:
        proc.kill()
        pytest.fail(f"no epoch lines within the timeout; got {seen}")
    return proc, got, seen


def _finish(proc, got, seen):
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the interrupted run did not exit")
    while not got.empty():
        seen.append(got.get())
    return stderr


@pytest.mark.parametrize(
    ("signame", "status", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")]
)
def test_interrupt_saves_the_last_completed_epoch(tmp_path, monkeypatch, signame, status, word):
    import signal

    monkeypatch.setenv("GRADCORE_NUM_THREADS", "1")  # the reference run below sums alike

    from gradcore.train import load

    proc, got, seen = _train_until(tmp_path, "--epochs", "100000", "--save", "ck")
    proc.send_signal(getattr(signal, signame))
    stderr = _finish(proc, got, seen)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    done = [int(m) for m in re.findall(r"^epoch +(\d+)/", "".join(seen), flags=re.MULTILINE)]
    last = done[-1]
    assert f"saved the last completed epoch ({last}) to ck.npz" in stderr
    assert f"gradcore: {word}" in stderr
    ckpt = load(tmp_path / "ck")  # --save ck wrote ck.npz; --resume ck reads it
    assert ckpt.meta["epochs_done"] == last
    assert ckpt.optimizer_state["step"] == last * 22  # 675 samples in batches of 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-")]
    # The saved weights are those of an uninterrupted run of exactly `last` epochs.
    ref = _run(
        "train", "--epochs", str(last), "--save", str(tmp_path / "ref"), "--quiet", timeout=300
    )
    assert ref.returncode == 0, ref.stderr
    expected = load(tmp_path / "ref.npz")
    for name, value in expected.params.items():
        np.testing.assert_array_equal(ckpt.params[name], value)
    # And --resume ck continues from there.
    resumed = _run("train", "--resume", str(tmp_path / "ck"), "--epochs", "1", "--quiet")
    assert resumed.returncode == 0, resumed.stderr


def test_interrupt_in_the_first_epoch_saves_nothing_and_says_so(tmp_path):
    import signal

    # One-sample batches through a wide MLP: the first epoch takes seconds.
    proc, got, seen = _train_until(
        tmp_path, "--save", "ck", "--batch-size", "1", "--hidden", "512,512", lines=0
    )
    assert seen[0].startswith("gradcore: MLP")
    time.sleep(0.5)  # the header is printed just before training starts
    proc.send_signal(signal.SIGTERM)  # in the first epoch
    stderr = _finish(proc, got, seen)
    assert proc.returncode == 143, stderr
    assert not any(line.startswith("epoch") for line in seen), "the first epoch was too fast"
    assert "interrupted before the first epoch completed; no checkpoint saved" in stderr
    assert not (tmp_path / "ck.npz").exists()


# --- outputs are checked before the first epoch ----------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--plot", "out.txt", "cannot tell the image type of 'out.txt'"),
        ("--plot", "curves", "cannot tell the image type"),
        ("--plot", "adir", "'adir' is a directory"),
        ("--json", "adir", "'adir' is a directory"),
        ("--save", "adir.npz", "'adir.npz' is a directory"),
    ],
)
def test_bad_outputs_are_refused_before_training(
    tmp_path, monkeypatch, capsys, option, value, needle
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.npz").mkdir()
    assert cli.main(["train", "--epochs", "1", option, value]) == 2
    captured = capsys.readouterr()
    assert "epoch" not in captured.out  # nothing trained
    assert needle in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_plot_without_matplotlib_is_refused_before_training(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.backend_bases", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert cli.main(["train", "--epochs", "1", "--plot", str(tmp_path / "c.png")]) == 1
    captured = capsys.readouterr()
    assert "epoch" not in captured.out
    assert "pip install 'gradcore[plot]'" in captured.err


# --- what a newcomer sees -------------------------------------------------------------------


def test_output_into_a_closed_pipe_is_quiet():
    # `gradcore train | head -2`: the reader goes away after two lines while training
    # still has lines to print (a long run, so the writes after it surely fail).
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcore", "train", "--epochs", "100000", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        first = [proc.stdout.readline(), proc.stdout.readline()]
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first[0].startswith("gradcore: MLP")
    assert first[1].startswith("epoch")
    assert proc.returncode == 0, stderr
    assert "Broken pipe" not in stderr
    assert stderr == ""


def test_header_names_a_linear_model_and_counts_singulars(capsys):
    assert cli.main(["train", "--dataset", "linear", "--epochs", "1", "--no-progress"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "linear regression (2 -> 1)" in header
    assert "MLP" not in header
    assert "relu" not in header
    assert "1 epoch" in header
    assert "1 epochs" not in header
    assert cli._plural(1, "thread") == "1 thread"
    assert cli._plural(4, "thread") == "4 threads"


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["--seed", "-1"], 2, "argument --seed: expected a non-negative integer, got '-1'"),
        (["--dataset", "spiral"], 2, "did you mean 'spirals'?"),
        (["--momentum", "0.5"], 2, "--momentum applies to --optimizer sgd, not adam"),
        (["--device", "cpu:3"], 1, "has only the device 'cpu', not 'cpu:3'"),
        (["--backend", "torch", "--device", "cpu:3"], 1, "one CPU device, 'cpu'; got 'cpu:3'"),
        (["--backend", "jax", "--device", "cpu:3"], 1, "JAX has no device 'cpu:3'; its devices"),
        (
            ["--backend", "array_api_strict", "--device", "cpu:3"],
            1,
            "no device 'cpu:3'; its devices are CPU_DEVICE",
        ),
    ],
)
def test_clear_errors_for_seed_dataset_and_device(capsys, args, status, needle):
    for name in ("torch", "jax"):
        if name in args:
            pytest.importorskip(name)
    assert cli.main(["train", "--epochs", "1", *args]) == status
    err = capsys.readouterr().err
    assert needle in err
    assert "list index" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("classification", [False, True])
def test_plot_title_fits_and_epoch_ticks_are_whole(classification):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from gradcore.train import History

    h = History()
    for e in range(1, 4):
        h.epoch.append(e)
        h.loss.append(1.0 / e)
        h.val_loss.append(1.1 / e)
        h.accuracy.append(0.5 + 0.1 * e if classification else None)
        h.val_accuracy.append(0.5 + 0.1 * e if classification else None)
    title = "MLP([64, 128, 128, 10], activation='leaky_relu', dtype='float64') on digits (torch)"
    fig = cli._figure(h, title=title)
    try:
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent()
        assert box.x0 >= 0
        assert box.x1 <= fig.bbox.x1
        assert box.y1 <= fig.bbox.y1
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
            assert ticks
            assert all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
