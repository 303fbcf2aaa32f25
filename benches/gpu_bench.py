"""GPU benchmark of the fused softmax cross-entropy (loss + gradient) on CuPy.

For each shape and dtype it times, with CUDA events (median of many runs after a
warm-up), on the current device:

- ``fused``     gradcore's fused kernel, ``inplace=True`` (the logits become the gradient)
- ``fused_out`` the same into a preallocated ``out=`` buffer
- ``copy``      a device-to-device copy of the logits: the memory floor (read + write)
- ``generic``   gradcore's generic array-API code on CuPy (fast paths off; float32 only)
- ``torch``     PyTorch eager ``cross_entropy`` forward + backward, when torch has CUDA

and the peak extra device memory of the fused call (CuPy's memory pool, beyond the
inputs). Targets: fused <= 1.25x copy, >= 3x faster than torch, and no logits-sized
allocation with ``inplace=True``.

Run: ``python benches/gpu_bench.py [--quick] [--runs 50]``. The last lines printed are
a short table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from typing import Any


def _time(cp: Any, fn: Callable[[], Any], runs: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``runs`` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(runs):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def _peak_extra(cp: Any, fn: Callable[[], Any]) -> int:
    """Bytes the memory pool grows by during ``fn`` (results kept until it returns)."""
    pool = cp.get_default_memory_pool()
    cp.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    result = fn()
    cp.cuda.get_current_stream().synchronize()
    grown = pool.total_bytes() - before
    del result
    return int(grown)


def bench(shape: tuple[int, int], dtype: str, runs: int) -> dict[str, Any]:
    import cupy as cp
    from gradcore.backends import cupy as gcp

    import gradcore

    n, c = shape
    rng = cp.random.default_rng(0)
    x32 = rng.standard_normal(shape, dtype=cp.float32) * 2
    labels = rng.integers(0, c, size=n, dtype=cp.int64)
    if dtype == "bfloat16":
        bits = x32.view(cp.uint32)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        del bits

        def fused(a: Any, **kw: Any) -> Any:
            return gcp.softmax_cross_entropy_bf16(a, labels, **kw)
    else:
        x = x32.astype(dtype)

        def fused(a: Any, **kw: Any) -> Any:
            return gradcore.softmax_cross_entropy(a, labels, **kw)

    del x32
    row: dict[str, Any] = {"shape": f"{n}x{c}", "dtype": dtype}
    work = x.copy()
    out = cp.empty_like(x)
    # Inplace keeps overwriting `work` with gradients; values stay finite (|g| <= 1) and
    # the kernel does the same work whatever the values, so timing is unaffected.
    row["fused"] = _time(cp, lambda: fused(work, inplace=True), runs)
    row["fused_out"] = _time(cp, lambda: fused(x, out=out), runs)
    row["copy"] = _time(cp, lambda: cp.copyto(out, x), runs)
    row["extra_MiB_inplace"] = _peak_extra(cp, lambda: fused(work, inplace=True)) / 2**20
    row["logits_MiB"] = x.nbytes / 2**20
    launch = gcp.choose_xent_launch(
        n,
        c,
        vec=gcp.vector_width(c, [x.dtype.itemsize] * 2, [int(x.data.ptr), int(out.data.ptr)]),
        soft=False,
        cluster_ok=int(cp.cuda.Device().compute_capability) >= 90,
    )
    row["variant"] = f"{launch.variant}/{launch.block}x{launch.cluster}"
    if dtype == "float32":
        with gradcore.use_fast_paths(False):
            row["generic"] = _time(cp, lambda: gradcore.softmax_cross_entropy(x, labels), 3, 1)
    try:
        import torch

        if torch.cuda.is_available():
            tdtype = {"float32": torch.float32, "float16": torch.float16}.get(dtype, torch.bfloat16)
            tx = torch.from_dlpack(x32_for_torch(cp, x, dtype)).to(tdtype)
            ty = torch.from_dlpack(labels)

            def torch_step() -> None:
                leaf = tx.detach().requires_grad_(True)
                torch.nn.functional.cross_entropy(leaf, ty).backward()

            row["torch"] = _time(cp, torch_step, max(5, runs // 4))
    except ImportError:
        pass
    return row


def x32_for_torch(cp: Any, x: Any, dtype: str) -> Any:
    """The benchmark's logits as float32 for torch (bfloat16 bits widened exactly)."""
    if dtype == "bfloat16":
        return (x.astype(cp.uint32) << 16).view(cp.float32)
    return x.astype(cp.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer runs")
    args = parser.parse_args(argv)
    try:
        import cupy as cp

        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as exc:  # no CuPy, or no device
        print(f"gpu_bench: no CUDA device through CuPy ({exc}); nothing to measure")
        return 0
    shapes = [(8192, 32000), (8192, 128256)] if not args.quick else [(1024, 32000)]
    runs = args.runs if not args.quick else 10
    rows = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            try:
                rows.append(bench(shape, dtype, runs))
            except Exception as exc:  # report and carry on with the other shapes
                rows.append({"shape": f"{shape[0]}x{shape[1]}", "dtype": dtype, "error": exc})
            cp.get_default_memory_pool().free_all_blocks()

    print(f"\nfused softmax cross-entropy, loss + gradient, on {name} (median ms, CUDA events)")
    header = (
        f"{'shape':>12} {'dtype':>9} {'variant':>16} {'fused':>7} {'out=':>7} {'copy':>7} "
        f"{'x copy':>6} {'generic':>8} {'torch':>7} {'x faster':>8} {'extra MiB':>9}"
    )
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>12} {r['dtype']:>9} error: {r['error']!r}")
            continue
        ratio = r["fused"] / r["copy"]
        speedup = r["torch"] / r["fused"] if "torch" in r else float("nan")
        generic = f"{r['generic']:8.2f}" if "generic" in r else f"{'-':>8}"
        torch_ms = f"{r['torch']:7.2f}" if "torch" in r else f"{'-':>7}"
        print(
            f"{r['shape']:>12} {r['dtype']:>9} {r['variant']:>16} {r['fused']:7.3f} "
            f"{r['fused_out']:7.3f} {r['copy']:7.3f} {ratio:6.2f} {generic} {torch_ms} "
            f"{speedup:8.1f} {r['extra_MiB_inplace']:9.1f}"
        )
    print("targets: x copy <= 1.25, x faster (than torch eager) >= 3, extra MiB << logits")
    ok = all("error" not in r for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
