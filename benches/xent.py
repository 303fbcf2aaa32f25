"""Benchmark the fused losses on the CPU against the memory floor and against peers.

Run ``python -m benches.xent`` (``--quick`` for a run under a minute, ``--json PATH``
to write the numbers). For each kernel, shape and dtype it prints gradcore's median
time, the floor measured in the same run (a copy of the logits into a preallocated
buffer for cross-entropy; ``np.subtract(a, b, out=c)`` for MSE), their ratio, the
textbook NumPy version, PyTorch eager forward+backward and JAX ``jit(value_and_grad)``
where installed, and gradcore's peak extra memory (tracemalloc) in three memory modes:
a fresh gradient (extra beyond the gradient itself), ``out=`` and ``inplace=True``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import gradcore

from ._common import machine, peak_extra_bytes, run_times

CE_SHAPES = [(8192, 1000), (2048, 32000), (512, 128256)]
MSE_SIZE = 16 * 1024 * 1024


# --- peers ------------------------------------------------------------------------------


def textbook_ce(x: np.ndarray, y: np.ndarray) -> tuple[Any, np.ndarray]:
    """Softmax cross-entropy the way a NumPy user writes it: one temporary per step."""
    n = x.shape[0]
    rows = np.arange(n)
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    loss = -np.mean(np.log(p[rows, y]))
    p[rows, y] -= 1.0
    p /= n
    return loss, p


def textbook_mse(a: np.ndarray, b: np.ndarray) -> tuple[Any, np.ndarray]:
    d = a - b
    return np.mean(d * d), 2.0 / d.size * d


def torch_ce(x: np.ndarray, y: np.ndarray) -> Callable[[], Any] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = torch.from_numpy(y.astype(np.int64))

    def run() -> Any:
        xt.grad = None
        loss = F.cross_entropy(xt, yt)
        loss.backward()
        return loss, xt.grad

    return run


def torch_mse(a: np.ndarray, b: np.ndarray) -> Callable[[], Any] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    at = torch.from_numpy(a.copy()).requires_grad_(True)
    bt = torch.from_numpy(b)

    def run() -> Any:
        at.grad = None
        loss = F.mse_loss(at, bt)
        loss.backward()
        return loss, at.grad

    return run


def jax_ce(x: np.ndarray, y: np.ndarray) -> Callable[[], Any] | None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None

    def ce(logits: Any, labels: Any) -> Any:
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
        return jnp.mean(lse - picked)

    f = jax.jit(jax.value_and_grad(ce))
    xj, yj = jnp.asarray(x), jnp.asarray(y.astype(np.int32))

    def run() -> Any:
        return jax.block_until_ready(f(xj, yj))

    return run


def jax_mse(a: np.ndarray, b: np.ndarray) -> Callable[[], Any] | None:
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    f = jax.jit(jax.value_and_grad(lambda p, t: jnp.mean((p - t) ** 2)))
    aj, bj = jnp.asarray(a), jnp.asarray(b)

    def run() -> Any:
        return jax.block_until_ready(f(aj, bj))

    return run


# --- cases ------------------------------------------------------------------------------


#: Fastest run of each timed case, keyed like the row's ``*_s`` entries (see ``_time``).
_best: dict[str, float] = {}


def _time(fn: Callable[[], Any] | None, repeats: int, key: str = "") -> float | None:
    """Median time; the fastest run is kept in ``_best[key]`` (robust on a busy machine)."""
    if fn is None:
        return None
    times = run_times(fn, repeats=repeats, warmup=1)
    if key:
        _best[key] = min(times)
    return statistics.median(times)


def bench_ce(
    shape: tuple[int, int], dtype: str, repeats: int, peers: bool, generic: bool
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float64).astype(dtype)
    y = rng.integers(0, shape[1], size=shape[0])
    buf = np.empty_like(x)
    scratch = x.copy()
    row: dict[str, Any] = {"kernel": "softmax_cross_entropy", "shape": shape, "dtype": dtype}
    row["floor_s"] = _time(lambda: np.copyto(buf, x), repeats, "floor")
    row["gradcore_s"] = _time(lambda: gradcore.softmax_cross_entropy(x, y), repeats, "new")
    row["out_s"] = _time(lambda: gradcore.softmax_cross_entropy(x, y, out=buf), repeats, "out")
    row["inplace_s"] = _time(
        lambda: gradcore.softmax_cross_entropy(scratch, y, inplace=True), repeats, "inplace"
    )
    row["fresh_floor_s"] = _time(lambda: np.copyto(np.empty_like(x), x), repeats)
    if generic:
        with gradcore.use_fast_paths(False):
            row["generic_s"] = _time(lambda: gradcore.softmax_cross_entropy(x, y), 3)
    if peers:
        row["textbook_s"] = _time(lambda: textbook_ce(x, y), repeats)
        row["torch_s"] = _time(torch_ce(x, y), repeats)
        row["jax_s"] = _time(jax_ce(x, y), repeats)
    row["extra_bytes"] = peak_extra_bytes(lambda: gradcore.softmax_cross_entropy(x, y)) - x.nbytes
    row["out_bytes"] = peak_extra_bytes(lambda: gradcore.softmax_cross_entropy(x, y, out=buf))
    row["inplace_bytes"] = peak_extra_bytes(
        lambda: gradcore.softmax_cross_entropy(scratch, y, inplace=True)
    )
    row["array_bytes"] = x.nbytes
    row["best_s"] = dict(_best)
    return row


def bench_mse(size: int, dtype: str, repeats: int, peers: bool, generic: bool) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(size, dtype=np.float64).astype(dtype)
    b = rng.standard_normal(size, dtype=np.float64).astype(dtype)
    c = np.empty_like(a)
    scratch = a.copy()
    row: dict[str, Any] = {"kernel": "mse", "shape": (size,), "dtype": dtype}
    row["floor_s"] = _time(lambda: np.subtract(a, b, out=c), repeats, "floor")
    row["gradcore_s"] = _time(lambda: gradcore.mse(a, b), repeats, "new")
    row["out_s"] = _time(lambda: gradcore.mse(a, b, out=c), repeats, "out")
    row["inplace_s"] = _time(lambda: gradcore.mse(scratch, b, inplace=True), repeats, "inplace")
    row["fresh_floor_s"] = _time(lambda: np.subtract(a, b), repeats)
    if generic:
        with gradcore.use_fast_paths(False):
            row["generic_s"] = _time(lambda: gradcore.mse(a, b), 3)
    if peers:
        row["textbook_s"] = _time(lambda: textbook_mse(a, b), repeats)
        row["torch_s"] = _time(torch_mse(a, b), repeats)
        row["jax_s"] = _time(jax_mse(a, b), repeats)
    row["extra_bytes"] = peak_extra_bytes(lambda: gradcore.mse(a, b)) - a.nbytes
    row["out_bytes"] = peak_extra_bytes(lambda: gradcore.mse(a, b, out=c))
    row["inplace_bytes"] = peak_extra_bytes(lambda: gradcore.mse(scratch, b, inplace=True))
    row["array_bytes"] = a.nbytes
    row["best_s"] = dict(_best)
    return row


# --- report -----------------------------------------------------------------------------


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Two markdown tables: times against the floor and peers, then memory."""
    head = (
        "| kernel | shape | gradcore ms | floor ms | ratio | out= ms | ratio "
        "| inplace ms | ratio | fresh floor ms | ratio new/fresh "
        "| generic ms | textbook ms | torch ms | jax ms |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        floor = r["floor_s"]
        lines.append(
            f"| {r['kernel']} {r['dtype']} | {'x'.join(map(str, r['shape']))} "
            f"| {_ms(r['gradcore_s'])} | {_ms(floor)} | {r['gradcore_s'] / floor:.2f} "
            f"| {_ms(r['out_s'])} | {r['out_s'] / floor:.2f} "
            f"| {_ms(r['inplace_s'])} | {r['inplace_s'] / floor:.2f} "
            f"| {_ms(r['fresh_floor_s'])} | {r['gradcore_s'] / r['fresh_floor_s']:.2f} "
            f"| {_ms(r.get('generic_s'))} "
            f"| {_ms(r.get('textbook_s'))} | {_ms(r.get('torch_s'))} | {_ms(r.get('jax_s'))} |"
        )
    lines += [
        "",
        "| kernel | shape | best-run ratio new / out= / inplace "
        "| extra MiB beyond the gradient (% of input) | out= MiB | inplace MiB |",
        "|" + "---|" * 6,
    ]
    for r in rows:
        best = r["best_s"]
        extra = max(r["extra_bytes"], 0)
        lines.append(
            f"| {r['kernel']} {r['dtype']} | {'x'.join(map(str, r['shape']))} "
            f"| {best['new'] / best['floor']:.2f} / {best['out'] / best['floor']:.2f} "
            f"/ {best['inplace'] / best['floor']:.2f} "
            f"| {_mib(extra)} ({100 * extra / r['array_bytes']:.2f}%) "
            f"| {_mib(r['out_bytes'])} | {_mib(r['inplace_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.xent", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--no-peers", action="store_true", help="skip textbook/torch/jax")
    parser.add_argument("--threads", type=int, default=None, help="gradcore threads")
    ns = parser.parse_args(argv)
    repeats = 5 if ns.quick else 11
    if ns.threads is not None:
        gradcore.set_num_threads(ns.threads)
    peers = not ns.no_peers
    generic = not ns.quick  # the generic path takes seconds per call at these sizes
    rows = [bench_ce(shape, "float32", repeats, peers, generic) for shape in CE_SHAPES]
    rows.append(bench_mse(MSE_SIZE, "float32", repeats, peers, generic))
    print(f"machine: {machine()}; gradcore threads: {gradcore.get_num_threads()}")
    print(
        f"median of {repeats} runs after one warm-up; ratio = time / floor (medians); "
        "fresh floor = the floor writing into a newly allocated array (first-touch page "
        "faults), the fair floor for a call that returns a new gradient; best-run ratio = "
        "fastest run / fastest floor run"
    )
    print(format_table(rows))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {"machine": machine(), "threads": gradcore.get_num_threads(), "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
