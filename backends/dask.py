r"""Dask fast paths: the losses run the NumPy (or CuPy) fast path once per block.

The generic kernels on a Dask array build a graph of every elementwise operation and
reduction of the formula, each a task per chunk: a dozen tasks per chunk for the
cross-entropy, each making a full-size temporary. Here each loss is one task per block
that calls gradcore's own kernel on that block (so NumPy blocks take the blocked,
threaded NumPy fast path and CuPy blocks the fused CUDA one), plus a task per block to
extract the gradient and one for the block's share of the loss, and a reduction of the
shares: O(number of blocks) tasks, and nothing is computed when the graph is built.

The mean is exact across blocks: a block cannot divide by its own divisor, so each block
computes its share of the *global* mean directly. All three losses are linear in their
weights, so a block that is given the weights divided by the global divisor, with
``reduction="sum"``, returns its rows' contribution to the global mean loss and exactly
the global mean's gradient rows, in the same single pass over memory:

- MSE and BCE divide by the number of elements, known when the graph is built;
- cross-entropy with soft targets divides by the number of rows, also known;
- cross-entropy with class indices divides by :math:`\sum_i w_{y_i}` over the
  non-ignored rows (their count without weights): a first, cheap pass over the labels
  only (one task per label block and one sum) computes it, and every block task
  depends on it. A zero divisor gives a NaN loss, NaN gradient rows for the rows not
  ignored and zero rows for ignored ones (so an all-ignored input has a zero
  gradient), as the generic kernel does. With ``z_loss > 0`` (a term not scaled by the weights) the
  block's gradient is divided by the divisor afterwards instead.

Which inputs take this path: Dask arrays of float32 or float64 with known chunk sizes.
For :func:`softmax_cross_entropy`, 2-D logits whose class axis (``axis=-1``) is one
chunk (rows chunked freely; labels are rechunked to the logits' rows); logits whose
class axis is split over several chunks, N-d logits and ``axis=0`` take the generic
path (rechunk the class axis to one chunk, ``x.rechunk({1: -1})``, to get this one).
For :func:`mse` and :func:`binary_cross_entropy_with_logits`, any shape and any
chunking: targets are rechunked to the prediction's chunks, and weights are broadcast
to them. ``out=``, ``inplace=True`` and ``softcap`` take the generic path.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import array_api_compat
import array_api_compat.dask.array as dxp
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from gradcore._checks import is_floating
from gradcore._dispatch import register_fast_path
from gradcore.losses import _label_masks, _validate_bce, _validate_mse, _validate_xent

__all__ = ["binary_cross_entropy_with_logits", "mse", "softmax_cross_entropy"]

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_dask(a: Any) -> bool:
    return isinstance(a, da.Array)


def _known_chunks(a: Any) -> bool:
    return all(not math.isnan(c) for dim in a.chunks for c in dim)


def _usable(x: Any) -> bool:
    return (
        _is_dask(x)
        and np.dtype(x.dtype) in _FAST_DTYPES
        and x.size > 0
        and _known_chunks(x)
        and all(not math.isnan(s) for s in x.shape)
    )


def _small(w: Any) -> Any:
    """A weight that goes into every block task whole: NumPy, or a one-chunk Dask array."""
    if w is None or not _is_dask(w):
        return w
    return w.rechunk(tuple(int(s) for s in w.shape))


def _key_or_value(w: Any) -> Any:
    if _is_dask(w):
        keys = w.__dask_keys__()
        while isinstance(keys, list):
            keys = keys[0]
        return keys
    return w


def _namespace(block: Any) -> Any:
    return array_api_compat.array_namespace(block)


def _part(result: tuple[Any, Any]) -> Any:
    """The block's loss share as a 1-element float64 array (on the block's device)."""
    loss = result[0]
    xp = _namespace(loss)
    return xp.reshape(xp.astype(loss, xp.float64), (1,))


def _total(divisor: Any, dtype: str, *parts: Any) -> Any:
    """The loss: the sum of the block shares, NaN where the divisor is 0, in ``dtype``."""
    xp = _namespace(parts[0])
    total = xp.sum(xp.concat(parts))
    if divisor is not None and float(divisor) == 0.0:
        total = xp.asarray(float("nan"), dtype=xp.float64)
    return xp.astype(total, getattr(xp, dtype))


def _assemble(
    x: Any,
    kind: str,
    token: str,
    block_args: dict[tuple[int, ...], tuple[Any, ...]],
    func: Any,
    reduction: str,
    deps: list[Any],
    divisor_key: Any,
    extra: dict[Any, Any],
) -> tuple[Any, Any]:
    """The (loss, grad) Dask arrays of one task per block of ``x``.

    ``block_args[idx]`` are the arguments (keys or values) of the task of block ``idx``;
    ``loss`` is per element ("none", with ``x``'s chunks, or its rows' for the
    cross-entropy), or the sum of the block shares (one task), NaN where the divisor
    (the task ``divisor_key``, or None) is 0.
    """
    pname = f"gradcore-{kind}-{token}"
    gname = f"gradcore-{kind}-grad-{token}"
    lname = f"gradcore-{kind}-loss-{token}"
    tasks: dict[Any, Any] = dict(extra)
    for idx, args in block_args.items():
        key = (pname, *idx)
        tasks[key] = (func, *args)
    grads: dict[Any, Any] = {
        (gname, *idx): (operator.getitem, (pname, *idx), 1) for idx in block_args
    }
    graph = HighLevelGraph.from_collections(gname, {**tasks, **grads}, dependencies=deps)
    grad = da.Array(graph, gname, chunks=x.chunks, dtype=x.dtype, meta=x._meta)

    rows_only = kind == "xent"
    losses: dict[Any, Any]
    if reduction == "none":
        if rows_only:
            losses = {(lname, idx[0]): (operator.getitem, (pname, *idx), 0) for idx in block_args}
            chunks: Any = (x.chunks[0],)
            meta = x._meta.reshape(-1)[:0]
        else:
            losses = {(lname, *idx): (operator.getitem, (pname, *idx), 0) for idx in block_args}
            chunks, meta = x.chunks, x._meta
        graph = HighLevelGraph.from_collections(lname, {**tasks, **losses}, dependencies=deps)
        return da.Array(graph, lname, chunks=chunks, dtype=x.dtype, meta=meta), grad

    order = list(block_args)
    # The small shares are taken out where the blocks are, then summed by one task.
    losses = {(lname, k): (_part, (pname, *idx)) for k, idx in enumerate(order)}
    tname = f"gradcore-{kind}-total-{token}"
    losses[(tname,)] = (_total, divisor_key, np.dtype(x.dtype).name, *losses)
    graph = HighLevelGraph.from_collections(tname, {**tasks, **losses}, dependencies=deps)
    meta = x._meta.reshape(-1)[:0].sum()
    return da.Array(graph, tname, chunks=(), dtype=x.dtype, meta=meta), grad


# --- softmax cross-entropy -------------------------------------------------------------------


def _divisor(weight: Any, *blocks: Any, num_classes: int, ignore_index: int) -> Any:
    """Σ w_y over the labelled rows of all label blocks (float64, 0-d): the labels are
    small next to the logits, so one task reads them all."""
    xp = _namespace(blocks[0])
    labels = xp.concat(blocks)
    # Compared in int64 (uint64 as is: its values past int64 are out of range anyway).
    lab = labels if labels.dtype == xp.uint64 else xp.astype(labels, xp.int64)
    active = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
    if weight is None:
        total = xp.sum(xp.astype(active, xp.float64))
    else:
        w = xp.asarray(weight, dtype=xp.float64)
        safe = xp.where(active, lab, xp.zeros_like(lab))
        total = xp.sum(xp.where(active, xp.take(w, xp.astype(safe, xp.int64)), 0.0))
    return total


def _xent_block(
    x: Any,
    labels: Any,
    weight: Any,
    divisor: Any,
    *,
    options: dict[str, Any],
    reduction: str,
    num_classes: int,
) -> tuple[Any, Any]:
    from gradcore.losses import softmax_cross_entropy

    if reduction != "mean":
        return softmax_cross_entropy(x, labels, weight=weight, reduction=reduction, **options)
    xp = _namespace(x)
    d = float(divisor)
    if d == 0.0 and not is_floating(xp, labels):
        # 0/0 for every row not ignored, as on one array (and in PyTorch): NaN gradient
        # rows there, zero rows for ignored ones; the loss is made NaN by ``_total``.
        loss, grad = softmax_cross_entropy(x, labels, weight=weight, reduction="sum", **options)
        counted = ~_label_masks(xp, labels, num_classes, options["ignore_index"])[1]
        nan = xp.asarray(float("nan"), dtype=grad.dtype)
        return loss, xp.where(counted[:, None], nan, grad)
    safe = d if d != 0.0 else 1.0
    if options["z_loss"] == 0.0:
        if weight is None:
            scaled = xp.full((num_classes,), 1.0 / safe, dtype=xp.float64)
        else:
            scaled = xp.asarray(weight, dtype=xp.float64) / safe
        return softmax_cross_entropy(x, labels, weight=scaled, reduction="sum", **options)
    loss, grad = softmax_cross_entropy(x, labels, weight=weight, reduction="sum", **options)
    return loss / safe, grad * xp.asarray(1.0 / safe, dtype=x.dtype)


@register_fast_path("dask", "softmax_cross_entropy")
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
    softcap: float | None = None,
    check_labels: bool | None = None,
    out: Any = None,
    inplace: bool = False,
) -> Any:
    """One NumPy/CuPy fast-path call per row block of :func:`gradcore.softmax_cross_entropy`."""
    if not _usable(logits) or logits.ndim != 2 or out is not None or inplace is not False:
        return NotImplemented
    if softcap is not None:  # the generic body caps lazily; blocks do not (yet)
        return NotImplemented
    if len(logits.chunks[1]) != 1 or not hasattr(labels, "dtype"):
        return NotImplemented
    if weight is not None and not (_is_dask(weight) or isinstance(weight, np.ndarray)):
        return NotImplemented
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
        xp=dxp,
    )
    if args.axis != 1:
        return NotImplemented
    rows = logits.chunks[0]
    labels = da.asarray(labels)
    labels = labels.rechunk((rows,) if not args.soft else logits.chunks)
    if not _known_chunks(labels):
        return NotImplemented
    weight = _small(weight)
    wkey = _key_or_value(weight)
    deps = [logits, labels] + ([weight] if _is_dask(weight) else [])
    token = tokenize(logits, labels, weight, args)
    options = {
        "ignore_index": args.ignore_index,
        "label_smoothing": args.label_smoothing,
        "z_loss": args.z_loss,
        "check_labels": False,  # checked above when asked; a block must not raise late
    }

    extra: dict[Any, Any] = {}
    dkey: Any = None
    if args.reduction == "mean":
        if args.soft:
            dkey = float(math.prod(logits.shape[:-1]))
        else:
            dkey = (f"gradcore-xent-divisor-{token}",)
            count = functools.partial(
                _divisor, num_classes=args.num_classes, ignore_index=args.ignore_index
            )
            extra[dkey] = (count, wkey, *[(labels.name, i) for i in range(len(rows))])
    block = functools.partial(
        _xent_block, options=options, reduction=args.reduction, num_classes=args.num_classes
    )
    block_args: dict[tuple[int, ...], tuple[Any, ...]] = {}
    for i in range(len(rows)):
        lkey = (labels.name, i) if not args.soft else (labels.name, i, 0)
        block_args[(i, 0)] = ((logits.name, i, 0), lkey, wkey, dkey)
    divisor_key = dkey if isinstance(dkey, tuple) else None
    return _assemble(
        logits, "xent", token, block_args, block, args.reduction, deps, divisor_key, extra
    )


# --- elementwise losses ------------------------------------------------------------------------


def _like(x: Any, a: Any) -> Any:
    """``a`` (same shape as ``x``, or broadcastable) as a Dask array with ``x``'s chunks."""
    if a is None:
        return None
    a = da.asarray(a)
    if tuple(a.shape) == tuple(x.shape):
        return a.rechunk(x.chunks)
    # The weight's own axes take x's chunks where they are not broadcast (size 1).
    lead = x.ndim - a.ndim
    own = tuple((1,) if int(a.shape[j]) == 1 else x.chunks[lead + j] for j in range(a.ndim))
    return da.broadcast_to(a.rechunk(own), x.shape, chunks=x.chunks)


def _elementwise_block(
    x: Any, *rest: Any, kernel: str, reduction: str, scale: float, names: tuple[str, ...]
) -> tuple[Any, Any]:
    from gradcore import losses

    target, *weights = rest
    options = dict(zip(names, weights, strict=True))
    if reduction == "mean":
        xp = _namespace(x)
        w = options.get("weight")
        # Every element of the block weighed by 1/N: the share of the global mean, and
        # its gradient, in one pass (the losses are linear in the weight).
        options["weight"] = (
            xp.asarray(scale, dtype=x.dtype) if w is None else xp.astype(w, x.dtype) * scale
        )
        reduction = "sum"
    return getattr(losses, kernel)(x, target, reduction=reduction, **options)


def _elementwise(
    kernel: str, x: Any, target: Any, weights: dict[str, Any], reduction: str
) -> tuple[Any, Any]:
    target = _like(x, target)
    names = tuple(k for k, w in weights.items() if w is not None)
    extras = [_like(x, weights[k]) for k in names]
    arrays = [target, *extras]
    if not all(_known_chunks(a) for a in arrays):
        return NotImplemented
    token = tokenize(kernel, x, *arrays, names, reduction)
    block = functools.partial(
        _elementwise_block,
        kernel=kernel,
        reduction=reduction,
        scale=1.0 / x.size,
        names=names,
    )
    block_args = {
        idx: tuple((a.name, *idx) for a in (x, *arrays)) for idx in np.ndindex(*x.numblocks)
    }
    return _assemble(x, kernel, token, block_args, block, reduction, [x, *arrays], None, {})


def _elementwise_inputs_ok(x: Any, target: Any, *weights: Any) -> bool:
    if not _usable(x):
        return False
    for a in (target, *weights):
        if a is not None and not (_is_dask(a) or isinstance(a, np.ndarray)):
            return False
    return True


@register_fast_path("dask", "mse")
def mse(
    pred: Any,
    target: Any,
    /,
    *,
    weight: Any = None,
    reduction: str = "mean",
    out: Any = None,
    inplace: bool = False,
) -> Any:
    """One NumPy/CuPy fast-path call per block of :func:`gradcore.mse`."""
    if out is not None or inplace is not False or not _elementwise_inputs_ok(pred, target, weight):
        return NotImplemented
    reduction = _validate_mse(
        pred, target, weight=weight, reduction=reduction, out=out, inplace=inplace, xp=dxp
    )
    return _elementwise("mse", pred, target, {"weight": weight}, reduction)


@register_fast_path("dask", "binary_cross_entropy_with_logits")
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
) -> Any:
    """One NumPy/CuPy fast-path call per block of :func:`gradcore.binary_cross_entropy_with_logits`."""  # noqa: E501
    if out is not None or inplace is not False:
        return NotImplemented
    if not _elementwise_inputs_ok(logits, targets, weight, pos_weight):
        return NotImplemented
    reduction = _validate_bce(
        logits,
        targets,
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
        out=out,
        inplace=inplace,
        xp=dxp,
    )
    weights = {"weight": weight, "pos_weight": pos_weight}
    return _elementwise("binary_cross_entropy_with_logits", logits, targets, weights, reduction)
