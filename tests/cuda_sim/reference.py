"""Float64 references for the fused loss kernels, written from the documented formulas,
and the comparison helpers the GPU and simulator tests share."""

from __future__ import annotations

import math

import numpy as np


def ref_xent(
    x: np.ndarray,
    labels: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.functional.cross_entropy semantics plus z-loss, in float64.

    ``softcap=c``: the loss of ``c * tanh(x / c)``, its gradient chained through the cap.

    ``0 * log 0`` is 0: a ``-inf`` logit where the target (or its one-hot, or its class
    weight) is 0 contributes nothing. The mean's divisor (the class weights of the rows
    neither ignored nor out of range; the number of rows for soft targets) follows
    PyTorch when it is 0: the loss is NaN, every row that is not ignored has a NaN
    gradient, ignored rows a zero one.
    """
    x = x.astype(np.float64)
    cap_factor = 1.0
    if softcap is not None:
        th = np.tanh(x / softcap)
        x = softcap * th
        cap_factor = 1.0 - th * th
    C = x.shape[-1]
    eps = label_smoothing
    w = np.ones(C) if weight is None else weight.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = x.max(axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        lse = m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
        logp = x - lse
        p = np.exp(logp)
        if np.issubdtype(labels.dtype, np.floating):
            t = labels.astype(np.float64) * (1 - eps) + eps / C
            tw = t * w
            row = -np.where(tw != 0, tw * logp, 0.0).sum(-1) + z_loss * lse[..., 0] ** 2
            grad = (tw.sum(-1, keepdims=True) + 2 * z_loss * lse) * p - tw
            divisor = float(math.prod(x.shape[:-1]))
            bad = np.zeros(x.shape[:-1], dtype=bool)
            active = ~bad
        else:
            ignored = labels == ignore_index
            bad = ~ignored & ((labels < 0) | (labels >= C))
            active = ~ignored & ~bad
            y = np.where(active, labels, 0)
            onehot = np.arange(C) == y[..., None]
            wy = np.where(active, w[y], 0.0)
            row = (1 - eps) * wy * -np.where(onehot, logp, 0.0).sum(-1)
            if eps > 0:
                row = row + eps / C * -np.where(w != 0, w * logp, 0.0).sum(-1)
            row = row + z_loss * lse[..., 0] ** 2
            coef = (1 - eps) * wy + eps / C * w.sum() + 2 * z_loss * lse[..., 0]
            grad = coef[..., None] * p - (1 - eps) * wy[..., None] * onehot - eps / C * w
            row = np.where(active, row, 0.0)
            grad = np.where(active[..., None], grad, 0.0)
            divisor = wy.sum()
        if reduction == "mean":
            if divisor == 0:
                loss = np.asarray(np.nan)
                grad = np.where(active[..., None], np.nan, grad)
            else:
                loss = np.asarray(row.sum() / divisor)
                grad = grad / divisor
        elif reduction == "sum":
            loss = np.asarray(row.sum())
        else:
            loss = row
    grad = np.where(bad[..., None], np.nan, grad * cap_factor)
    loss = np.where(bad, np.nan, loss) if reduction == "none" else loss
    if reduction != "none" and bad.any():
        loss = np.asarray(np.nan)
    return loss, grad


def ref_pointwise(
    kind: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    weight: np.ndarray | None = None,
    pos_weight: np.ndarray | None = None,
    reduction: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    w = 1.0 if weight is None else weight.astype(np.float64)
    if kind == "mse":
        elem = w * (x - y) ** 2
        grad = 2 * w * (x - y)
    else:
        q = 1.0 if pos_weight is None else pos_weight.astype(np.float64)
        # softplus(-x) and softplus(x), without overflow
        sp_neg = np.logaddexp(0.0, -x)
        sp_pos = np.logaddexp(0.0, x)
        sig = 0.5 * (1 + np.tanh(0.5 * x))
        elem = w * (q * y * sp_neg + (1 - y) * sp_pos)
        grad = w * ((q * y + 1 - y) * sig - q * y)
    elem = np.broadcast_to(elem, x.shape)
    grad = np.broadcast_to(grad, x.shape)
    if reduction == "mean":
        return np.asarray(elem.sum() / x.size), grad / x.size
    if reduction == "sum":
        return np.asarray(elem.sum()), grad
    return elem, grad


# Tolerances (relative, and absolute as a fraction of the largest reference value): float32
# to 1e-5; float16 and bfloat16 are limited by the single rounding of each output (2**-11
# and 2**-8 relative) on top of float32 arithmetic on the rounded inputs.
TOL = {"float32": (1e-5, 1e-6), "float16": (2e-3, 1e-3), "bfloat16": (1e-2, 8e-3)}


def close(actual: np.ndarray, desired: np.ndarray, dtype: str, what: str) -> None:
    rtol, afrac = TOL[dtype]
    desired = np.asarray(desired, dtype=np.float64)
    finite = desired[np.isfinite(desired)]
    atol = afrac * (float(np.abs(finite).max()) if finite.size else 0.0)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), desired, rtol=rtol, atol=atol, err_msg=what
    )


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even; NaN stays NaN) as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(nan, (u >> 16) | 0x40, r).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def assert_rounded_to_nearest_even(
    bits: np.ndarray, ref: np.ndarray, dtype: str, what: str, *, cancel: float = 1e-7
) -> None:
    """Exact check of a 16-bit output: wherever the float64 reference is not within the
    float32 arithmetic's error of a rounding midpoint, the output must be the reference
    rounded to nearest even (a truncating or round-half-up conversion fails here).
    ``cancel``: the absolute error of a cancellation, as a fraction of the largest value."""
    ref = np.asarray(ref, dtype=np.float64).ravel()
    got = np.asarray(bits).ravel().view(np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        if dtype == "bfloat16":
            expected = bf16_bits(ref.astype(np.float32))
            rounded = bf16_values(expected).astype(np.float64)
            up = bf16_values((expected.astype(np.uint32) + 1).astype(np.uint16)).astype(np.float64)
        else:
            h = ref.astype(np.float16)
            expected = h.view(np.uint16)
            rounded = h.astype(np.float64)
            up = np.nextafter(h, np.float16(np.inf) * np.sign(h + np.float16(0))).astype(np.float64)
        ulp = np.abs(up - rounded)
        # distance from the nearest rounding midpoint, against the float32 arithmetic's
        # error (relative, plus absolute for the cancellations in a gradient)
        to_mid = np.abs(ulp / 2 - np.abs(ref - rounded))
        finite = np.isfinite(ref) & (ref != 0) & np.isfinite(ulp)
        scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
        safe = finite & (to_mid > 1e-5 * np.abs(ref) + cancel * scale)
    mismatch = safe & (got != expected)
    assert safe.sum() >= 0.5 * finite.sum(), f"{what}: too few elements away from a midpoint"
    assert not mismatch.any(), (
        f"{what}: {int(mismatch.sum())} of {int(safe.sum())} elements are not the reference "
        f"rounded to nearest even (first at {int(np.flatnonzero(mismatch)[0])})"
    )
