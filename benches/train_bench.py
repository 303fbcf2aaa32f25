"""One training epoch of the same MLP: gradcore on NumPy against PyTorch eager on the CPU.

Both sides start from the same weights and see the same batches in the same order
(``numpy.random.default_rng(seed).permutation``, consecutive slices, as
:func:`gradcore.fit` documents), in float32, with the same optimizer (SGD with
momentum 0.9 by default, or Adam). gradcore runs :func:`gradcore.fit` for one epoch
(its own ``epoch_time``: the training loop, without data checks); PyTorch runs the
textbook loop — index the batch, ``net(x)``, ``cross_entropy``, ``backward()``,
``opt.step()``, ``loss.item()`` — with ``torch.nn.Linear`` layers and
``torch.optim`` (``foreach`` as PyTorch chooses).

Cases:

- ``digits``: 64-128-10 on scikit-learn's 1797 digits (standardised), batch 64;
- ``wide``: 784-1024-1024-10 on 8192 synthetic samples, batch 512.

Runs alternate between the two libraries (ABAB...) after a warm-up epoch each, and the
median epoch time is reported. Target: gradcore on NumPy no slower than PyTorch.

Run: ``python benches/train_bench.py [--case digits|wide|all] [--repeats 7]
[--optimizer sgd|adam] [--no-fast-paths] [--threads N]``, or ``gradcore bench ...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from gradcore import data

    X, y = data.digits()
    X, _, _ = data.standardize(X)
    return X.astype(np.float32), y


def _synthetic(n: int, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return X, y


CASES: dict[str, dict[str, Any]] = {
    "digits": {"sizes": [64, 128, 10], "batch": 64, "data": _digits},
    "wide": {
        "sizes": [784, 1024, 1024, 10],
        "batch": 512,
        "data": lambda: _synthetic(8192, 784, 10),
    },
}


def _torch_net(model: Any) -> Any:
    import torch

    from gradcore import nn

    layers: list[Any] = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                t.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer.state_dict()["W"].T)))
                t.bias.copy_(torch.from_numpy(layer.state_dict()["b"]))
            layers.append(t)
        else:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_epoch(net: Any, opt: Any, X: Any, y: Any, batch: int, seed: int) -> tuple[float, float]:
    import torch

    n = X.shape[0]
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    start = time.perf_counter()
    last = 0.0
    for s in range(0, n, batch):
        idx = perm[s : s + batch]
        xb, yb = X[idx], y[idx]
        out = net(xb)
        loss = torch.nn.functional.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
    return time.perf_counter() - start, last


def run_case(name: str, *, repeats: int, optimizer: str) -> dict[str, Any]:
    import torch

    from gradcore import nn, optim
    from gradcore.train import fit

    case = CASES[name]
    X, y = case["data"]()
    model = nn.MLP(case["sizes"], "relu", seed=0, dtype="float32")
    net = _torch_net(model)
    if optimizer == "sgd":
        ours: Any = optim.SGD(0.01, momentum=0.9)
        theirs: Any = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        ours = optim.Adam(1e-3)
        theirs = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    state = None
    ours_times, theirs_times = [], []
    ours_loss = theirs_loss = 0.0
    for rep in range(repeats + 1):  # the first of each is a warm-up
        # Alternate who goes first, and pause between the two: idle worker threads of
        # one library (OpenMP, OpenBLAS) spin for a while and would slow the other.
        for who in ("ours", "theirs") if rep % 2 else ("theirs", "ours"):
            time.sleep(0.2)
            if who == "ours":
                h = fit(
                    model,
                    X,
                    y,
                    loss="cross_entropy",
                    optimizer=ours,
                    epochs=1,
                    batch_size=case["batch"],
                    seed=rep,
                    progress=False,
                    optimizer_state=state,
                )
                state = h.optimizer_state
                ours_loss = h.step_loss[-1]
                if rep:
                    ours_times.append(h.epoch_time[0])
            else:
                elapsed, theirs_loss = _torch_epoch(net, theirs, Xt, yt, case["batch"], rep)
                if rep:
                    theirs_times.append(elapsed)
    g, t = statistics.median(ours_times), statistics.median(theirs_times)
    return {
        "case": name,
        "sizes": case["sizes"],
        "batch": case["batch"],
        "samples": int(X.shape[0]),
        "gradcore_s": g,
        "torch_s": t,
        "ratio": g / t,
        # Same weights, batches and rules: the runs stay close (float32 rounding only).
        "last_loss": (ours_loss, theirs_loss),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--no-fast-paths", action="store_true", help="generic kernels only")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for PyTorch, BLAS and gradcore's fast paths",
    )
    args = parser.parse_args(argv)

    if args.threads:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import torch

    import gradcore

    if args.threads:
        torch.set_num_threads(args.threads)
        gradcore.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
    try:
        from _common import machine

        where = machine()
    except ImportError:
        where = "?"
    print(
        f"# {where}; numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), gradcore fast paths "
        f"{'off' if args.no_fast_paths else 'on'} ({gradcore.get_num_threads()} threads), "
        f"optimizer {args.optimizer}"
    )
    cases = list(CASES) if args.case == "all" else [args.case]
    rows = []
    with gradcore.use_fast_paths(not args.no_fast_paths):
        for name in cases:
            r = run_case(name, repeats=args.repeats, optimizer=args.optimizer)
            rows.append(r)
            print(
                f"{name}: last losses gradcore {r['last_loss'][0]:.4f}, "
                f"torch {r['last_loss'][1]:.4f}",
                flush=True,
            )
    print()
    print(
        "| case | MLP | batch | samples | gradcore NumPy (ms/epoch) | PyTorch eager (ms/epoch) "
        "| gradcore / PyTorch |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sizes = "-".join(str(s) for s in r["sizes"])
        print(
            f"| {r['case']} | {sizes} | {r['batch']} | {r['samples']} | "
            f"{1e3 * r['gradcore_s']:.1f} | {1e3 * r['torch_s']:.1f} | {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
