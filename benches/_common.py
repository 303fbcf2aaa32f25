"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any


def run_times(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 1) -> list[float]:
    """Wall times of ``fn()`` in seconds, ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    return statistics.median(run_times(fn, repeats=repeats, warmup=warmup))


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was live before.

    NumPy reports its data buffers to :mod:`tracemalloc`, so this counts every array a
    NumPy kernel allocates, including the ones it frees before returning.
    """
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak - base


def machine() -> str:
    """One line naming the CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"{model}, {cores} cores usable, Python {platform.python_version()}"
