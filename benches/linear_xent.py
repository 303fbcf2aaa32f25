"""Benchmark the fused linear + cross-entropy on the CPU against its floor and its peers.

Run ``python -m benches.linear_xent`` (the issue's shapes, float32: (4096, 1024, 32000)
and (1024, 2048, 128256), minutes per shape on a small machine) or choose shapes with
``--shapes 1024x1024x32000,256x2048x128256``; ``--repeats``, ``--json PATH``.

Each variant computes the loss and the gradients with respect to ``x``, ``W`` and
``b`` (N, H, V = rows, hidden size, classes):

``gradcore``
    :func:`gradcore.linear_cross_entropy` (NumPy fast path, default chunk size).
``floor``
    The three matrix products alone, into preallocated buffers: ``x @ W``,
    ``g @ W.T`` and ``x.T @ g``. No loss, no bias: the time a fused kernel cannot beat.
``unfused``
    gradcore's ``linear``, ``softmax_cross_entropy(..., inplace=True)`` and
    ``linear_vjp``: the N x V logits exist once.
``torch``
    PyTorch eager ``F.linear`` + ``F.cross_entropy``, forward and backward.
``torch_lce``
    ``torch.nn.functional.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``
    (its chunked path; PyTorch 2.13), forward and backward.

Times are medians over ``--repeats`` rounds in which the variants run in turn (so
machine load hits them alike). Peak extra memory is measured for each variant in a
fresh subprocess: the growth of the resident set (``VmHWM`` after resetting it, Linux)
during one call after a warm-up call, beyond the inputs; outputs (``dx``, ``dW``,
``db``) count. For the NumPy variants tracemalloc's peak is shown as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import gradcore

from ._common import machine, peak_extra_bytes

DEFAULT_SHAPES = [(4096, 1024, 32000), (1024, 2048, 128256)]
VARIANTS = ("gradcore", "floor", "unfused", "torch", "torch_lce")


def make_inputs(shape: tuple[int, int, int], seed: int = 0) -> dict[str, np.ndarray]:
    N, H, V = shape
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((N, H), dtype=np.float32),
        "W": (rng.standard_normal((H, V), dtype=np.float32) / np.float32(np.sqrt(H))),
        "b": rng.standard_normal(V, dtype=np.float32) * np.float32(0.1),
        "y": rng.integers(0, V, size=N),
    }


def variant(name: str, d: dict[str, np.ndarray]) -> Callable[[], Any] | None:
    """A zero-argument callable running one forward+backward of ``name``, or None."""
    x, W, b, y = d["x"], d["W"], d["b"], d["y"]
    N, H = x.shape
    V = W.shape[1]
    if name == "gradcore":
        return lambda: gradcore.linear_cross_entropy(x, W, y, bias=b)
    if name == "floor":
        Z = np.empty((N, V), np.float32)
        dx = np.empty((N, H), np.float32)
        dW = np.empty((H, V), np.float32)

        def floor() -> Any:
            np.matmul(x, W, out=Z)
            np.matmul(Z, W.T, out=dx)
            np.matmul(x.T, Z, out=dW)
            return dx, dW

        return floor
    if name == "unfused":

        def unfused() -> Any:
            z = gradcore.linear(x, W, b)
            loss, g = gradcore.softmax_cross_entropy(z, y, inplace=True)
            return (loss, *gradcore.linear_vjp(g, x, W))

        return unfused
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    xt = torch.from_numpy(x).requires_grad_(True)
    Wt = torch.from_numpy(np.ascontiguousarray(W.T)).requires_grad_(True)  # (V, H), torch's
    bt = torch.from_numpy(b).requires_grad_(True)
    yt = torch.from_numpy(y.astype(np.int64))
    if name == "torch":

        def eager() -> Any:
            xt.grad = Wt.grad = bt.grad = None
            loss = F.cross_entropy(F.linear(xt, Wt, bt), yt)
            loss.backward()
            return loss, xt.grad, Wt.grad, bt.grad

        return eager
    if name == "torch_lce":
        lce = getattr(F, "linear_cross_entropy", None)
        options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if lce is None or options is None:
            return None
        opts = options()

        def chunked() -> Any:
            xt.grad = Wt.grad = bt.grad = None
            loss = lce(xt, Wt, yt, linear_bias=bt, options=opts)
            loss.backward()
            return loss, xt.grad, Wt.grad, bt.grad

        return chunked
    raise ValueError(f"unknown variant {name!r}")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(name: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Peak extra resident memory of one call (run in a fresh process by ``--memory``)."""
    d = make_inputs(shape)
    fn = variant(name, d)
    if fn is None:
        return {"variant": name, "rss_bytes": None}
    fn()  # warm-up: thread pools, BLAS buffers, allocator arenas
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    row: dict[str, Any] = {"variant": name, "rss_bytes": (peak - before) * 1024}
    if name in ("gradcore", "unfused"):
        row["tracemalloc_bytes"] = peak_extra_bytes(fn)
    return row


def _memory_in_subprocess(name: str, shape: tuple[int, int, int]) -> dict[str, Any]:
    arg = "x".join(map(str, shape))
    cmd = [sys.executable, "-m", "benches.linear_xent", "--memory", name, "--shapes", arg]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def bench(shape: tuple[int, int, int], repeats: int, variants: tuple[str, ...]) -> dict[str, Any]:
    d = make_inputs(shape)
    fns = {name: variant(name, d) for name in variants}
    fns = {k: v for k, v in fns.items() if v is not None}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    del d, fns
    gc.collect()
    rows = []
    for name in times:
        mem = _memory_in_subprocess(name, shape)
        rows.append(
            {
                "variant": name,
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                **{k: v for k, v in mem.items() if k != "variant"},
            }
        )
    N, H, V = shape
    return {
        "shape": shape,
        "logits_bytes": N * V * 4,
        "outputs_bytes": (N * H + H * V + V) * 4,
        "rows": rows,
    }


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def report(result: dict[str, Any]) -> str:
    N, H, V = result["shape"]
    rows = {r["variant"]: r for r in result["rows"]}
    floor = rows.get("floor", {}).get("median_s")
    eager = rows.get("torch", {}).get("rss_bytes")
    lines = [
        f"(N, H, V) = ({N}, {H}, {V}) float32: logits {_fmt_bytes(result['logits_bytes'])}, "
        f"outputs dx+dW+db {_fmt_bytes(result['outputs_bytes'])}",
        f"{'variant':<10} {'median s':>9} {'min s':>8} {'/ floor':>8} "
        f"{'peak extra (RSS)':>17} {'/ torch':>8} {'tracemalloc':>12}",
    ]
    for name, r in rows.items():
        ratio = f"{r['median_s'] / floor:.2f}x" if floor else "-"
        mem = r.get("rss_bytes")
        mratio = f"{mem / eager:.2f}" if mem is not None and eager else "-"
        lines.append(
            f"{name:<10} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {ratio:>8} "
            f"{_fmt_bytes(mem):>17} {mratio:>8} {_fmt_bytes(r.get('tracemalloc_bytes')):>12}"
        )
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        dims = tuple(int(v) for v in part.lower().split("x"))
        if len(dims) != 3 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"a shape is NxHxV, got {part!r}")
        out.append(dims)
    return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=DEFAULT_SHAPES, help="NxHxV,NxHxV")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--memory", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.shapes[0])))
        return 0
    variants = tuple(v for v in args.variants.split(",") if v)
    print(machine(), f"gradcore threads {gradcore.get_num_threads()}", flush=True)
    results = []
    for shape in args.shapes:
        result = bench(shape, args.repeats, variants)
        results.append(result)
        print(report(result), "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
