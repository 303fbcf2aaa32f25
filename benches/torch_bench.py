"""PyTorch CPU forward+backward of softmax cross-entropy: gradcore.torch against PyTorch.

Run ``python -m benches.torch_bench`` (``--quick`` for fewer repeats, ``--no-compile``
to skip ``torch.compile``, ``--json PATH`` to keep the numbers). For float32 logits of
shape (2048, 32000) and (8192, 1000), integer labels, ``"mean"``, it times
``loss = f(x, y); loss.backward()`` with a fresh ``x.grad`` each call for

- ``torch``: :func:`torch.nn.functional.cross_entropy`, eager;
- ``torch compiled``: the same under ``torch.compile(fullgraph=True)``;
- ``gradcore``: :func:`gradcore.torch.cross_entropy`, eager;
- ``gradcore compiled``: the same under ``torch.compile(fullgraph=True)``;
- ``gradcore inplace``: :func:`gradcore.torch.cross_entropy` with ``inplace=True`` on
  logits that do not require grad: the loss, and the gradient written over the
  logits (in a training loop the backward then hands that storage on untouched);
- ``kernel``: the NumPy fast path alone on the tensors' NumPy views, writing into a
  fresh ``torch.empty_like`` buffer as the adapter does (what the adapter adds on top
  of it is the difference);
- ``copy``: ``torch.empty_like(x).copy_(x)``, a pass that reads the logits and writes a
  fresh logits-sized tensor: the floor of any fused loss that returns a new gradient.

``--device cuda`` (``--dtypes float32,bfloat16`` by default there) times the same on
CUDA tensors, each call to its completion (``torch.cuda.synchronize``), with
Liger-Kernel's ``LigerCrossEntropyLoss`` where it is installed and without the NumPy
``kernel`` column.

The methods are timed round-robin (one call of each per round, many rounds) and the
median per method is reported, so that load from other processes affects all of them
alike; ratios are taken within one run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import machine

SHAPES = [(2048, 32000), (8192, 1000)]


def _methods(x0: Any, y: Any, compile_: bool) -> dict[str, Callable[[], None]]:
    import torch
    import torch.nn.functional as F

    import gradcore
    import gradcore.torch as gt

    x = x0.clone().requires_grad_(True)

    def step(fn: Callable[[Any, Any], Any]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            fn(x, y).backward()

        return run

    methods = {"torch": step(F.cross_entropy), "gradcore": step(gt.cross_entropy)}
    if compile_:
        torch._dynamo.reset()
        methods["torch compiled"] = step(torch.compile(F.cross_entropy, fullgraph=True))
        methods["gradcore compiled"] = step(torch.compile(gt.cross_entropy, fullgraph=True))
    x_inplace = x0.clone()  # overwritten by its gradient each call: same work each time
    methods["gradcore inplace"] = lambda: gt.cross_entropy(x_inplace, y, inplace=True)
    if x0.device.type == "cpu":
        xn, yn = x0.numpy(), y.numpy()
        methods["kernel"] = lambda: gradcore.softmax_cross_entropy(
            xn, yn, out=torch.empty_like(x0).numpy()
        )
    else:
        liger = _liger()
        if liger is not None:
            # Liger overwrites its input with the gradient, as gradcore's inplace=True.
            methods["liger"] = step(liger())
    methods["copy"] = lambda: torch.empty_like(x0).copy_(x0)
    return methods


def _liger() -> Any:
    """Liger-Kernel's ``LigerCrossEntropyLoss`` class, or None when it is not installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss


def bench(
    shape: tuple[int, int], rounds: int, compile_: bool, device: str = "cpu", dtype: str = "float32"
) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(device=device, dtype=getattr(torch, dtype))
    y = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
    methods = _methods(x0, y, compile_)
    # On CUDA every call is timed to its completion on the device.
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    for fn in methods.values():  # warm-up, and compilation for the compiled ones
        fn()
        fn()
    sync()
    warmup_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return {"shape": list(shape), "device": device, "dtype": dtype, "ms": med, "warmup_s": warmup_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 21")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated logits dtypes (default: float32 on cpu, float32,bfloat16 on cuda)",
    )
    args = parser.parse_args(argv)
    dtypes = (args.dtypes or ("float32" if args.device == "cpu" else "float32,bfloat16")).split(",")

    import torch

    import gradcore

    rounds = 5 if args.quick else 21
    print(machine())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), NumPy {np.__version__}, "
        f"gradcore {gradcore.__version__} ({gradcore.get_num_threads()} threads); "
        f"median of {rounds} round-robin rounds, ms"
    )
    if args.device != "cpu":
        print(f"device {args.device}: {torch.cuda.get_device_name(args.device)}")
    results = []
    for shape, dtype in itertools.product(SHAPES, dtypes):
        r = bench(shape, rounds, not args.no_compile, args.device, dtype)
        results.append(r)
        ms = r["ms"]
        order = ("torch", "torch compiled", "gradcore", "gradcore compiled", "gradcore inplace")
        line = " | ".join(
            f"{k} {ms[k]:.1f}" for k in [*order, "liger", "kernel", "copy"] if k in ms
        )
        ratios = f"torch/gradcore {ms['torch'] / ms['gradcore']:.2f}x"
        if "torch compiled" in ms:
            ratios += f", torch compiled/gradcore {ms['torch compiled'] / ms['gradcore']:.2f}x"
            ratios += (
                f", torch compiled/gradcore compiled "
                f"{ms['torch compiled'] / ms['gradcore compiled']:.2f}x"
            )
        print(f"{shape[0]}x{shape[1]} {dtype}: {line} | {ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rounds": rounds, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
