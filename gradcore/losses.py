r"""Loss functions with their gradients: each returns ``(loss, grad)``.

Every loss here is a *fused* loss-and-gradient: it returns the value of the loss and
its gradient with respect to the prediction in one call, the way
``jax.value_and_grad`` would, because for these losses the gradient shares almost all
of its work with the forward map. ``loss`` is always an array of the input's library
on the input's device (0-d for ``"mean"`` and ``"sum"``), never a Python float, so no
kernel forces a host synchronisation.

The generic bodies below are written against the array API standard only. Backends
register faster versions (:mod:`gradcore.backends.numpy`, :mod:`gradcore.backends.cupy`)
that first call the same ``_validate_*`` functions, so errors are identical on every
path.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from ._checks import (
    as_float,
    as_int,
    check_array,
    check_bool,
    check_floating,
    check_same_shape,
    compute_dtype,
    is_floating,
)
from ._dispatch import dispatchable
from ._namespace import backend_name, get_namespace

__all__ = ["binary_cross_entropy_with_logits", "mse", "softmax_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


# --- validation shared by the generic bodies and the fast paths ------------------------


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}"
        )
    return str(reduction)


def _check_broadcastable(x: Any, w: Any, name: str, to: str) -> None:
    shape, wshape = tuple(x.shape), tuple(w.shape)
    ok = len(wshape) <= len(shape) and all(
        ws in (1, s) for ws, s in zip(wshape[::-1], shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(f"{name} of shape {wshape} does not broadcast to {to}'s shape {shape}")


def _is_immutable(x: Any) -> bool:
    return bool(array_api_compat.is_jax_array(x))


def _is_read_only(x: Any) -> bool:
    flags = getattr(x, "flags", None)
    return flags is not None and not getattr(flags, "writeable", True)


def _check_output(x: Any, name: str, out: Any, inplace: bool) -> None:
    """Validate the ``out=`` / ``inplace=`` request for a gradient shaped like ``x``."""
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if inplace and out is not None:
        raise ValueError("give either out= or inplace=True, not both")
    if inplace:
        if _is_immutable(x):
            raise ValueError(
                f"inplace=True needs {name} to be writable, but {backend_name(get_namespace(x))} "
                "arrays are immutable; use the returned gradient instead"
            )
        if _is_read_only(x):
            raise ValueError(f"inplace=True needs {name} to be writable, but it is read-only")
    if out is not None:
        check_array(out, "out")
        if _is_immutable(out):
            raise ValueError(
                f"out= needs a writable array, but {backend_name(get_namespace(out))} "
                "arrays are immutable; use the returned gradient instead"
            )
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(
                f"out must have the shape of {name} {tuple(x.shape)}, got {tuple(out.shape)}"
            )
        if out.dtype != x.dtype:
            raise TypeError(f"out must have the dtype of {name} ({x.dtype}), got {out.dtype}")
        if _is_read_only(out):
            raise ValueError("out is read-only")


def _deliver(grad: Any, x: Any, out: Any, inplace: bool) -> Any:
    """Write ``grad`` where the caller asked for it (``out``, or ``x`` itself)."""
    target = x if inplace else out
    if target is None:
        return grad
    target[...] = grad
    return target


class XentArgs(NamedTuple):
    """Normalised arguments of :func:`softmax_cross_entropy` (see ``_validate_xent``)."""

    axis: int
    num_classes: int
    soft: bool
    reduction: str
    label_smoothing: float
    z_loss: float
    ignore_index: int


def _default_check_labels(xp: Any, x: Any) -> bool:
    """Label checks are on by default only where they cost no device sync."""
    name = backend_name(xp)
    if name in ("numpy", "array_api_strict"):
        return True
    if name == "torch":
        return getattr(array_api_compat.device(x), "type", "cpu") == "cpu"
    return False


_INT64_MAX = 2**63 - 1


def _label_masks(xp: Any, labels: Any, num_classes: int, ignore_index: int) -> tuple[Any, Any, Any]:
    """``(labels, ignored, bad)``: labels in an integer dtype that can also hold the class
    count and ``ignore_index``, and the masks of ignored and out-of-range labels.

    Comparing in the labels' own dtype would wrap around (``arange(300)`` in int8) or
    overflow (-100 as a uint8), silently picking a wrong class; narrow labels are widened.
    """
    info = xp.iinfo(labels.dtype)
    lo, hi = min(ignore_index, 0), max(ignore_index, num_classes)
    huge = None
    if not (info.min <= lo and hi <= info.max):
        if info.max > _INT64_MAX:  # uint64: values past int64 are out of range anyway
            huge = labels > _INT64_MAX
            labels = xp.astype(labels, xp.int64)
        elif min(info.min, lo) >= -(2**31) and max(info.max, hi) < 2**31:
            labels = xp.astype(labels, xp.int32)
        else:
            labels = xp.astype(labels, xp.int64)
    ignored = labels == ignore_index
    out_of_range = (labels < 0) | (labels >= num_classes)
    if huge is not None:
        ignored = ignored & ~huge
        out_of_range = out_of_range | huge
    return labels, ignored, ~ignored & out_of_range


def _check_labels_in_range(xp: Any, labels: Any, num_classes: int, ignore_index: int) -> None:
    _, _, bad = _label_masks(xp, labels, num_classes, ignore_index)
    try:
        any_bad = bool(xp.any(bad))
    except TypeError as exc:  # a JAX tracer: the labels' values are not known yet
        raise TypeError(
            "check_labels=True needs the labels' values, which are not known under jax.jit "
            "(or another tracing transform); use check_labels=False there: out-of-range "
            "labels then give NaN rows"
        ) from exc
    if not any_bad:
        return
    flat_bad = xp.reshape(bad, (-1,))
    first = int(xp.argmax(xp.astype(flat_bad, xp.int32)))
    value = int(xp.reshape(labels, (-1,))[first])
    position = []
    for size in reversed(tuple(labels.shape)):
        position.append(first % size)
        first //= size
    raise ValueError(
        f"labels: class index {value} at position {tuple(reversed(position))} is out of range "
        f"[0, {num_classes}) and is not ignore_index={ignore_index}"
    )


def _validate_xent(
    logits: Any,
    labels: Any,
    *,
    axis: Any,
    weight: Any,
    ignore_index: Any,
    label_smoothing: Any,
    reduction: Any,
    z_loss: Any,
    check_labels: Any,
    out: Any,
    inplace: Any,
    xp: Any,
) -> XentArgs:
    r"""Check the arguments of :func:`softmax_cross_entropy`; normalise them.

    Raises the documented ``TypeError``/``ValueError`` before any work is done, and runs
    the label range check when ``check_labels`` asks for it (``None``: only on eager
    CPU backends, where it costs no device synchronisation).

    Returns
    -------
    XentArgs
        ``axis`` as a non-negative int, the number of classes, whether ``labels`` are
        soft (class probabilities), and the scalar options as Python numbers.
    """
    check_array(logits, "logits")
    check_array(labels, "labels")
    check_floating(xp, logits, "logits")
    ndim = logits.ndim
    if ndim < 1:
        raise ValueError("logits must have at least one dimension (the class axis)")
    axis = as_int(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for logits with {ndim} dimensions")
    axis %= ndim
    num_classes = int(logits.shape[axis])
    if num_classes == 0:
        raise ValueError(
            f"logits must have at least one class along axis {axis}, got shape "
            f"{tuple(logits.shape)}"
        )
    reduction = _check_reduction(reduction)
    ignore_index = as_int(ignore_index, "ignore_index")
    if not -(2**63) <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    label_smoothing = as_float(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = as_float(z_loss, "z_loss")
    if not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    check_bool(check_labels, "check_labels", none=True)

    if is_floating(xp, labels):
        soft = True
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(
                "floating labels are class probabilities and must have the logits' shape "
                f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"ignore_index={ignore_index} is not supported with class-probability labels "
                "(soft targets have no class index to ignore); leave it at its default"
            )
    elif xp.isdtype(labels.dtype, "integral"):
        soft = False
        expected = tuple(logits.shape[:axis]) + tuple(logits.shape[axis + 1 :])
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"integer labels must have the logits' shape without the class axis {expected}, "
                f"got {tuple(labels.shape)}"
            )
    else:
        raise TypeError(
            f"labels must be integer class indices or floating class probabilities, "
            f"got dtype {labels.dtype}"
        )

    if weight is not None:
        check_array(weight, "weight")
        check_floating(xp, weight, "weight")
        if tuple(weight.shape) != (num_classes,):
            raise ValueError(
                f"weight must have shape ({num_classes},), one per class, got {tuple(weight.shape)}"
            )
    _check_output(logits, "logits", out, inplace)

    if not soft:
        do_check = _default_check_labels(xp, logits) if check_labels is None else check_labels
        if do_check:
            _check_labels_in_range(xp, labels, num_classes, ignore_index)
    return XentArgs(axis, num_classes, soft, reduction, label_smoothing, z_loss, ignore_index)


# --- softmax cross-entropy --------------------------------------------------------------


def _log_softmax_parts(xp: Any, x: Any) -> tuple[Any, Any, Any]:
    """Row-wise (log-probabilities, probabilities, log-sum-exp) over the last axis.

    Rows whose entries are all ``-inf`` keep a finite shift (0) so that they give NaN
    (0/0) rather than an exception; entries of ``-inf`` in other rows give probability
    0. A row with a ``+inf`` (or NaN) entry is shifted by it and becomes NaN throughout,
    as in PyTorch (``inf - inf``).
    """
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(m == -math.inf, xp.zeros_like(m), m)
    shifted = x - m
    e = xp.exp(shifted)
    s = xp.sum(e, axis=-1, keepdims=True)
    log_s = xp.log(s)
    return shifted - log_s, e / s, log_s + m


@dispatchable
def softmax_cross_entropy(
    logits: Any,
    labels: Any,
    /,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    check_labels: bool | None = None,
    out: Any = None,
    inplace: bool = False,
    softcap: float | None = None,
    xp: Any = None,
) -> tuple[Any, Any]:
    r"""Softmax cross-entropy and its gradient with respect to the logits, fused.

    Semantics follow :func:`torch.nn.functional.cross_entropy` exactly, plus the
    optional z-loss of PaLM; the edge cases (non-finite logits, a zero divisor) and the
    two places where this deliberately differs are listed at the end of the Notes.

    Parameters
    ----------
    logits : array, shape (..., C, ...)
        Unnormalised scores, floating; the class axis is ``axis``.
    labels : array
        Either integer class indices of the logits' shape without the class axis, or
        floating class probabilities of the logits' shape (soft targets).
    axis : int
        The class axis of ``logits``.
    weight : array, shape (C,), optional
        A rescaling weight per class.
    ignore_index : int
        Integer labels equal to it contribute no loss and no gradient, and do not count
        in the mean's divisor. Not allowed (other than negative) with soft targets.
    label_smoothing : float in [0, 1]
        The target becomes :math:`(1-\varepsilon)\,y + \varepsilon/C`.
    reduction : {"mean", "sum", "none"}
        ``"none"`` gives one loss per row; the gradient is then that of their sum.
    z_loss : float >= 0
        Adds :math:`z\,\mathrm{lse}_i^2` to each non-ignored row's loss (counted in
        the same divisor as the cross-entropy).
    check_labels : bool or None
        Check that integer labels are in ``[0, C)`` (or equal ``ignore_index``) and raise
        ``ValueError`` naming the first bad one. ``None`` checks only on eager CPU
        backends (NumPy, PyTorch CPU, array-api-strict), where it is free; ``True``
        checks everywhere (a device synchronisation on GPU; impossible under
        ``jax.jit``). Where unchecked, a bad label makes its row's loss and gradient NaN.
    out : array, optional
        Write the gradient into this array (shape and dtype of ``logits``).
    inplace : bool
        Overwrite ``logits`` with the gradient (no logits-sized allocation on backends
        with a fast path). Raises ``ValueError`` for immutable (JAX) or read-only arrays.
    softcap : float > 0, optional
        Gemma 2's logit soft-capping: the loss sees :math:`c\tanh(x/c)` instead of
        :math:`x`, and the gradient is with respect to the uncapped ``logits``. It must
        lie between the smallest normal and the largest finite number of the dtype
        the loss is computed in (``ValueError`` otherwise: it would round to 0 or inf).
    xp : namespace, optional
        The array namespace; found from the inputs when omitted.

    Returns
    -------
    loss : array
        0-d for ``"mean"``/``"sum"``, else the rows' shape; dtype of ``logits``.
    grad : array, shape of ``logits``
        :math:`\partial\,\mathrm{loss} / \partial\,\mathrm{logits}`.

    Notes
    -----
    For a row :math:`x\in\mathbb{R}^C` with :math:`p=\mathrm{softmax}(x)` and
    :math:`\mathrm{lse}=\log\sum_c e^{x_c}`, class weights :math:`w` (all ones when not
    given), :math:`W=\sum_c w_c`, and a hard label :math:`y`:

    .. math::

        \ell = (1-\varepsilon)\, w_y\,(-\log p_y)
               + \frac{\varepsilon}{C}\sum_c w_c\,(-\log p_c) + z\,\mathrm{lse}^2 .

    The softmax Jacobian :math:`\partial p/\partial x = \mathrm{diag}(p) - p p^\top`
    times the loss's gradient collapses into one elementwise expression:

    .. math::

        \frac{\partial \ell}{\partial x_c} =
            \Big((1-\varepsilon) w_y + \frac{\varepsilon}{C} W + 2 z\,\mathrm{lse}\Big) p_c
            - (1-\varepsilon) w_y\,[c=y] - \frac{\varepsilon}{C} w_c .

    With soft targets :math:`t` (smoothed to :math:`(1-\varepsilon)t+\varepsilon/C`),
    :math:`\ell=-\sum_c w_c t_c\log p_c + z\,\mathrm{lse}^2` and
    :math:`\partial\ell/\partial x_c = (\sum_k w_k t_k + 2z\,\mathrm{lse})\,p_c - w_c t_c`.
    The ``"mean"`` divides by :math:`\sum_i w_{y_i}` over non-ignored rows (by the number
    of rows for soft targets); without weights and smoothing the gradient is the
    lecture's :math:`-\frac1N (Y - \hat Y)`.

    Edge cases, the same on every path and backend (checked against PyTorch):

    - A row with a ``+inf`` or NaN logit, or with only ``-inf`` logits, has a NaN loss
      and a NaN gradient row. Other ``-inf`` logits give probability 0; a hard label
      on such a class gives an infinite loss (gradient ``p - onehot``, finite).
    - ``reduction="mean"`` with a zero divisor :math:`\sum_i w_{y_i} = 0` (every row
      ignored, or every non-ignored row's class weight 0) is PyTorch's 0/0: the loss
      is NaN, every non-ignored row's gradient is NaN, ignored rows' gradients are 0
      (so an all-ignored batch has a zero gradient) — with or without label smoothing.
      The z-loss, which PyTorch lacks, is divided by the same divisor and follows the
      same rule: with a zero divisor its rows are NaN too, never silently dropped.
      ``"sum"`` and ``"none"`` have no divisor: zero class weights give zero terms.

    Deliberate differences from PyTorch: an ignored row contributes no loss and no
    gradient whatever its logits (PyTorch's gradient row is NaN when they are not
    finite); with soft targets, a class with a ``-inf`` logit and target 0 costs nothing
    (PyTorch: ``0 * -inf``, a NaN loss).

    With ``softcap`` :math:`c`, the loss above is taken at :math:`u = c\tanh(x/c)`; the
    cap's Jacobian is diagonal, :math:`\partial u_c/\partial x_c = 1 - (u_c/c)^2`, so
    the gradient is the one above (at :math:`u`) times that factor, elementwise. A
    ``-inf`` logit is capped to :math:`-c`, as the composition would do it.
    """
    xp = get_namespace(logits, labels, weight, out, xp=xp)
    args = _validate_xent(
        logits,
        labels,
        axis=axis,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        z_loss=z_loss,
        check_labels=check_labels,
        out=out,
        inplace=inplace,
        xp=xp,
    )
    cap = _check_softcap(softcap)
    moved = args.axis != logits.ndim - 1
    x = xp.moveaxis(logits, args.axis, -1) if moved else logits
    cdtype = compute_dtype(xp, logits.dtype)
    _check_softcap_dtype(xp, cap, cdtype)
    x = xp.astype(x, cdtype)
    if cap is not None:
        capped = xp.tanh(x / cap)
        x = cap * capped
    w = None if weight is None else xp.astype(weight, cdtype)
    C = args.num_classes
    eps = args.label_smoothing
    zero = xp.zeros((), dtype=cdtype, device=array_api_compat.device(x))

    logp, p, lse = _log_softmax_parts(xp, x)
    if args.soft:
        t = xp.astype(labels, cdtype)
        if moved:
            t = xp.moveaxis(t, args.axis, -1)
        if eps > 0.0:
            t = t * (1.0 - eps) + eps / C
        tw = t if w is None else t * w
        # 0 * log(0) is 0 here: a masked class (-inf logit) with no target mass costs nothing.
        row_loss = -xp.sum(tw * xp.where(tw == 0, zero, logp), axis=-1)
        coef = xp.sum(tw, axis=-1, keepdims=True)
        if args.z_loss > 0.0:
            # (z * lse) * lse: lse**2 alone could overflow where the product does not
            row_loss = row_loss + (args.z_loss * lse[..., 0]) * lse[..., 0]
            coef = coef + 2.0 * args.z_loss * lse
        grad = coef * p - tw
        rows = math.prod(tuple(x.shape)[:-1])
        divisor = xp.asarray(float(rows), dtype=cdtype, device=array_api_compat.device(x))
        bad = None
        counted = None
    else:
        lab, ignored, bad = _label_masks(xp, labels, C, args.ignore_index)
        classes = xp.arange(C, dtype=lab.dtype, device=array_api_compat.device(lab))
        onehot = lab[..., None] == classes
        active = ~ignored & ~bad
        nll = -xp.sum(xp.where(onehot, logp, zero), axis=-1)
        if w is None:
            w_y = xp.where(active, xp.ones_like(nll), zero)
        else:
            w_y = xp.where(active, xp.sum(xp.where(onehot, w, zero), axis=-1), zero)
        row_loss = (1.0 - eps) * w_y * nll
        coef = (1.0 - eps) * w_y
        if eps > 0.0:
            smooth = -xp.sum(logp if w is None else w * logp, axis=-1)
            row_loss = row_loss + (eps / C) * smooth
            coef = coef + (eps / C) * (float(C) if w is None else xp.sum(w))
        if args.z_loss > 0.0:
            # (z * lse) * lse: lse**2 alone could overflow where the product does not
            row_loss = row_loss + (args.z_loss * lse[..., 0]) * lse[..., 0]
            coef = coef + 2.0 * args.z_loss * lse[..., 0]
        grad = coef[..., None] * p - (1.0 - eps) * xp.where(onehot, w_y[..., None], zero)
        if eps > 0.0:
            grad = grad - (eps / C) * (1.0 if w is None else w)
        row_loss = xp.where(active, row_loss, zero)
        grad = xp.where(active[..., None], grad, zero)
        divisor = xp.sum(w_y)
        counted = ~ignored

    if args.reduction == "mean":
        # A zero divisor (every row ignored, or every counted row's class weight 0) is
        # PyTorch's 0/0: a NaN mean, NaN gradient rows for the rows not ignored, zero
        # rows for ignored ones. The NaNs are put in place rather than divided out,
        # which would warn.
        empty = divisor == 0
        safe = xp.where(empty, xp.ones_like(divisor), divisor)
        nan = xp.asarray(float("nan"), dtype=cdtype, device=array_api_compat.device(x))
        loss = xp.where(empty, nan, xp.sum(row_loss) / safe)
        grad = grad / safe
        if counted is not None:
            grad = xp.where(empty & counted[..., None], nan, grad)
    elif args.reduction == "sum":
        loss = xp.sum(row_loss)
    else:
        loss = row_loss
    if bad is not None:
        # Unchecked out-of-range labels poison their row, never pick a wrong class.
        nan = xp.asarray(float("nan"), dtype=cdtype, device=array_api_compat.device(x))
        grad = xp.where(bad[..., None], nan, grad)
        if args.reduction == "none":
            loss = xp.where(bad, nan, loss)
        else:
            loss = xp.where(xp.any(bad), nan, loss)
    if cap is not None:
        grad = grad * (1.0 - capped * capped)
    grad = xp.astype(grad, logits.dtype)
    if moved:
        grad = xp.moveaxis(grad, -1, args.axis)
    loss = xp.asarray(xp.astype(loss, logits.dtype))
    return loss, _deliver(grad, logits, out, inplace)


def _mean(xp: Any, elementwise: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """The mean of ``elementwise`` over ``shape``; NaN for no elements, without a 0/0."""
    n = math.prod(shape)
    if n == 0:
        return xp.asarray(float("nan"), dtype=dtype, device=array_api_compat.device(elementwise))
    return xp.sum(elementwise) / float(n)


# --- elementwise losses (MSE, BCE): shared checks and reduction ------------------------


def _validate_elementwise(
    xp: Any,
    x: Any,
    x_name: str,
    target: Any,
    target_name: str,
    target_kinds: tuple[str, ...],
    weights: tuple[tuple[Any, str], ...],
    reduction: Any,
    out: Any,
    inplace: Any,
) -> str:
    """Checks of a loss applied element by element to ``x`` against ``target``."""
    check_array(x, x_name)
    check_array(target, target_name)
    check_floating(xp, x, x_name)
    if not xp.isdtype(target.dtype, target_kinds):
        raise TypeError(f"{target_name} must have a real numeric dtype, got {target.dtype}")
    check_same_shape(x, target, x_name, target_name)
    for w, w_name in weights:
        if w is not None:
            check_array(w, w_name)
            check_floating(xp, w, w_name)
            _check_broadcastable(x, w, w_name, x_name)
    reduction = _check_reduction(reduction)
    _check_output(x, x_name, out, inplace)
    return reduction


def _finish_elementwise(
    xp: Any,
    elementwise: Any,
    grad: Any,
    x: Any,
    reduction: str,
    out: Any,
    inplace: bool,
    *,
    factor: float = 1.0,
    weight: Any = None,
) -> tuple[Any, Any]:
    """Reduce an elementwise loss; deliver its gradient in ``x``'s shape and dtype.

    The delivered gradient is ``(grad * (factor / N)) * weight`` for ``"mean"`` (``N``
    elements), ``(grad * factor) * weight`` otherwise: the constant factor and the mean's
    ``1/N`` are applied in one multiply, before the weight, as PyTorch does, so that a
    huge ``grad`` is not overflowed by a factor 2 that the ``1/N`` would undo.
    """
    shape = tuple(x.shape)
    elementwise = xp.broadcast_to(elementwise, shape)
    if reduction == "mean":
        factor = factor / float(max(math.prod(shape), 1))
    if factor != 1.0:
        grad = grad * factor
    if weight is not None:
        grad = weight * grad
    grad = xp.broadcast_to(grad, shape)
    if reduction == "mean":
        loss = _mean(xp, elementwise, shape, elementwise.dtype)
    elif reduction == "sum":
        loss = xp.sum(elementwise)
    else:
        loss = elementwise
    # asarray first: a NumPy scalar's astype would drop a non-native byte order
    loss = xp.astype(xp.asarray(loss), x.dtype)
    return loss, _deliver(xp.astype(grad, x.dtype), x, out, inplace)


# --- mean squared error -----------------------------------------------------------------


def _validate_mse(
    pred: Any, target: Any, *, weight: Any, reduction: Any, out: Any, inplace: Any, xp: Any
) -> str:
    """Check the arguments of :func:`mse`; return the reduction."""
    return _validate_elementwise(
        xp,
        pred,
        "pred",
        target,
        "target",
        ("real floating", "integral"),
        ((weight, "weight"),),
        reduction,
        out,
        inplace,
    )


@dispatchable
def mse(
    pred: Any,
    target: Any,
    /,
    *,
    weight: Any = None,
    reduction: str = "mean",
    out: Any = None,
    inplace: bool = False,
    xp: Any = None,
) -> tuple[Any, Any]:
    r"""Mean squared error and its gradient with respect to the prediction.

    Parameters
    ----------
    pred : array, shape (...)
        The prediction :math:`\hat y`, floating.
    target : array, shape of ``pred``
        The target :math:`y`.
    weight : array, optional
        A weight per element, broadcast to ``pred``'s shape.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` divides by the number of elements (also with ``weight``), as
        :func:`torch.nn.functional.mse_loss` does; ``"none"`` returns the elementwise
        loss and the gradient of its sum.
    out : array, optional
        Write the gradient into this array (shape and dtype of ``pred``).
    inplace : bool
        Overwrite ``pred`` with the gradient.
    xp : namespace, optional
        The array namespace; found from the inputs when omitted.

    Returns
    -------
    loss : array
        0-d, or the elementwise loss for ``"none"``; dtype of ``pred``.
    grad : array, shape of ``pred``

    Notes
    -----
    With :math:`N` elements, :math:`J = \frac1N\sum_i w_i (y_i - \hat y_i)^2`. The chain
    :math:`\partial J/\partial J_0 = (\frac1N,\dots,\frac1N)` times the diagonal
    :math:`\partial J_0/\partial\hat y = \mathrm{diag}(-2 w (y - \hat y))` collapses to
    the elementwise :math:`\partial J/\partial\hat y = -\frac2N\, w\,(y - \hat y)`.

    As in PyTorch, the gradient is :math:`(\hat y - y)\cdot\frac2N` in one multiply
    (then times :math:`w`), so it stays finite wherever the result is representable
    (float32 :math:`\hat y - y = 3\cdot10^{38}`, :math:`N = 16`: :math:`3.75\cdot10^{37}`),
    while the loss, a sum of squares in the input's dtype, overflows to ``inf`` there.
    """
    xp = get_namespace(pred, target, weight, out, xp=xp)
    reduction = _validate_mse(
        pred, target, weight=weight, reduction=reduction, out=out, inplace=inplace, xp=xp
    )
    cdtype = compute_dtype(xp, pred.dtype)
    diff = xp.astype(pred, cdtype) - xp.astype(target, cdtype)
    w = None if weight is None else xp.astype(weight, cdtype)
    elementwise = diff * diff if w is None else (w * diff) * diff
    return _finish_elementwise(
        xp, elementwise, diff, pred, reduction, out, inplace, factor=2.0, weight=w
    )


# --- binary cross-entropy with logits ---------------------------------------------------


def _validate_bce(
    logits: Any,
    targets: Any,
    *,
    weight: Any,
    pos_weight: Any,
    reduction: Any,
    out: Any,
    inplace: Any,
    xp: Any,
) -> str:
    """Check the arguments of :func:`binary_cross_entropy_with_logits`; return the reduction."""
    return _validate_elementwise(
        xp,
        logits,
        "logits",
        targets,
        "targets",
        ("real floating", "integral", "bool"),
        ((weight, "weight"), (pos_weight, "pos_weight")),
        reduction,
        out,
        inplace,
    )


@dispatchable
def binary_cross_entropy_with_logits(
    logits: Any,
    targets: Any,
    /,
    *,
    weight: Any = None,
    pos_weight: Any = None,
    reduction: str = "mean",
    out: Any = None,
    inplace: bool = False,
    xp: Any = None,
) -> tuple[Any, Any]:
    r"""Sigmoid followed by binary cross-entropy, and its gradient, fused and stable.

    Semantics follow :func:`torch.nn.functional.binary_cross_entropy_with_logits`.

    Parameters
    ----------
    logits : array, shape (...)
        Scores :math:`x`, floating.
    targets : array, shape of ``logits``
        Targets :math:`y` in [0, 1] (probabilities allowed).
    weight : array, optional
        A weight per element, broadcast to the logits' shape.
    pos_weight : array, optional
        A weight on the positive term, broadcast to the logits' shape (usually one per
        class, shape (C,)).
    reduction : {"mean", "sum", "none"}
        ``"mean"`` divides by the number of elements.
    out : array, optional
        Write the gradient into this array (shape and dtype of ``logits``).
    inplace : bool
        Overwrite ``logits`` with the gradient.
    xp : namespace, optional
        The array namespace; found from the inputs when omitted.

    Returns
    -------
    loss : array
        0-d, or elementwise for ``"none"``; dtype of ``logits``.
    grad : array, shape of ``logits``

    Notes
    -----
    With :math:`\sigma` the logistic function, pos-weight :math:`q` and weight :math:`w`,

    .. math::

        \ell = w\,\big(q\,y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x)\big),
        \qquad \frac{\partial\ell}{\partial x} = w\,\big((q y + 1 - y)\,\sigma(x) - q y\big),

    using :math:`-\log\sigma(x)=\mathrm{softplus}(-x)` and
    :math:`\mathrm{softplus}(x)=\max(x,0)+\log(1+e^{-|x|})`, which never overflows.
    """
    xp = get_namespace(logits, targets, weight, pos_weight, out, xp=xp)
    reduction = _validate_bce(
        logits,
        targets,
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
        out=out,
        inplace=inplace,
        xp=xp,
    )
    cdtype = compute_dtype(xp, logits.dtype)
    x = xp.astype(logits, cdtype)
    y = xp.astype(targets, cdtype)
    zero = xp.zeros((), dtype=cdtype, device=array_api_compat.device(x))
    e = xp.exp(-xp.abs(x))
    log1p_e = xp.log1p(e)
    # Both softplus terms directly: softplus(x) - x would cancel catastrophically.
    softplus_pos = xp.maximum(x, zero) + log1p_e  # -log(1 - sigmoid(x))
    softplus_neg = xp.maximum(-x, zero) + log1p_e  # -log(sigmoid(x))
    sig = xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    qy = y if pos_weight is None else xp.astype(pos_weight, cdtype) * y
    elementwise = qy * softplus_neg + (1.0 - y) * softplus_pos
    grad = (qy + 1.0 - y) * sig - qy
    wc = None
    if weight is not None:
        wc = xp.astype(weight, cdtype)
        elementwise = wc * elementwise
    return _finish_elementwise(xp, elementwise, grad, logits, reduction, out, inplace, weight=wc)


# --- options shared with the fused linear + cross-entropy -------------------------------


def _check_softcap(softcap: Any) -> float | None:
    """``softcap`` as a float (None: no cap); errors name it."""
    if softcap is None:
        return None
    if isinstance(softcap, bool):
        raise TypeError(f"softcap must be a positive float or None, got {softcap!r}")
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a positive float or None, got {softcap!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
    return value


def _check_softcap_dtype(xp: Any, cap: float | None, dtype: Any) -> None:
    """Refuse a ``softcap`` that ``dtype`` (where the cap is applied) cannot hold.

    Past the largest finite value the cap rounds to ``inf`` (``x / inf * inf`` is NaN);
    below the smallest normal one it rounds to 0 or loses its digits: either way every
    capped logit would be wrong, so the call fails instead of returning NaN.
    """
    if cap is None:
        return
    info = xp.finfo(dtype)
    if not float(info.smallest_normal) <= cap <= float(info.max):
        raise ValueError(
            f"softcap must be within [{float(info.smallest_normal):g}, {float(info.max):g}] "
            f"to be applied in {dtype}, got {cap!r}"
        )
