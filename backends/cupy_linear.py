r"""CuPy fast path of :func:`gradcore.linear_cross_entropy`: cuBLAS and the fused CUDA
cross-entropy, chunk by chunk, without a host synchronisation.

Per chunk of rows, on the current stream:

1. ``Z = x_chunk @ W (+ b)`` into one reused chunk buffer (cuBLAS);
2. with ``softcap``, one elementwise kernel writes ``c * tanh(Z / c)`` over ``Z`` and the
   cap's derivative ``1 - tanh^2`` into a second chunk buffer;
3. the fused CUDA cross-entropy (:mod:`gradcore.backends.cupy`) overwrites ``Z`` with the
   gradient of the chunk's summed loss (times the cap's derivative, with a soft-cap);
4. ``dx_chunk = inv * G @ W.T`` and ``dW = inv * x_chunk.T @ G + dW`` by ``gemm`` with
   ``beta = 1`` (no ``dW``-sized temporary), ``db += inv * sum(G)``.

``inv`` is the reciprocal of the ``"mean"`` divisor, computed from the labels on the
device before the first chunk and passed to cuBLAS as a device pointer, so no value
ever travels to the host. float16 inputs keep the chunk's logits, their
gradient and ``dW``/``db`` in float32 (the products with ``W`` run in the input dtype with
float32 accumulation), rounded once at the end. float64, bfloat16 and anything unusual
(other devices, non-contiguous ``W``) return ``NotImplemented``: the generic body runs.

This module registers itself on import; ``gradcore.backends.cupy`` imports it.
"""

from __future__ import annotations

import math
from typing import Any

from gradcore._dispatch import register_fast_path
from gradcore.linear_xent import _validate_lxent
from gradcore.losses import softmax_cross_entropy

try:
    import cupy
    import cupy.cublas
except ImportError:  # pragma: no cover - exercised on machines without CuPy
    cupy = None

__all__ = ["linear_cross_entropy"]

_softcap_kernel: Any = None


def _softcap(z: Any, d: Any, cap: float) -> None:
    """``z <- cap * tanh(z / cap)`` and ``d <- 1 - tanh(z / cap)^2``, one pass (float32)."""
    global _softcap_kernel
    if _softcap_kernel is None:
        _softcap_kernel = cupy.ElementwiseKernel(
            "float32 c",
            "float32 z, float32 d",
            "float t = tanhf(z / c); z = c * t; d = 1.0f - t * t;",
            "gradcore_lxent_softcap",
        )
    _softcap_kernel(cupy.float32(cap), z, d)


def _usable(*arrays: Any) -> bool:
    """CuPy arrays (None skipped), all on the first one's device."""
    dev = None
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, cupy.ndarray):
            return False
        if dev is None:
            dev = a.device.id
        elif a.device.id != dev:
            return False
    return True


#: Half-precision dtypes handled here (bfloat16 CuPy arrays are not dependable across
#: CuPy versions; they take the generic body).
_HALF = ("float16",)


@register_fast_path("cupy", "linear_cross_entropy")
def linear_cross_entropy(
    x: Any,
    W: Any,
    labels: Any,
    /,
    *,
    bias: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    need_dx: bool = True,
    check_labels: bool | None = None,
) -> Any:
    """CuPy :func:`gradcore.linear_cross_entropy` (see the module docstring)."""
    if cupy is None or not _usable(x, W, labels, bias, weight):
        return NotImplemented
    name = str(x.dtype)
    if name not in ("float32", *_HALF) or W.dtype != x.dtype:
        return NotImplemented
    if bias is not None and bias.dtype != x.dtype:
        return NotImplemented
    if str(labels.dtype) == "uint64" or not W.flags.c_contiguous:
        return NotImplemented
    args = _validate_lxent(
        x, W, labels, bias=bias, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, need_dx=need_dx, check_labels=check_labels, xp=cupy,
    )  # fmt: skip
    if args.n_rows == 0 or args.n_in == 0:
        return NotImplemented
    with cupy.cuda.Device(x.device.id):
        return _run(x, W, labels, bias, weight, args, need_dx)


def _run(x: Any, W: Any, labels: Any, bias: Any, weight: Any, args: Any, need_dx: bool) -> Any:
    N, H, V = args.n_rows, args.n_in, args.n_classes
    f32 = cupy.float32
    half = str(x.dtype) in _HALF
    rows = min(args.chunk_rows, N)
    X = cupy.ascontiguousarray(x.reshape(N, H))
    Y = labels.reshape((N, V) if args.soft else (N,))

    # The mean's divisor, on the device: no synchronisation.
    if args.reduction == "mean":
        if args.soft:
            divisor = cupy.asarray(float(N), dtype=f32)
        else:
            lab = Y.astype(cupy.int64)
            active = (lab != args.ignore_index) & (lab >= 0) & (lab < V)
            if weight is None:
                divisor = cupy.sum(active, dtype=cupy.float64).astype(f32)
            else:
                picked = weight.astype(cupy.float64)[cupy.clip(lab, 0, V - 1)]
                divisor = cupy.sum(cupy.where(active, picked, 0.0)).astype(f32)
        empty = divisor == 0
        inv = f32(1.0) / cupy.where(empty, f32(1.0), divisor)
        # A zero divisor with rows not ignored (their class weights all 0) is PyTorch's
        # 0/0: NaN gradient rows, as the generic body gives them, never a silent zero.
        nan_rows = None if args.soft else empty & active
    else:
        divisor = empty = cupy.zeros((), dtype=f32)  # unused
        inv = cupy.asarray(1.0, dtype=f32)
        nan_rows = None

    xent = {
        "weight": weight,
        "ignore_index": args.ignore_index,
        "label_smoothing": args.label_smoothing,
        "reduction": "none" if args.reduction == "none" else "sum",
        "z_loss": args.z_loss,
        "check_labels": False,
    }
    Z = cupy.empty((rows, V), dtype=f32)  # the chunk's logits, then their gradient
    Zh = cupy.empty((rows, V), dtype=x.dtype) if half else None
    D = cupy.empty((rows, V), dtype=f32) if args.softcap is not None else None
    dx = cupy.empty((N, H), dtype=x.dtype) if need_dx else None
    dW = cupy.empty((H, V), dtype=f32)
    db = None if bias is None else cupy.zeros(V, dtype=f32)
    b32 = None if bias is None else bias.astype(f32)
    row_loss = cupy.empty(N, dtype=f32) if args.reduction == "none" else None
    total = cupy.zeros((), dtype=f32)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        n = r1 - r0
        z, xc = Z[:n], X[r0:r1]
        if half:
            zh = Zh[:n]  # type: ignore[index]
            cupy.matmul(xc, W, out=zh)  # float32 accumulation inside cuBLAS
            z[...] = zh
        else:
            cupy.matmul(xc, W, out=z)
        if b32 is not None:
            z += b32
        if D is not None:
            _softcap(z, D[:n], float(args.softcap))
        loss_c, g = softmax_cross_entropy(z, Y[r0:r1], inplace=True, **xent)
        if D is not None:
            g *= D[:n]
        if nan_rows is not None:
            cupy.copyto(g, f32(math.nan), where=nan_rows[r0:r1, None])  # no host sync
        if row_loss is not None:
            row_loss[r0:r1] = loss_c
        else:
            total += loss_c
        if dx is not None:
            if half:
                # G in the input dtype times W (float32 accumulation), then the divisor.
                zh[...] = g
                cupy.matmul(zh, W.T, out=dx[r0:r1])
                dx[r0:r1] *= inv.astype(x.dtype)
            else:
                cupy.cublas.gemm("N", "T", g, W, out=dx[r0:r1], alpha=inv, beta=0.0)
        xc32 = xc.astype(f32) if half else xc
        cupy.cublas.gemm("T", "N", xc32, g, out=dW, alpha=inv, beta=0.0 if r0 == 0 else 1.0)
        if db is not None:
            db += cupy.sum(g, axis=0) * inv

    if row_loss is not None:
        loss = row_loss.reshape(x.shape[:-1]).astype(x.dtype)
    elif args.reduction == "mean":
        safe = cupy.where(empty, f32(1.0), divisor)
        loss = cupy.where(empty, f32(math.nan), total / safe).astype(x.dtype)
    else:
        loss = total.astype(x.dtype)
    dx_out = None if dx is None else dx.reshape(x.shape)
    dW_out = dW.astype(x.dtype) if half else dW
    db_out = None if db is None else db.astype(x.dtype)
    return loss, dx_out, dW_out, db_out
