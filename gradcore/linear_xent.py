r"""Fused linear + softmax cross-entropy over row chunks: the output layer of a language
model without ever holding the ``N x V`` logits.

``linear_cross_entropy(x, W, labels)`` returns what
``softmax_cross_entropy(linear(x, W, bias), labels)`` followed by :func:`linear_vjp` would
return — the loss and the gradients with respect to ``x``, ``W`` and ``bias`` — but
computes the logits one chunk of rows at a time. Per chunk the logits are formed, the
cross-entropy turns them into their gradient, and that gradient is pushed through the
affine map at once (``dx`` for the chunk's rows, a contribution to ``dW`` and ``db``).
The ``"mean"`` divisor depends on the labels only, so it is known before the first chunk
and every chunk's gradient is final when written.

The body below is standard-only (any backend, ``jax.jit`` included); the NumPy and CuPy
fast paths (:mod:`gradcore.backends.numpy`, :mod:`gradcore.backends.cupy_linear`) call
:func:`_validate_lxent` first, so errors are the same on every path.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from ._checks import as_int, astype, check_array, check_floating, compute_dtype, is_floating
from ._dispatch import dispatchable
from ._namespace import get_namespace
from .linear import _check_x_w
from .losses import (
    _check_labels_in_range,
    _check_softcap,
    _check_softcap_dtype,
    _default_check_labels,
    _label_masks,
    _validate_xent,
    softmax_cross_entropy,
)

__all__ = ["linear_cross_entropy"]

#: Rows per chunk are at least this many (or all rows): with fewer rows the matrix
#: products fall well below the machine's matmul speed (OpenBLAS on 2 cores, H = 1024,
#: V = 32000: 1.65x the unchunked products' time at 128 rows, 1.2x at 256, 1.09x at 512).
MIN_CHUNK_ROWS = 512


class LxentArgs(NamedTuple):
    """Normalised arguments of :func:`linear_cross_entropy` (see ``_validate_lxent``)."""

    n_rows: int
    n_in: int
    n_classes: int
    soft: bool
    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    chunk_rows: int
    dtype: Any
    work_dtype: Any


def default_chunk_rows(n_rows: int, n_in: int, n_classes: int) -> int:
    r"""Rows per chunk when ``chunk_size`` is None.

    The rule: a chunk's logits hold about as many elements as ``x``
    (:math:`\lceil N H / V\rceil` rows), but at least :data:`MIN_CHUNK_ROWS` rows so that
    the matrix products stay efficient, and never more than :math:`N`.
    """
    rows = -(-n_rows * n_in // max(n_classes, 1))
    return max(1, min(n_rows, max(rows, MIN_CHUNK_ROWS)))


def _validate_lxent(
    x: Any,
    W: Any,
    labels: Any,
    *,
    bias: Any,
    weight: Any,
    ignore_index: Any,
    label_smoothing: Any,
    reduction: Any,
    z_loss: Any,
    softcap: Any,
    chunk_size: Any,
    need_dx: Any,
    check_labels: Any,
    xp: Any,
) -> LxentArgs:
    """Check the arguments of :func:`linear_cross_entropy` before any work; normalise them.

    The options shared with :func:`softmax_cross_entropy` go through its own validator
    (on a one-row stand-in for the logits), so their errors read the same.
    """
    check_array(x, "x")
    check_array(W, "W")
    check_array(labels, "labels")
    check_floating(xp, x, "x")
    check_floating(xp, W, "W")
    _check_x_w(x, W)
    n_in, n_classes = (int(s) for s in W.shape)
    if n_classes == 0:
        raise ValueError(f"W must have at least one class (column), got shape {tuple(W.shape)}")
    if bias is not None:
        check_array(bias, "bias")
        check_floating(xp, bias, "bias")
        if tuple(bias.shape) != (n_classes,):
            raise ValueError(
                f"bias must have shape ({n_classes},), one per column of W, got {tuple(bias.shape)}"
            )
        dtype = xp.result_type(x, W, bias)
    else:
        dtype = xp.result_type(x, W)
    if not isinstance(need_dx, bool):
        raise TypeError(f"need_dx must be True or False, got {need_dx!r}")
    cap = _check_softcap(softcap)
    lead = tuple(x.shape[:-1])
    if is_floating(xp, labels):
        soft = True
        if tuple(labels.shape) != (*lead, n_classes):
            raise ValueError(
                "floating labels are class probabilities and must have shape "
                f"x.shape[:-1] + (V,) = {(*lead, n_classes)}, got {tuple(labels.shape)}"
            )
    elif xp.isdtype(labels.dtype, "integral"):
        soft = False
        if tuple(labels.shape) != lead:
            raise ValueError(
                f"integer labels must have shape x.shape[:-1] = {lead}, got {tuple(labels.shape)}"
            )
    else:
        raise TypeError(
            "labels must be integer class indices or floating class probabilities, "
            f"got dtype {labels.dtype}"
        )
    dev = array_api_compat.device(x)
    stand_in = xp.zeros((n_classes,), dtype=dtype, device=dev)
    label_stand_in = xp.zeros((n_classes,) if soft else (), dtype=labels.dtype, device=dev)
    args = _validate_xent(
        stand_in,
        label_stand_in,
        axis=-1,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        z_loss=z_loss,
        check_labels=check_labels,
        out=None,
        inplace=False,
        xp=xp,
    )
    n_rows = math.prod(lead)
    if chunk_size is None:
        rows = default_chunk_rows(n_rows, n_in, n_classes)
    else:
        rows = as_int(chunk_size, "chunk_size")
        if rows < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {rows}")
    if not soft:
        do_check = _default_check_labels(xp, x) if check_labels is None else check_labels
        if do_check:
            _check_labels_in_range(xp, labels, n_classes, args.ignore_index)
    work_dtype = compute_dtype(xp, dtype)
    _check_softcap_dtype(xp, cap, work_dtype)
    return LxentArgs(
        n_rows,
        n_in,
        n_classes,
        soft,
        args.reduction,
        args.ignore_index,
        args.label_smoothing,
        args.z_loss,
        cap,
        rows,
        dtype,
        work_dtype,
    )


def _mean_divisor(xp: Any, labels: Any, weight: Any, args: LxentArgs, dtype: Any) -> Any:
    """The ``"mean"`` divisor as a 0-d array: the class weights of the non-ignored
    (and in-range) labels summed, or the number of rows for soft targets."""
    dev = array_api_compat.device(labels)
    if args.soft:
        return xp.asarray(float(args.n_rows), dtype=dtype, device=dev)
    lab, ignored, bad = _label_masks(xp, labels, args.n_classes, args.ignore_index)
    active = ~ignored & ~bad
    zero = xp.zeros((), dtype=dtype, device=dev)
    if weight is None:
        return xp.sum(xp.where(active, xp.ones((), dtype=dtype, device=dev), zero))
    classes = xp.arange(args.n_classes, dtype=lab.dtype, device=dev)
    onehot = lab[..., None] == classes
    w_y = xp.sum(xp.where(onehot, xp.astype(weight, dtype), zero), axis=-1)
    return xp.sum(xp.where(active, w_y, zero))


@dispatchable
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
    xp: Any = None,
) -> tuple[Any, Any, Any, Any]:
    r"""Cross-entropy of the logits ``x @ W + bias`` and its gradients, in row chunks.

    The result equals :func:`softmax_cross_entropy` applied to ``linear(x, W, bias)``
    and :func:`linear_vjp` applied to its gradient, but at most one chunk of logits
    (``chunk_size`` rows by ``V`` classes) exists at any time.

    Parameters
    ----------
    x : array, shape (..., H)
        Hidden states, real floating; every leading axis is a row axis.
    W : array, shape (H, V)
        Output weights (gradcore's ``linear`` convention ``x @ W``).
    labels : array
        Integer class indices of shape ``x.shape[:-1]``, or floating class
        probabilities of shape ``x.shape[:-1] + (V,)``.
    bias : array, shape (V,), optional
        Added to the logits.
    weight, ignore_index, label_smoothing, reduction, z_loss, check_labels
        As in :func:`softmax_cross_entropy` (``reduction="none"`` returns the per-row
        losses and the gradients of their sum).
    softcap : float > 0, optional
        Soft-cap the logits to :math:`c\tanh(z/c)` before the loss (Gemma 2); it must
        be a normal, finite number of the dtype the logits are computed in.
    chunk_size : int >= 1, optional
        Rows per chunk. The default, :func:`default_chunk_rows`, makes a chunk's
        logits about as large as ``x`` (:math:`\lceil NH/V\rceil` rows), with at least
        :data:`MIN_CHUNK_ROWS` rows (or all of them).
    need_dx : bool
        ``False`` skips the gradient with respect to ``x`` (one matrix product per
        chunk) and returns ``dx=None``.
    xp : namespace, optional
        The array namespace; found from the inputs when omitted.

    Returns
    -------
    loss : array
        0-d for ``"mean"``/``"sum"``, shape ``x.shape[:-1]`` for ``"none"``.
    dx : array, shape of ``x``, or None
    dW : array, shape (H, V)
    db : array, shape (V,), or None without a bias
        All of the promoted dtype of ``x``, ``W`` and ``bias``. For float16 and
        bfloat16 the logits, their gradient and the sums over chunks for ``dW`` and
        ``db`` are kept in float32 and rounded once at the end.

    Raises
    ------
    TypeError, ValueError
        As :func:`linear` and :func:`softmax_cross_entropy` do, naming the argument;
        also for ``softcap`` <= 0 and ``chunk_size`` < 1. Nothing is computed first.

    Notes
    -----
    Stack the rows of ``x`` into :math:`X` (N, H). With :math:`Z = XW + \mathbf 1 b^\top`
    (optionally :math:`U = c\tanh(Z/c)`) and :math:`G = \partial\ell/\partial Z` the
    cross-entropy's gradient (see :func:`softmax_cross_entropy`, including the cap's
    diagonal Jacobian :math:`1 - (U/c)^2`), the chain rule through the affine map gives

    .. math:: \bar X = G W^\top, \qquad \bar W = X^\top G = \sum_k X_k^\top G_k,
              \qquad \bar b = G^\top\mathbf 1 = \sum_k G_k^\top \mathbf 1,

    where :math:`k` runs over chunks of rows. Row :math:`i` of :math:`G` depends only
    on row :math:`i` of :math:`Z` and on the ``"mean"``'s divisor
    :math:`\sum_i w_{y_i}` over non-ignored rows (:math:`N` for soft targets), which
    the labels alone determine: each chunk's :math:`G_k` is computed, used for its rows
    of :math:`\bar X` and its terms of :math:`\bar W`, :math:`\bar b`, and dropped.
    An all-ignored batch gives a NaN mean and zero gradients, as in PyTorch; a zero
    divisor with rows not ignored (their class weights all 0) gives NaN gradients for
    those rows, as :func:`softmax_cross_entropy` does.
    """
    xp = get_namespace(x, W, labels, bias, weight, xp=xp)
    args = _validate_lxent(
        x,
        W,
        labels,
        bias=bias,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
        need_dx=need_dx,
        check_labels=check_labels,
        xp=xp,
    )
    N, H, V = args.n_rows, args.n_in, args.n_classes
    work = args.work_dtype
    dev = array_api_compat.device(x)
    lead = tuple(x.shape[:-1])
    x2 = xp.reshape(astype(xp, x, work), (N, H))
    lab2 = xp.reshape(labels, (N, V) if args.soft else (N,))
    Ww = astype(xp, W, work)
    bw = None if bias is None else astype(xp, bias, work)
    inv = safe = empty = nan_rows = None
    if args.reduction == "mean":
        divisor = _mean_divisor(xp, lab2, weight, args, work)
        empty = divisor == 0
        safe = xp.where(empty, xp.ones_like(divisor), divisor)
        inv = 1.0 / safe
        if not args.soft:
            # A zero divisor is 0/0 for every row not ignored (as in
            # softmax_cross_entropy and PyTorch): NaN rows, never a silent zero.
            nan_rows = empty & ~_label_masks(xp, lab2, V, args.ignore_index)[1]
    xent_options = {
        "weight": weight,
        "ignore_index": args.ignore_index,
        "label_smoothing": args.label_smoothing,
        "reduction": "none" if args.reduction == "none" else "sum",
        "z_loss": args.z_loss,
        "softcap": args.softcap,
        "check_labels": False,
    }
    total = xp.zeros((), dtype=work, device=dev)
    row_losses = []
    dx_parts = []
    dW = xp.zeros((H, V), dtype=work, device=dev)
    db = None if bw is None else xp.zeros((V,), dtype=work, device=dev)
    for start in range(0, N, args.chunk_rows):
        stop = min(N, start + args.chunk_rows)
        xc = x2[start:stop, :]
        z = xp.matmul(xc, Ww)
        if bw is not None:
            z = z + bw
        loss_c, g = softmax_cross_entropy(z, lab2[start:stop, ...], xp=xp, **xent_options)
        if inv is not None:
            g = g * inv
        if nan_rows is not None:
            nan = xp.asarray(float("nan"), dtype=g.dtype, device=dev)
            g = xp.where(nan_rows[start:stop, None], nan, g)
        if need_dx:
            dx_parts.append(xp.matmul(g, xp.matrix_transpose(Ww)))
        dW = dW + xp.matmul(xp.matrix_transpose(xc), g)
        if db is not None:
            db = db + xp.sum(g, axis=0)
        if args.reduction == "none":
            row_losses.append(loss_c)
        else:
            total = total + loss_c

    if args.reduction == "none":
        loss = xp.concat(row_losses) if row_losses else xp.zeros((0,), dtype=work, device=dev)
        loss = xp.reshape(loss, lead)
    elif args.reduction == "sum":
        loss = total
    else:
        nan = xp.asarray(float("nan"), dtype=work, device=dev)
        loss = xp.where(empty, nan, total / safe)
    dx = None
    if need_dx:
        dx = xp.concat(dx_parts, axis=0) if dx_parts else xp.zeros((0, H), dtype=work, device=dev)
        dx = astype(xp, xp.reshape(dx, tuple(x.shape)), args.dtype)
    loss = xp.asarray(astype(xp, loss, args.dtype))
    dW = astype(xp, dW, args.dtype)
    db = None if db is None else astype(xp, db, args.dtype)
    return loss, dx, dW, db
