"""Scaling out: data-parallel fit over MPI, and the Dask losses' per-block fast path.

``mpi``: one epoch of the wide MLP (784-1024-1024-10, 8192 synthetic samples, global
batch 512, SGD with momentum, float32) trained by :func:`gradcore.train.fit` as

- 1 rank x 2 threads (one process, the CPU fast paths and BLAS on 2 threads),
- 2 ranks x 1 thread (``mpiexec -n 2``, ``fit(..., comm=init())``),
- 1 rank x 1 thread (the compute per sample of one core, for the projection),

each in its own processes (thread counts are fixed at start-up), the pair alternated
twice. Reported: the median epoch time (rank 0's ``History.epoch_time``), the
all-reduce's time per step inside ``fit`` (which includes waiting for the slower rank)
and, after training, the same all-reduce alone (a barrier, then 30 calls), and the bytes
per step. From them, a projection of ring all-reduce cost
``2(p-1)/p * bytes / bandwidth + 2(p-1) * latency`` for p = 8, 64, 512 ranks on 25 GB/s
links, and the global batch at which compute stays >= 90% of a step.

``dask``: softmax cross-entropy (loss and gradient) of (262144, 1000) float32 logits in
64 row chunks, on a 2-worker ``LocalCluster(processes=False)`` (the logits generated and
persisted on the workers first), as NumPy's fast path on the same array in memory (with a
fresh gradient, and with ``out=`` a gradient allocated once), the
Dask per-block fast path, and the generic Dask path (``use_fast_paths(False)``); the
gradients are persisted on the workers (not gathered), the loss computed. Targets:
per-block Dask within 2x of NumPy, >= 10x faster than the generic Dask path.

Run: ``python benches/distributed_bench.py mpi [--repeats 3]`` and
``python benches/distributed_bench.py dask [--rows 262144] [--classes 1000]
[--chunks 64] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = Path(__file__).resolve().parent.parent
SIZES = [784, 1024, 1024, 10]
SAMPLES, BATCH = 8192, 512
LINK_BYTES_PER_S = 25e9
HOP_LATENCY_S = 5e-6  # per ring step on a fabric link (assumed; loopback is measured)


# --- MPI ------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    """One configuration, in its own process(es); rank 0 writes the measurements."""
    import gradcore
    from gradcore import nn, optim
    from gradcore.distributed import init
    from gradcore.train import fit

    comm = init()
    gradcore.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((SAMPLES, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=SAMPLES)
    model = nn.MLP(SIZES, "relu", seed=0, dtype="float32")

    spent = {"seconds": 0.0, "calls": 0, "bytes": 0}
    real = comm.allreduce_

    def timed(arrays: Any) -> Any:
        t0 = time.perf_counter()
        out = real(arrays)
        spent["seconds"] += time.perf_counter() - t0
        spent["calls"] += 1
        spent["bytes"] = sum(int(a.size) * a.dtype.itemsize for a in arrays)
        return out

    comm.allreduce_ = timed  # type: ignore[method-assign]
    per_epoch: list[dict[str, float]] = []

    def after_epoch(epoch: int, history: Any) -> None:
        per_epoch.append(dict(spent))
        spent["seconds"], spent["calls"] = 0.0, 0

    history = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.SGD(lr=0.01, momentum=0.9),
        epochs=1 + args.repeats,
        batch_size=BATCH,
        progress=False,
        callback=after_epoch,
        comm=comm if comm.size > 1 else None,
    )
    steps = -(-SAMPLES // BATCH)
    result: dict[str, Any] = {
        "ranks": comm.size,
        "threads": args.threads,
        "epoch_s": statistics.median(history.epoch_time[1:]),
        "epochs_s": history.epoch_time[1:],
        "final_loss": history.loss[-1],
    }
    if comm.size > 1:
        # The update's all-reduce (skipping the first epoch's), per step, inside fit.
        ar = [e["seconds"] / steps for e in per_epoch[1:]]
        result["allreduce_in_fit_s"] = statistics.median(ar)
        params = sum(int(v.size) for v in model.state_dict().values())
        buf = [np.zeros(params, np.float32), np.zeros(3, np.float32)]
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(30):
            real(buf)
        result["allreduce_alone_s"] = (time.perf_counter() - t0) / 30
        result["bytes_per_step"] = (params + 3) * 4
    if comm.rank == 0:
        Path(args.json).write_text(json.dumps(result), encoding="utf-8")


def _mpiexec() -> str:
    here = Path(sys.executable)
    for folder in (here.parent, here.resolve().parent, Path(sys.base_prefix) / "bin"):
        if (folder / "mpiexec").is_file():
            return str(folder / "mpiexec")
    found = shutil.which("mpiexec")
    if found is None:
        raise SystemExit("no mpiexec: pip install 'gradcore[mpi]'")
    return found


def _run_config(ranks: int, threads: int, repeats: int) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["GRADCORE_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "_worker", "--threads", str(threads)]
        cmd += ["--repeats", str(repeats), "--json", str(out)]
        if ranks > 1:
            cmd = [_mpiexec(), "-n", str(ranks), *cmd]
        else:
            env["GRADCORE_MPI"] = "0"
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        return dict(json.loads(out.read_text(encoding="utf-8")))


def _ring_seconds(p: int, nbytes: float) -> float:
    return 2 * (p - 1) / p * nbytes / LINK_BYTES_PER_S + 2 * (p - 1) * HOP_LATENCY_S


def bench_mpi(repeats: int) -> None:
    from _common import machine

    print(f"machine: {machine()}")
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {(1, 2): [], (2, 1): [], (1, 1): []}
    for config in [(1, 2), (2, 1), (2, 1), (1, 2), (1, 1)]:
        runs[config].append(_run_config(*config, repeats))
    print()
    print("| configuration | epoch (median of runs) | all-reduce per step in fit | alone |")
    print("|---|---|---|---|")
    for (ranks, threads), results in runs.items():
        epoch = statistics.median(r["epoch_s"] for r in results)
        ar = alone = "-"
        if ranks > 1:
            ar = f"{1e3 * statistics.median(r['allreduce_in_fit_s'] for r in results):.1f} ms"
            alone = f"{1e3 * statistics.median(r['allreduce_alone_s'] for r in results):.1f} ms"
        epochs = ", ".join(f"{e:.2f}" for r in results for e in r["epochs_s"])
        print(f"| {ranks} rank x {threads} thread | {epoch:.3f} s ({epochs}) | {ar} | {alone} |")
    multi = runs[(2, 1)][0]
    nbytes = multi["bytes_per_step"]
    steps = -(-SAMPLES // BATCH)
    one_core = statistics.median(r["epoch_s"] for r in runs[(1, 1)])
    per_sample = one_core / SAMPLES
    ar_fit = statistics.median(r["allreduce_in_fit_s"] for r in runs[(2, 1)])
    step = statistics.median(r["epoch_s"] for r in runs[(2, 1)]) / steps
    print()
    print(f"bytes per step: {nbytes:,} ({nbytes / 2**20:.2f} MiB, one flat float32 buffer)")
    print(f"2 ranks: all-reduce {1e3 * ar_fit:.1f} ms of a {1e3 * step:.1f} ms step "
          f"({100 * ar_fit / step:.0f}%)")  # fmt: skip
    print(f"compute per sample on one core: {1e3 * per_sample:.3f} ms")
    print()
    print("| ranks p | ring all-reduce | rows per rank for >= 90% | global batch |")
    print("|---|---|---|---|")
    for p in (8, 64, 512):
        t = _ring_seconds(p, nbytes)
        rows = int(np.ceil(9 * t / per_sample))
        print(f"| {p} | {1e3 * t:.2f} ms | {rows} | {p * rows:,} |")


# --- Dask -----------------------------------------------------------------------------------


def bench_dask(rows: int, classes: int, chunks: int, repeats: int) -> None:
    import dask.array as da
    import distributed
    from _common import machine

    import gradcore

    print(f"machine: {machine()}")
    print(f"logits ({rows}, {classes}) float32 in {chunks} row chunks; 2-worker LocalCluster")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        rng = da.random.default_rng(0)
        X = (3 * rng.standard_normal((rows, classes), chunks=(rows // chunks, classes))).astype(
            np.float32
        )
        # Other labels for every run: a graph that is computed again would otherwise find
        # its results still held by the cluster.
        Ys = [rng.integers(0, classes, size=rows, chunks=rows // chunks) for _ in range(3)]
        X, *Ys = client.persist([X, *Ys])
        distributed.wait([X, *Ys])
        x, *ys = client.compute([X, *Ys], sync=True)

        grad_buffer = np.empty_like(x)

        def numpy_path(k: int) -> Any:
            return gradcore.softmax_cross_entropy(x, ys[k])

        def numpy_out_path(k: int) -> Any:
            # The same kernel writing into a gradient allocated once: a fresh 1 GB
            # array costs a page fault per 4 KiB on first touch.
            return gradcore.softmax_cross_entropy(x, ys[k], out=grad_buffer)

        def dask_path(fast: bool, k: int) -> Any:
            with gradcore.use_fast_paths(fast):
                loss, grad = gradcore.softmax_cross_entropy(X, Ys[k])
            # Gradient blocks stay on the workers (persisted, as training would use
            # them); the loss comes back. One submission: each block is computed once.
            grad, loss = client.persist([grad, loss])
            distributed.wait([grad, loss])
            value = loss.compute()
            del grad, loss
            return value

        with gradcore.use_fast_paths(True):
            tasks_fast = len(gradcore.softmax_cross_entropy(X, Ys[0])[1].__dask_graph__())
        with gradcore.use_fast_paths(False):
            tasks_generic = len(gradcore.softmax_cross_entropy(X, Ys[0])[1].__dask_graph__())
        ref = float(numpy_path(0)[0])
        checks = (float(dask_path(True, 0)), float(dask_path(False, 0)))
        names = ("numpy", "numpy_out", "dask_fast", "dask_generic")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):  # interleaved: the machine is shared and noisy
            k = 1 + r % 2
            for name, fn in (
                ("numpy", lambda k=k: numpy_path(k)),
                ("numpy_out", lambda k=k: numpy_out_path(k)),
                ("dask_fast", lambda k=k: dask_path(True, k)),
                ("dask_generic", lambda k=k: dask_path(False, k)),
            ):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"losses: numpy {ref:.6f}, dask fast {checks[0]:.6f}, dask generic {checks[1]:.6f}")
    print(f"graph of the gradient: {tasks_fast} tasks (per block), {tasks_generic} (generic)")
    print()
    print("| path | median | runs |")
    print("|---|---|---|")
    for name, value in med.items():
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {value:.3f} s | {runs} |")
    print()
    print(f"dask per-block / numpy: {med['dask_fast'] / med['numpy']:.2f}x (target <= 2)")
    print(f"dask per-block / numpy out=: {med['dask_fast'] / med['numpy_out']:.2f}x")
    print(f"dask generic / per-block: {med['dask_generic'] / med['dask_fast']:.1f}x (target >= 10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mpi")
    m.add_argument("--repeats", type=int, default=3, help="timed epochs per run")
    d = sub.add_parser("dask")
    d.add_argument("--rows", type=int, default=262144)
    d.add_argument("--classes", type=int, default=1000)
    d.add_argument("--chunks", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3)
    w = sub.add_parser("_worker")
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--repeats", type=int, required=True)
    w.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.what == "mpi":
        bench_mpi(args.repeats)
    elif args.what == "dask":
        bench_dask(args.rows, args.classes, args.chunks, args.repeats)
    else:
        _worker(args)


if __name__ == "__main__":
    main()
