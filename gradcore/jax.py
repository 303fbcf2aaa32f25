r"""JAX losses with gradcore's fused gradients: ``jax.custom_vjp`` functions.

``gradcore.jax`` gives ``softmax_cross_entropy``, ``linear_cross_entropy``, ``mse`` and
``binary_cross_entropy_with_logits`` as functions that ``jax.grad``,
``jax.value_and_grad``, ``jax.jit`` and ``jax.vmap`` understand::

    import jax, gradcore.jax as gj

    loss, grads = jax.value_and_grad(lambda p: gj.softmax_cross_entropy(f(p, x), y))(params)

The forward pass runs gradcore's generic kernel (under ``jit`` one fused XLA expression),
which yields the loss and its gradient together; the gradient is kept as the residual
and the backward pass only scales it by the incoming cotangent (a scalar for
``"mean"``/``"sum"``, one factor per row or element for ``"none"``). Autodiff through a
log-softmax would instead save the log-probabilities and rebuild the gradient in a
second expression.

Argument names follow optax where optax has the same loss (``logits``, ``labels``,
``axis``; ``predictions``, ``targets``), and the options follow
:func:`gradcore.softmax_cross_entropy` (PyTorch's semantics). Unlike optax, the default
``reduction`` is ``"mean"``; ``reduction="none"`` gives optax's per-example values.

Cotangents: the predictions/logits get the fused gradient; soft (floating) ``labels``
and ``targets`` get exact cotangents too, computed in the backward only (under ``jit``
XLA drops them when unused). ``weight`` and ``pos_weight`` are constants: no gradient
flows to them (as if wrapped in :func:`jax.lax.stop_gradient`). Integer labels have no
cotangent. Second derivatives (``jax.hessian``, grad of grad) are exact: JAX
differentiates the kernel's gradient expression, which the forward computes with
``jax.numpy`` operations.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import losses as _losses

__all__ = [
    "binary_cross_entropy_with_logits",
    "linear_cross_entropy",
    "mse",
    "softmax_cross_entropy",
]


def _scale(grad: Any, g: Any, axis: int | None) -> Any:
    """The cotangent ``g`` (0-d, or per row with the class ``axis`` removed) times ``grad``."""
    if g.ndim and axis is not None:
        g = jnp.expand_dims(g, axis)
    return (grad * g).astype(grad.dtype)


def _floating(a: Any) -> bool:
    return a is not None and jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)


# --- softmax cross-entropy ---------------------------------------------------------------


class _XentOptions(NamedTuple):
    axis: int
    ignore_index: int
    label_smoothing: float
    reduction: str
    z_loss: float
    softcap: float | None


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xent(options: _XentOptions, logits: Any, labels: Any, weight: Any) -> Any:
    loss, _ = _xent_kernel(options, logits, labels, weight)
    return loss


def _xent_kernel(options: _XentOptions, logits: Any, labels: Any, weight: Any) -> Any:
    return _losses.softmax_cross_entropy(
        logits,
        labels,
        axis=options.axis,
        weight=None if weight is None else jax.lax.stop_gradient(weight),
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction=options.reduction,
        z_loss=options.z_loss,
        softcap=options.softcap,
    )


def _xent_fwd(options: _XentOptions, logits: Any, labels: Any, weight: Any) -> Any:
    loss, grad = _xent_kernel(options, logits, labels, weight)
    soft = _floating(labels)
    # Soft labels need the logits again for their own cotangent (only if asked for).
    return loss, (grad, logits if soft else None, labels if soft else None, weight)


def _xent_bwd(options: _XentOptions, residuals: Any, g: Any) -> Any:
    grad, logits, labels, weight = residuals
    axis = options.axis % grad.ndim
    d_logits = _scale(grad, g, axis)
    d_labels = None
    if labels is not None:
        # loss_i = -sum_c w_c t'_ic log p_ic (+ z lse_i^2), t' = (1 - eps) t + eps / C:
        # d loss / d t_ic = -(1 - eps) w_c log p_ic, times the mean's 1/rows.
        eps = options.label_smoothing
        u = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if options.softcap is not None:
            u = options.softcap * jnp.tanh(u / options.softcap)
        logp = jax.nn.log_softmax(u, axis)
        shape = [1] * logp.ndim
        shape[axis] = -1
        d = -(1.0 - eps) * logp
        if weight is not None:
            d = d * jnp.reshape(jax.lax.stop_gradient(weight), shape)
        if options.reduction == "mean":
            d = d / (logp.size // logp.shape[axis])
        d_labels = _scale(d, g, axis).astype(labels.dtype)
    return d_logits, d_labels, None if weight is None else jnp.zeros_like(weight)


_xent.defvjp(_xent_fwd, _xent_bwd)


def softmax_cross_entropy(
    logits: Any,
    labels: Any,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Any:
    r"""Softmax cross-entropy with the fused gradient as its VJP.

    Parameters
    ----------
    logits : jax.Array, shape (..., C, ...)
        Unnormalised scores; the class axis is ``axis``.
    labels : jax.Array
        Integer class indices (the logits' shape without the class axis; covers
        optax's ``softmax_cross_entropy_with_integer_labels``) or class probabilities
        (the logits' shape; optax's ``softmax_cross_entropy``).
    axis, weight, ignore_index, label_smoothing, reduction, z_loss, softcap
        As in :func:`gradcore.softmax_cross_entropy` (``softcap``: the loss of
        :math:`c\tanh(x/c)`). ``weight`` is a constant.

    Returns
    -------
    jax.Array
        0-d for ``"mean"``/``"sum"``, one value per example for ``"none"``.

    Notes
    -----
    The forward map and its gradient :math:`G=\partial\ell/\partial x` come from one
    kernel call; the VJP of a cotangent :math:`g` is :math:`g\,G` (``"mean"``,
    ``"sum"``) or :math:`g_i\,G_{i\cdot}` per example (``"none"``, where :math:`G` is
    the gradient of the sum of the per-example losses, so row scaling is exact).
    """
    ndim = jnp.ndim(logits)
    if ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis)")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for logits with {ndim} dimensions")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    options = _XentOptions(
        int(axis) % ndim,
        int(ignore_index),
        float(label_smoothing),
        reduction,
        float(z_loss),
        None if softcap is None else float(softcap),
    )
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    return _xent(options, logits, labels, None if weight is None else jnp.asarray(weight))


# --- linear + cross-entropy ---------------------------------------------------------------


class _LxentOptions(NamedTuple):
    ignore_index: int
    label_smoothing: float
    reduction: str
    z_loss: float
    softcap: float | None
    chunk_size: int | None


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lxent(options: _LxentOptions, x: Any, w: Any, labels: Any, bias: Any, weight: Any) -> Any:
    # Not differentiated: the loss only (dx is skipped; under jit XLA drops dW, db too).
    return _lxent_kernel(options, x, w, labels, bias, weight, need_dx=False)[0]


def _lxent_kernel(
    options: _LxentOptions,
    x: Any,
    w: Any,
    labels: Any,
    bias: Any,
    weight: Any,
    need_dx: bool = True,
):
    from .linear_xent import linear_cross_entropy as kernel

    return kernel(
        x,
        w,
        labels,
        bias=bias,
        weight=weight,
        ignore_index=options.ignore_index,
        label_smoothing=options.label_smoothing,
        reduction=options.reduction,
        z_loss=options.z_loss,
        softcap=options.softcap,
        chunk_size=options.chunk_size,
        need_dx=need_dx,
    )


def _lxent_fwd(options: _LxentOptions, x: Any, w: Any, labels: Any, bias: Any, weight: Any):
    none = options.reduction == "none"
    loss, dx, dw, db = _lxent_kernel(options, x, w, labels, bias, weight, need_dx=not none)
    if none:
        # Row cotangents must scale delta_i before the contraction into dW and db: the
        # backward recomputes the chunks from the inputs.
        return loss, (None, None, None, x, w, labels, bias, weight)
    return loss, (dx, dw, db, None, None, None, bias, weight)


def _lxent_rows_vjp(options: _LxentOptions, x, w, labels, bias, weight, g):
    r"""Exact VJP of ``"none"``: :math:`\bar W = \sum_i g_i x_i^\top\delta_i` per chunk."""
    from .linear_xent import default_chunk_rows

    n_in, n_classes = w.shape
    lead = x.shape[:-1]
    soft = _floating(labels)
    x2 = jnp.reshape(x, (-1, n_in))
    n_rows = x2.shape[0]
    t2 = jnp.reshape(labels, (n_rows, n_classes) if soft else (n_rows,))
    g2 = jnp.reshape(g, (n_rows,))
    acc = jnp.promote_types(x.dtype, jnp.float32)
    w_acc = w.astype(acc)
    rows = options.chunk_size or default_chunk_rows(n_rows, n_in, n_classes)
    dx_parts = []
    dw = jnp.zeros(w.shape, acc)
    db = jnp.zeros((n_classes,), acc)
    for start in range(0, n_rows, rows):
        xc = x2[start : start + rows].astype(acc)
        z = xc @ w_acc
        if bias is not None:
            z = z + bias.astype(acc)
        _, delta = _losses.softmax_cross_entropy(
            z,
            t2[start : start + rows],
            weight=weight,
            ignore_index=options.ignore_index,
            label_smoothing=options.label_smoothing,
            reduction="none",
            z_loss=options.z_loss,
            softcap=options.softcap,
            check_labels=False,
        )
        delta = delta * g2[start : start + rows, None].astype(acc)
        dx_parts.append(delta @ w_acc.T)
        dw = dw + xc.T @ delta
        db = db + jnp.sum(delta, axis=0)
    dx = jnp.concatenate(dx_parts, axis=0) if dx_parts else jnp.zeros((0, n_in), acc)
    dx = jnp.reshape(dx, (*lead, n_in)).astype(x.dtype)
    return dx, dw.astype(w.dtype), None if bias is None else db.astype(bias.dtype)


def _lxent_bwd(options: _LxentOptions, residuals: Any, g: Any) -> Any:
    dx, dw, db, x, w, labels, bias, weight = residuals
    if options.reduction == "none":
        dx, dw, db = _lxent_rows_vjp(options, x, w, labels, bias, weight, g)
    else:
        dx, dw = _scale(dx, g, None), _scale(dw, g, None)
        db = None if db is None else _scale(db, g, None)
    # labels and weight are constants (stop_gradient in linear_cross_entropy).
    return dx, dw, None, db, None


_lxent.defvjp(_lxent_fwd, _lxent_bwd)


def linear_cross_entropy(
    x: Any,
    w: Any,
    labels: Any,
    *,
    bias: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Any:
    r"""Fused linear + softmax cross-entropy with the kernel's gradients as its VJP.

    The loss of :func:`gradcore.linear_cross_entropy`: cross-entropy of the logits
    ``x @ w + bias`` (``w`` of shape (H, V), flax's ``Dense`` kernel layout), computed in
    row chunks so the ``N x V`` logits never exist. ``x``, ``w`` and ``bias`` get
    cotangents; ``labels`` (also soft ones) and ``weight`` are constants, as if wrapped
    in :func:`jax.lax.stop_gradient`.

    Notes
    -----
    For ``"mean"``/``"sum"`` the forward keeps the kernel's :math:`\bar x, \bar W,
    \bar b` and the VJP of a cotangent :math:`g` scales them. For ``"none"`` with
    per-row cotangents :math:`g_i`, :math:`\bar W = \sum_i g_i x_i^\top \delta_i` is not a
    multiple of the sum's, so the backward recomputes the logits chunk by chunk and
    scales each row of :math:`\delta` first (a second pass of the forward's cost).
    Second derivatives are not supported.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    options = _LxentOptions(
        int(ignore_index),
        float(label_smoothing),
        reduction,
        float(z_loss),
        None if softcap is None else float(softcap),
        None if chunk_size is None else int(chunk_size),
    )
    labels = jax.lax.stop_gradient(jnp.asarray(labels))
    if weight is not None:
        weight = jax.lax.stop_gradient(jnp.asarray(weight))
    return _lxent(
        options,
        jnp.asarray(x),
        jnp.asarray(w),
        labels,
        None if bias is None else jnp.asarray(bias),
        weight,
    )


# --- MSE --------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mse(reduction: str, predictions: Any, targets: Any, weight: Any) -> Any:
    loss, _ = _mse_kernel(reduction, predictions, targets, weight)
    return loss


def _mse_kernel(reduction: str, predictions: Any, targets: Any, weight: Any) -> Any:
    w = None if weight is None else jax.lax.stop_gradient(weight)
    return _losses.mse(predictions, targets, weight=w, reduction=reduction)


def _mse_fwd(reduction: str, predictions: Any, targets: Any, weight: Any) -> Any:
    loss, grad = _mse_kernel(reduction, predictions, targets, weight)
    return loss, (grad, targets if _floating(targets) else None, weight)


def _mse_bwd(reduction: str, residuals: Any, g: Any) -> Any:
    grad, targets, weight = residuals
    d = _scale(grad, g, None)
    # (x - y)^2: d/dy = -d/dx; integer targets have no cotangent.
    d_targets = None if targets is None else (-d).astype(targets.dtype)
    return d, d_targets, None if weight is None else jnp.zeros_like(weight)


_mse.defvjp(_mse_fwd, _mse_bwd)


def mse(predictions: Any, targets: Any, *, weight: Any = None, reduction: str = "mean") -> Any:
    r"""Mean squared error with the fused gradient as its VJP (optax's argument names).

    :math:`\ell_i = w_i (x_i - y_i)^2`; ``"mean"`` divides by the number of elements
    (:func:`gradcore.mse`); ``reduction="none"`` equals optax's ``squared_error``
    (twice its ``l2_loss``). ``targets`` get their cotangent :math:`-\partial/\partial x`;
    ``weight`` is a constant.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return _mse(
        reduction,
        jnp.asarray(predictions),
        jnp.asarray(targets),
        None if weight is None else jnp.asarray(weight),
    )


# --- BCE with logits ----------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bce(reduction: str, logits: Any, labels: Any, weight: Any, pos_weight: Any) -> Any:
    loss, _ = _bce_kernel(reduction, logits, labels, weight, pos_weight)
    return loss


def _bce_kernel(reduction: str, logits: Any, labels: Any, weight: Any, pos_weight: Any) -> Any:
    return _losses.binary_cross_entropy_with_logits(
        logits,
        labels,
        weight=None if weight is None else jax.lax.stop_gradient(weight),
        pos_weight=None if pos_weight is None else jax.lax.stop_gradient(pos_weight),
        reduction=reduction,
    )


def _bce_fwd(reduction: str, logits: Any, labels: Any, weight: Any, pos_weight: Any) -> Any:
    loss, grad = _bce_kernel(reduction, logits, labels, weight, pos_weight)
    soft = _floating(labels)
    residuals = (grad, logits if soft else None, labels if soft else None, weight, pos_weight)
    return loss, residuals


def _bce_bwd(reduction: str, residuals: Any, g: Any) -> Any:
    grad, logits, labels, weight, pos_weight = residuals
    d_logits = _scale(grad, g, None)
    d_labels = None
    if labels is not None:
        # l = w (q y softplus(-x) + (1 - y) softplus(x)): dl/dy = w (q softplus(-x) - softplus(x)).
        x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        q = 1.0 if pos_weight is None else jax.lax.stop_gradient(pos_weight)
        d = q * jax.nn.softplus(-x) - jax.nn.softplus(x)
        if weight is not None:
            d = d * jax.lax.stop_gradient(weight)
        d = jnp.broadcast_to(d, grad.shape)
        if reduction == "mean":
            d = d / max(grad.size, 1)
        d_labels = _scale(d, g, None).astype(labels.dtype)
    zeros = [None if a is None else jnp.zeros_like(a) for a in (weight, pos_weight)]
    return (d_logits, d_labels, *zeros)


_bce.defvjp(_bce_fwd, _bce_bwd)


def binary_cross_entropy_with_logits(
    logits: Any,
    labels: Any,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    reduction: str = "mean",
) -> Any:
    r"""Sigmoid binary cross-entropy with the fused gradient as its VJP.

    optax's ``sigmoid_binary_cross_entropy(logits, labels)`` is ``reduction="none"``.
    ``weight`` and ``pos_weight`` (broadcast to the logits) are constants; floating
    ``labels`` get their exact cotangent.

    Notes
    -----
    :math:`\ell = w\,(q\,y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x))`, with
    :math:`\partial\ell/\partial x = w\,((q y + 1 - y)\,\sigma(x) - q y)` from the kernel.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    opt = [None if a is None else jnp.asarray(a) for a in (weight, pos_weight)]
    return _bce(reduction, jnp.asarray(logits), jnp.asarray(labels), *opt)
