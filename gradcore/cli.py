r"""The ``gradcore`` command: ``train``, ``info`` and ``bench``.

``gradcore train`` with no options trains an MLP on the built-in spirals with NumPy,
prints one line per epoch and the final test accuracy, in a few seconds. The same run on
a GPU is ``gradcore train --backend cupy``. ``gradcore info`` lists the array libraries
and devices found here. Errors (an unknown option, a backend that is not installed, a
missing file) print one line on stderr and exit with a non-zero status. Ctrl-C (status
130) and SIGTERM (143) stop training; with ``--save`` the last completed epoch is saved
first. Output paths are checked before the first epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

__all__ = ["main"]

_DATASETS = ("spirals", "linear", "digits")
_MODELS = ("mlp", "softmax", "linear")
_OPTIMIZERS = ("sgd", "adam", "adamw")
_DEFAULT_LR = {"sgd": 0.1, "adam": 0.01, "adamw": 0.01}


class _UsageError(Exception):
    """A bad command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _widths(text: str) -> list[int]:
    if not text.strip():
        return []
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths like 64,64, got {text!r}"
        ) from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return widths


def _build_parser() -> _Parser:
    from ._namespace import BACKEND_NAMES
    from .nn import ACTIVATIONS

    parser = _Parser(
        prog="gradcore",
        description="Backpropagation kernels on any array library: train, inspect, benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,info,bench}", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train a model (default: an MLP on the spirals with NumPy)",
        description="Train a model with gradcore's kernels and report test accuracy.",
    )
    t.add_argument("--backend", default="numpy", choices=BACKEND_NAMES, help="array library")
    t.add_argument("--device", default=None, help="device of the backend (cuda:1, gpu:0, cpu)")
    t.add_argument(
        "--dataset",
        default="spirals",
        help="spirals, linear, digits, or a .npz (arrays X, y) / .csv (last column y) file",
    )
    t.add_argument(
        "--model",
        choices=_MODELS,
        default=None,
        help="mlp; softmax (logistic regression); linear (least squares)",
    )
    t.add_argument("--hidden", type=_widths, default=None, help="hidden widths (default 64,64)")
    t.add_argument(
        "--activation",
        choices=tuple(ACTIVATIONS),
        default=None,
        help="hidden activation (default relu)",
    )
    t.add_argument(
        "--optimizer",
        choices=_OPTIMIZERS,
        default=None,
        help="default adam; sgd (with momentum) for --model linear",
    )
    t.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default 0.1 for sgd, 0.01 for adam and adamw)",
    )
    t.add_argument(
        "--momentum", type=float, default=None, help="SGD momentum (default 0.9; sgd only)"
    )
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument(
        "--schedule",
        choices=("constant", "step", "cosine"),
        default="constant",
        help="learning-rate schedule over the run",
    )
    t.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training set (default 40; 20 for digits)",
    )
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--seed", type=_seed, default=0, help="seeds the data, the weights, the batches")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument(
        "--fused-head",
        action="store_true",
        help="train the output layer with linear_cross_entropy (the batch's logits are "
        "never held; no training accuracy is measured)",
    )
    t.add_argument("--test-size", type=float, default=0.25, help="fraction held out for testing")
    t.add_argument(
        "--save",
        metavar="PATH",
        help="write a checkpoint (.npz appended if missing) at the end, or after the last "
        "completed epoch when interrupted (Ctrl-C, SIGTERM)",
    )
    t.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (the --save PATH)")
    t.add_argument("--plot", metavar="PNG", help="save loss and accuracy curves (matplotlib)")
    t.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    t.add_argument("--quiet", action="store_true", help="print only the final result")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser(
        "info",
        help="list the installed backends and their devices",
        description="List the array libraries gradcore can use here.",
    )
    # Listed for --help only: main() hands everything after "bench" to the benchmark.
    sub.add_parser(
        "bench",
        help="run benches/train_bench.py (source checkout only); bench --help for its options",
    )
    return parser


# --- train ---------------------------------------------------------------------------------


def _load_dataset(
    name: str, seed: int, targets: str = "auto"
) -> tuple[np.ndarray, np.ndarray, bool, str]:
    """X, y, whether it is a classification set, and its display name."""
    from . import data

    if name == "spirals":
        X, y = data.spirals(900, classes=3, noise=0.2, seed=seed)
        return X, y, True, name
    if name == "linear":
        X, y = data.linear(1000, seed=seed)
        return X, y, False, name
    if name == "digits":
        X, y = data.digits()
        return X, y, True, name
    path = Path(name)
    if not path.suffix:
        import difflib

        close = difflib.get_close_matches(name.lower(), _DATASETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _UsageError(
            f"--dataset: unknown dataset {name!r}{hint}; expected "
            f"{', '.join(_DATASETS)} or a .npz/.csv file"
        )
    X, y = data.load(path, targets=targets)
    return X, y, y.dtype.kind in "iu", path.name


def _check_output_options(args: argparse.Namespace) -> None:
    """Refuse --save, --plot and --json paths that cannot be written, before training."""
    from .train import checkpoint_path

    outputs = [
        ("--save", args.save, checkpoint_path(args.save) if args.save else None),
        ("--plot", args.plot, Path(args.plot) if args.plot else None),
        ("--json", args.json, Path(args.json) if args.json else None),
    ]
    for option, value, path in outputs:
        if path is None:
            continue
        if path.is_dir():
            raise _UsageError(f"{option}: {value!r} is a directory; give a file name")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise _UsageError(f"{option}: the directory of {value!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise _UsageError(f"{option}: the directory of {value!r} is not writable")
    if args.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install 'gradcore[plot]'") from None
        kinds = FigureCanvasBase.get_supported_filetypes()
        suffix = Path(args.plot).suffix.lower().lstrip(".")
        if suffix not in kinds:
            raise _UsageError(
                f"--plot: cannot tell the image type of {args.plot!r}; end it in one of "
                f"{', '.join('.' + k for k in sorted(kinds))}"
            )


def _train(args: argparse.Namespace) -> int:
    from . import data, nn, optim
    from . import distributed as _distributed
    from .train import evaluate, fit, load, save

    # Under mpiexec every rank runs this command: data-parallel training (see
    # gradcore.distributed). A rank's error must end the job, never leave the others
    # waiting in a collective.
    comm = _distributed.init()
    if comm.size > 1 and not getattr(args, "_every_rank", False):
        args._every_rank = True
        return int(_distributed.run_or_abort(comm, _train, args))

    be = nn.resolve_backend(args.backend, args.device)
    if be.name == "jax" and args.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    # Least squares reads a file's targets as quantities, whatever they look like.
    targets = "values" if args.model == "linear" else "auto"
    X, y, classification, dataset = _load_dataset(args.dataset, args.seed, targets)
    if not 0 < args.test_size < 1:
        raise _UsageError(f"--test-size must lie strictly between 0 and 1, got {args.test_size}")

    _check_output_options(args)
    if comm.rank != 0:
        # One report and one set of files for the job: rank 0 prints and writes them.
        args.save = args.plot = args.json = None
        args.quiet = True
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    checkpoint = load(args.resume) if args.resume else None
    if checkpoint is not None:
        saved_kind = checkpoint.meta.get("model_kind")
        if args.model and saved_kind and args.model != saved_kind:
            raise _UsageError(
                f"--model {args.model}, but the checkpoint holds a {saved_kind} model "
                "(--resume continues the saved model; leave out --model)"
            )
        args.optimizer = args.optimizer or checkpoint.meta.get("optimizer")
    if args.model == "linear" and args.dataset not in _DATASETS and classification:
        # Whole-number targets in a file may be quantities, not classes: least squares
        # was asked for.
        classification = False
    if classification and int(y.max()) + 1 > max(1000, X.shape[0]):
        raise ValueError(
            f"{dataset}: y holds whole numbers up to {int(y.max())}, too many classes for "
            f"{X.shape[0]} samples; for regression on them use --model linear"
        )
    kind = args.model or (
        (checkpoint.meta.get("model_kind") if checkpoint else None)
        or ("mlp" if classification else "linear")
    )
    if kind == "softmax" and not classification:
        raise ValueError(f"--model softmax needs class labels; {dataset} is a regression set")
    if kind == "linear" and classification:
        raise ValueError(
            f"--model linear is least-squares regression; {dataset} is a classification set "
            "(use --model softmax or mlp)"
        )
    standardize = args.dataset not in ("spirals", "linear")
    X_train, X_test, y_train, y_test = data.train_test_split(
        X, y, test_size=args.test_size, seed=args.seed
    )
    if standardize:
        X_train, mean, std = data.standardize(X_train)
        X_test, _, _ = data.standardize(X_test, mean=mean, std=std)
    outputs = int(y.max()) + 1 if classification else (1 if y.ndim == 1 else int(y.shape[1]))
    features = int(X.shape[1])

    epochs_done = 0
    if checkpoint is not None:
        if args.hidden is not None or args.activation is not None:
            raise _UsageError("--hidden and --activation come from the checkpoint with --resume")
        model = checkpoint.build_model(be, dtype=args.dtype)
        config = checkpoint.model_config or {}
        sizes = config.get("sizes")
        if sizes and (sizes[0] != features or sizes[-1] != outputs):
            raise ValueError(
                f"the checkpoint's model maps {sizes[0]} features to {sizes[-1]} outputs, but "
                f"{dataset} has {features} features and {outputs} outputs"
            )
        epochs_done = int(checkpoint.meta.get("epochs_done", 0))
    else:
        hidden = [64, 64] if args.hidden is None else args.hidden
        if kind != "mlp":
            if args.hidden is not None:
                raise _UsageError(f"--hidden applies to --model mlp, not {kind}")
            hidden = []
        sizes = [features, *hidden, outputs]
        model = nn.MLP(
            sizes, args.activation or "relu", seed=args.seed, dtype=args.dtype, backend=be
        )
    if args.fused_head:
        from .train import _last_layer_is_fused_head

        if not classification:
            raise _UsageError("--fused-head needs a classification dataset (class labels)")
        if not _last_layer_is_fused_head(model):
            model = nn.with_fused_head(model)
    epochs = args.epochs or (20 if args.dataset == "digits" else 40)
    args.optimizer = args.optimizer or ("sgd" if kind == "linear" else "adam")
    steps = epochs * -(-X_train.shape[0] // args.batch_size)
    lr = args.lr or _DEFAULT_LR[args.optimizer]
    schedule: Any = lr
    # A resumed run's optimizer has made some updates: the schedule starts there.
    first_step = (
        int(checkpoint.optimizer_state.get("step", 0))
        if checkpoint and checkpoint.optimizer_state
        else 0
    )
    if args.schedule == "step":
        schedule = optim.Schedule(
            "step", lr, step_size=max(1, steps // 3), gamma=0.1, start=first_step
        )
    elif args.schedule == "cosine":
        schedule = optim.Schedule("cosine", lr, total_steps=steps, start=first_step)
    kwargs: dict[str, Any] = {}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optimizer == "sgd":
        kwargs["momentum"] = 0.9 if args.momentum is None else args.momentum
    elif args.momentum is not None:
        raise _UsageError(f"--momentum applies to --optimizer sgd, not {args.optimizer}")
    opt = optim.get(args.optimizer, lr=schedule, **kwargs)
    loss = "cross_entropy" if classification else "mse"

    if not args.quiet:
        print(
            f"gradcore: {_describe(model, kind)}, {_plural(model.num_parameters(), 'parameter')}, "
            f"on {be}; {dataset}: {X_train.shape[0]} train / {X_test.shape[0]} test; "
            f"{args.optimizer} lr={lr:g}, batch {args.batch_size}, {_plural(epochs, 'epoch')}",
            flush=True,
        )
        if comm.size > 1:
            print(
                f"gradcore: data-parallel over {comm.size} ranks: each batch of "
                f"{args.batch_size} is split among them (the same updates as one process)",
                flush=True,
            )

    snapshot: dict[str, Any] = {}

    def report(epoch: int, history: Any) -> None:
        if args.save:
            # What an interrupted run saves: the last epoch that completed.
            snapshot.update(_snapshot(model, history.optimizer_state), epoch=epoch)
        if args.quiet:
            return
        line = f"epoch {epochs_done + epoch:3d}/{epochs_done + epochs}  loss {history.loss[-1]:.4f}"
        if history.accuracy[-1] is not None:
            line += f"  acc {history.accuracy[-1]:.3f}"
        line += f"  test_loss {history.val_loss[-1]:.4f}"
        if history.val_accuracy[-1] is not None:
            line += f"  test_acc {history.val_accuracy[-1]:.3f}"
        line += f"  ({history.epoch_time[-1]:.2f} s, {history.samples_per_s[-1]:,.0f} samples/s)"
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    start = time.perf_counter()
    meta = {"dataset": dataset, "model_kind": kind, "optimizer": args.optimizer}
    try:
        history = fit(
            model,
            X_train,
            y_train,
            loss=loss,
            optimizer=opt,
            epochs=epochs,
            batch_size=args.batch_size,
            validation=(X_test, y_test),
            seed=args.seed + epochs_done,
            progress=not args.no_progress and not args.quiet,
            optimizer_state=checkpoint.optimizer_state if checkpoint else None,
            callback=report,
            comm=comm if comm.size > 1 else None,
        )
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see _terminate_as_interrupt)
        if args.save:
            _save_interrupted(args.save, model, snapshot, meta, epochs_done)
        raise
    elapsed = time.perf_counter() - start
    test = evaluate(model, X_test, y_test, loss=loss)
    if classification:
        print(f"test accuracy: {test['accuracy']:.4f} (loss {test['loss']:.4f}) in {elapsed:.2f} s")
    else:
        print(f"test mse: {test['loss']:.6g} in {elapsed:.2f} s")
        if kind == "linear":
            from ._namespace import to_numpy

            params = model.state_dict()
            w = to_numpy(params["0.W"]).ravel()
            b = to_numpy(params["0.b"]).ravel()
            w_text = np.array2string(w, precision=4)
            print(f"learned w = {w_text}, b = {np.array2string(b, precision=4)}")

    if args.save:
        path = save(
            args.save,
            model,
            history.optimizer_state,
            meta={"epochs_done": epochs_done + epochs, **meta},
        )
        if not args.quiet:
            print(f"saved checkpoint to {path}")
    if args.json:
        metrics = {
            "backend": be.name,
            "device": str(be.device),
            "dataset": dataset,
            "model": model.config(),
            "parameters": model.num_parameters(),
            "optimizer": opt.config(),
            "epochs": epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "seconds": elapsed,
            "history": history.to_dict(),
            "test": test,
        }
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        _plot(history, args.plot, title=f"{_describe(model, kind)} on {dataset} ({be.name})")
    return 0


def _describe(model: Any, kind: str) -> str:
    """The model as the header names it: a one-layer model is a regression, not an MLP."""
    sizes = getattr(model, "sizes", None)
    if sizes is not None and len(sizes) == 2 and kind in ("linear", "softmax"):
        what = "linear regression" if kind == "linear" else "softmax regression"
        return f"{what} ({sizes[0]} -> {sizes[1]})"
    return repr(model)


def _snapshot(model: Any, optimizer_state: Any) -> dict[str, Any]:
    """Host copies of the parameters and optimizer state (updated in place later)."""
    from ._namespace import to_numpy

    def copy(x: Any) -> Any:
        return np.array(to_numpy(x), copy=True)

    state = None
    if optimizer_state is not None:
        state = {
            k: {n: copy(a) for n, a in v.items()} if isinstance(v, dict) else v
            for k, v in optimizer_state.items()
        }
    return {"params": {k: copy(v) for k, v in model.state_dict().items()}, "state": state}


def _save_interrupted(
    target: str, model: Any, snapshot: dict[str, Any], meta: dict[str, Any], epochs_done: int
) -> None:
    """Save the last completed epoch of an interrupted run, and say so on stderr."""
    import signal

    from .train import save

    if not snapshot:
        print(
            "gradcore: interrupted before the first epoch completed; no checkpoint saved",
            file=sys.stderr,
        )
        return
    # The save is atomic (a temporary file, then a rename) and short: a second Ctrl-C
    # must not cut it off.
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        model.load_state_dict(snapshot["params"])
        done = epochs_done + snapshot["epoch"]
        path = save(target, model, snapshot["state"], meta={"epochs_done": done, **meta})
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(
        f"gradcore: interrupted; saved the last completed epoch ({done}) to {path}",
        file=sys.stderr,
        flush=True,
    )


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that training stops the same way."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _figure(history: Any, *, title: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    classification = history.accuracy and history.accuracy[0] is not None
    fig, axes = plt.subplots(
        1, 2 if classification else 1, figsize=(10 if classification else 5, 4)
    )
    ax_loss = axes[0] if classification else axes
    ax_loss.plot(history.epoch, history.loss, label="train")
    ax_loss.plot(history.epoch, history.val_loss, label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    if classification:
        axes[1].plot(history.epoch, history.accuracy, label="train")
        axes[1].plot(history.epoch, history.val_accuracy, label="test")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("accuracy")
        axes[1].legend()
    for ax in axes if classification else [axes]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    # Wrapped to the figure's width (about 11 characters per inch at this size), so a
    # long model description is not cut off in the narrow one-panel figure.
    width = int(fig.get_figwidth() * 11)
    fig.suptitle(textwrap.fill(title, width=width), fontsize="medium")
    fig.tight_layout()
    return fig


def _plot(history: Any, path: str, *, title: str) -> None:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'gradcore[plot]'") from None
    fig = _figure(history, title=title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- info and bench ------------------------------------------------------------------------


def _devices(name: str) -> tuple[str, str]:
    """(version, devices) of a backend, or raise ImportError."""
    if name == "numpy":
        from ._dispatch import get_num_threads

        return np.__version__, f"cpu ({_plural(get_num_threads(), 'thread')} for fast paths)"
    if name == "torch":
        import torch

        devices = [f"cpu ({_plural(torch.get_num_threads(), 'thread')})"]
        if torch.cuda.is_available():
            devices += [
                f"cuda:{i} {torch.cuda.get_device_name(i)}"
                for i in range(torch.cuda.device_count())
            ]
        return torch.__version__, ", ".join(devices)
    if name == "jax":
        import jax

        return jax.__version__, ", ".join(str(d) for d in jax.devices())
    if name == "cupy":
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        names = []
        for i in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            label = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            names.append(f"cuda:{i} {label}")
        return cupy.__version__, ", ".join(names) or "no CUDA device visible"
    if name == "dask":
        import dask

        return dask.__version__, "cpu"
    if name == "array_api_strict":
        import array_api_strict

        return array_api_strict.__version__, "CPU_DEVICE, device1, device2 (simulated)"
    raise ImportError(name)


def _info() -> int:
    from . import __version__
    from ._namespace import BACKEND_NAMES, available_backends

    usable = set(available_backends())
    print(f"gradcore {__version__}, Python {sys.version.split()[0]}")
    for name in BACKEND_NAMES:
        try:
            version, devices = _devices(name)
        except ImportError:
            print(f"  {name:17s} not installed")
            continue
        except Exception as exc:  # a broken driver must not hide the other backends
            print(f"  {name:17s} installed, unusable: {str(exc).splitlines()[0]}")
            continue
        mark = "" if name in usable else "  (not usable here)"
        print(f"  {name:17s} {version:12s} {devices}{mark}")
    return 0


def _bench(rest: Sequence[str]) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "benches" / "train_bench.py"
    if not script.is_file():
        raise FileNotFoundError(
            "the benchmarks live in gradcore's source checkout (benches/train_bench.py), "
            "which is not next to this installation"
        )
    argv = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = argv
    return 0


# --- entry point ---------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)) and exc.filename:
        message = f"{exc.strerror or message}: {exc.filename}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    r"""Run the ``gradcore`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a bad command line, 1 for other errors
        (printed as one line on stderr; set ``GRADCORE_DEBUG=1`` for a traceback).
    """
    parser = _build_parser()
    debug = bool(os.environ.get("GRADCORE_DEBUG"))
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "train":
            with _terminate_as_interrupt():
                return _train(args)
        if args.command == "info":
            return _info()
        return _bench([])
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except _UsageError as exc:
        print(f"gradcore: error: {exc} (see gradcore --help)", file=sys.stderr)
        return 2
    except _Terminated:
        print("gradcore: terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, as the shell reports a process killed by it
    except KeyboardInterrupt:
        print("gradcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`gradcore train | head -2`): stop quietly. Later writes
        # (and the flush at exit) go nowhere instead of raising again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if debug:
            raise
        print(f"gradcore: error: {_one_line(exc)}", file=sys.stderr)
        return 1
