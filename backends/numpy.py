r"""NumPy fast paths: the fused losses (cache-blocked, in place, threaded), activations, linear.

The generic kernels in :mod:`gradcore.losses` make one full pass over memory per
operation, each with a fresh temporary the size of the logits. Here the rows are
processed in blocks that fit in a core's L2 cache; inside a block every NumPy ufunc
writes into a preallocated scratch buffer (``out=``), so the logits are read from main
memory once and the gradient is written once. Row blocks are spread over a pool of
threads (NumPy ufuncs release the GIL); the pool is sized by
:func:`gradcore.get_num_threads` and reused across calls.

Softmax cross-entropy, per block of rows :math:`x` (shape ``(b, C)``):

1. gather the target logits :math:`x_{i,y_i}` (and, with label smoothing, the row sums
   :math:`\sum_c w_c x_{ic}`) before anything can overwrite them;
2. ``exp(x)`` into the scratch block :math:`S` and its row sums :math:`s_i` — without
   subtracting the row maximum;
3. one multiply writes the gradient :math:`S\cdot c_i` where
   :math:`c_i = \mathrm{scale}\cdot a_i / s_i` folds the softmax normalisation, the
   coefficient :math:`a_i` of the loss (weights, smoothing, z-loss) and the mean's
   :math:`1/\sum w_{y}` into one per-row factor;
4. the target term is subtracted at one index per row.

Skipping the max subtraction is exact to the dtype's rounding only while
:math:`c_i` is 0 or lies in ``[tiny, 1/eps]`` (``tiny`` the smallest normal number):
below, :math:`c_i` itself rounds to a subnormal or to zero (large logits, many rows:
float32 ``x = 88`` with ``N = 1e7``); above, entries of :math:`S` that fell into the
subnormal range would be scaled up with their lost bits (rows of very negative
logits). Rows outside that range, and rows whose :math:`s_i` is not finite or below
``sqrt(tiny)`` (``inf``, NaN), are redone the textbook way, with the maximum subtracted,
from the untouched input block, before anything is written; so every finite input gives
the generic path's result to the dtype's rounding. A ``+inf`` logit is subtracted as it
is and makes its row NaN, as in PyTorch.

The log-sum-exp :math:`\log s_i` and the loss are computed in float64 per row; the row
sums :math:`s_i` are accumulated to a few units of float32 rounding in every layout
(see :func:`_row_sums`). MSE and BCE-with-logits use the same blocking over flat chunks.

Aliasing: the loops write the gradient block by block while still reading the other
inputs, so labels, targets and weights that may share memory with the gradient's
destination (``out=``, or the input itself with ``inplace=True``) are copied first; an
``out=`` that partly overlaps the logits gets a fresh gradient copied back at the end
(``out=`` that *is* the logits is safe: each block is read before it is written).

Layouts: any array whose rows (all axes but the class axis) form one strided axis is
read and written in place through a strided view — C order, Fortran order, slices, or
``axis=0``. Column-major rows get blocks of many samples so that each block reads whole
pages. Only N-d arrays whose other axes cannot merge (e.g. ``(N, C, d)`` with
``axis=1``) go through a contiguous copy of the logits (and, for ``out=`` or
``inplace=True`` into such a layout, a gradient copied back at the end).

Every fast path first calls the generic kernel's ``_validate_*`` function, so errors are
the same on both paths, and returns ``NotImplemented`` (the generic code then runs) for
dtypes other than native-byte-order float32/float64 (``'>f8'`` on a little-endian
machine, float16, longdouble: the generic body computes those by width, at least in
float64 for 64-bit and wider types), empty inputs and non-NumPy arrays.

Small inputs (one block, at most :data:`SMALL_BYTES`) of the common cases — integer
labels without weights, smoothing or z-loss; MSE without weights or ``out=`` — skip the
blocked machinery: the same arithmetic on the calling thread, with no per-row masks.

The activations (relu, leaky_relu, sigmoid, tanh and their VJPs) replace the generic
``where`` selections, which NumPy runs with a data-dependent branch per element, by
branch-free bit-exact formulations (see the section below); ``linear``/``linear_vjp``
call ``matmul`` directly. Both raise the generic kernels' errors through the same
helpers, or return ``NotImplemented`` and let the generic body raise them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import array_api_compat.numpy as np_compat
import numpy as np

from gradcore import activations as _act
from gradcore._checks import check_same_shape
from gradcore._dispatch import check_thread_setting, get_num_threads, register_fast_path
from gradcore.linear import _check_x_w
from gradcore.linear_xent import _validate_lxent
from gradcore.losses import (
    _check_softcap,
    _check_softcap_dtype,
    _validate_bce,
    _validate_mse,
    _validate_xent,
)

__all__ = [
    "binary_cross_entropy_with_logits",
    "leaky_relu",
    "leaky_relu_vjp",
    "linear",
    "linear_cross_entropy",
    "linear_vjp",
    "mse",
    "relu",
    "relu_vjp",
    "sigmoid",
    "sigmoid_vjp",
    "softmax_cross_entropy",
    "tanh",
    "tanh_vjp",
]

#: Bytes of one block's scratch buffer (a core's L2 holds it with room to stream).
BLOCK_BYTES = 1024 * 1024
#: Row sums of exp blocks through BLAS (a matrix-vector product with ones).
USE_BLAS_ROW_SUMS = True
#: Rows per block when rows are column-major (samples contiguous in memory).
TRANSPOSED_BLOCK_ROWS = 1024
#: Below this many elements a call runs on the calling thread only.
MIN_PARALLEL_ELEMENTS = 1 << 17

#: Inputs up to this size (and one block) take a direct path without the blocked
#: machinery: no thread pool, no per-row masks and weights.
SMALL_BYTES = 64 * 1024

_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _plain(a: Any) -> bool:
    """A plain ndarray: subclasses (masked arrays, matrices) take the generic path."""
    return type(a) is np.ndarray


# --- threads ---------------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)
_pool_lock = threading.Lock()
#: Calls currently submitting to or waiting on each pool (keyed by id, with its pid).
_pool_users: dict[int, int] = {}


@contextlib.contextmanager
def _borrow_pool(n: int) -> Iterator[ThreadPoolExecutor]:
    """The shared pool of ``n`` threads, held for the duration of one call.

    A new size (or a fork: the parent's threads are gone) makes a new pool; the old one
    is shut down only once the last call still using it has returned, so a concurrent
    :func:`gradcore.set_num_threads` never pulls a pool from under a running kernel.
    """
    global _pool, _pool_key
    key = (n, os.getpid())
    with _pool_lock:
        if _pool is None or _pool_key != key:
            old, old_pid = _pool, _pool_key[1]
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gradcore")
            _pool_key = key
            if old is not None and old_pid == key[1] and not _pool_users.get(id(old)):
                old.shutdown(wait=False)
        pool = _pool
        _pool_users[id(pool)] = _pool_users.get(id(pool), 0) + 1
    try:
        yield pool
    finally:
        with _pool_lock:
            left = _pool_users[id(pool)] - 1
            if left:
                _pool_users[id(pool)] = left
            else:
                del _pool_users[id(pool)]
                if pool is not _pool:  # retired while this call ran: its last user
                    pool.shutdown(wait=False)


def _parallel(n_rows: int, block_rows: int, n_elements: int, work: Callable[..., None]) -> None:
    """Run ``work(start, stop)`` over ``[0, n_rows)`` split into per-thread chunks.

    Chunks are whole multiples of ``block_rows`` (except the last), so every thread
    iterates over full blocks and only the final block is ragged.
    """
    if n_elements < MIN_PARALLEL_ELEMENTS:
        work(0, n_rows)
        return
    n_threads = get_num_threads()  # read once: another thread may change it meanwhile
    n_blocks = -(-n_rows // block_rows)
    threads = min(n_threads, n_blocks)
    if threads <= 1:
        work(0, n_rows)
        return
    edges = [min(n_rows, (n_blocks * k // threads) * block_rows) for k in range(threads + 1)]
    chunks = [(lo, hi) for lo, hi in itertools.pairwise(edges) if hi > lo]
    with _borrow_pool(n_threads) as pool:
        futures = [pool.submit(work, lo, hi) for lo, hi in chunks[1:]]
        try:
            work(*chunks[0])  # the calling thread takes the first chunk itself
        finally:
            for f in futures:  # never return while a worker may still write
                f.result()


# --- layout helpers --------------------------------------------------------------------


def _rows_view(a: np.ndarray, axis: int, n_cols: int) -> np.ndarray | None:
    """``a`` with ``axis`` moved last, as a (rows, n_cols) view, or None if that needs a copy."""
    v = np.moveaxis(a, axis, -1) if axis != a.ndim - 1 else a
    try:
        return np.reshape(v, (-1, n_cols), copy=False)
    except ValueError:
        return None


def _rows_input(a: np.ndarray, axis: int, n_cols: int) -> np.ndarray:
    v = _rows_view(a, axis, n_cols)
    if v is None:  # rows can't be one strided axis: read from a contiguous copy
        v = np.ascontiguousarray(np.moveaxis(a, axis, -1)).reshape(-1, n_cols)
    return v


class _Target:
    """Where a gradient goes: a (rows, cols) view, plus a copy-back when none exists."""

    def __init__(
        self,
        dest: np.ndarray | None,
        shape: tuple[int, ...],
        axis: int,
        dtype: Any,
        transposed: bool = False,
    ):
        n_cols = shape[axis]
        self.dest = dest
        self.axis = axis
        self.copy_back = False
        if dest is None and transposed:
            # Keep the input's layout (samples contiguous), so blocks read and write alike.
            self.rows = np.empty((n_cols, math.prod(shape) // n_cols), dtype=dtype).T
            self.result = self.rows if axis == 1 else self.rows.T
            return
        if dest is None:
            moved = shape[:axis] + shape[axis + 1 :] + (n_cols,)
            full = np.empty(moved, dtype=dtype)
            self.rows = full.reshape(-1, n_cols)
            self.result = np.moveaxis(full, -1, axis) if axis != len(shape) - 1 else full
            return
        v = _rows_view(dest, axis, n_cols)
        if v is None:
            v = np.empty((math.prod(shape) // max(n_cols, 1), n_cols), dtype=dtype)
            self.copy_back = True
        self.rows = v
        self.result = dest

    def finish(self) -> np.ndarray:
        if self.copy_back:
            assert self.dest is not None
            moved = np.moveaxis(self.dest, self.axis, -1)
            np.copyto(moved, self.rows.reshape(moved.shape))
        return self.result


def _aliases(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the very same memory with the same layout."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


def _unalias(inplace: bool, x: np.ndarray, out: Any, *others: Any) -> list[Any]:
    """``others`` (labels, targets, weights), each copied if the gradient's destination
    (``x`` itself for ``inplace=True``, else ``out``) may overlap it.

    The blocked loops write the gradient block by block while still reading the other
    inputs (and threads write blocks that others read), so an input that shares memory
    with the destination would be read after being overwritten. These inputs are at
    most the size of ``x``, and overlap is rare; a copy keeps every case exact.
    """
    dest = x if inplace else out
    if dest is None:
        return list(others)
    return [o.copy() if o is not None and np.may_share_memory(dest, o) else o for o in others]


def _grad_target(
    x: np.ndarray,
    axis: int,
    out: np.ndarray | None,
    inplace: bool,
    reads: list[np.ndarray],
    transposed: bool,
) -> _Target:
    """The gradient's destination; ``out`` that partly overlaps an input gets a copy-back."""
    dest = x if inplace else out
    target = _Target(dest, x.shape, axis, x.dtype, transposed and x.ndim == 2)
    if dest is not None and not inplace and not target.copy_back:
        for r in reads:
            # The blocked loop reads a block of x before writing the same block of the
            # gradient, so out= may be x itself; any other overlap goes through a copy.
            if np.may_share_memory(dest, r) and not (r is x and _aliases(dest, x)):
                target.rows = np.empty_like(target.rows)
                target.copy_back = True
                break
    return target


def _stable_limits(dtype: np.dtype) -> float:
    # A row sum of exp(x) below sqrt(tiny) (or not finite) always takes the shifted route;
    # the per-row factor's range (_coef_ok) decides the rest.
    return float(np.sqrt(np.finfo(dtype).tiny))


_TINY = {d: _stable_limits(d) for d in _FAST_DTYPES}
#: The per-row factor c_i must be a normal number (else it loses bits, rounding to a
#: subnormal or zero: rows of large logits) ...
_COEF_MIN = {d: float(np.finfo(d).tiny) for d in _FAST_DTYPES}
#: ... and at most 1/eps, so that the rounding of an entry of exp(x) that fell into the
#: subnormal range (absolute error tiny * eps / 2) times c_i stays below tiny.
_COEF_MAX = {d: float(1.0 / np.finfo(d).eps) for d in _FAST_DTYPES}


def _coef_bad(coef: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Rows whose factor ``c_i`` would not make ``exp(x) * c_i`` exact to the dtype's
    rounding (None when there are none, the common case, found with two reductions).

    Elsewhere each gradient entry, and with it the whole row, agrees with the
    max-shifted textbook computation to a few units in the last place (or, for entries
    below the normal range, to the dtype's smallest normal number). NaN counts as bad.
    """
    if coef.min() >= _COEF_MIN[dtype] and coef.max() <= _COEF_MAX[dtype]:  # false for NaN
        return None
    bad = ~_coef_ok(coef, dtype)
    return bad if bad.any() else None


def _coef_ok(coef: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows whose factor ``c_i`` is 0 or in [tiny, 1/eps] in absolute value (see above)."""
    c = np.abs(coef)
    ok = c >= _COEF_MIN[dtype]
    ok &= c <= _COEF_MAX[dtype]
    ok |= c == 0.0
    return ok


_ones_cache: dict[tuple[int, Any], np.ndarray] = {}
_chunk_cache: dict[int, int] = {}
#: Rows up to this long are summed by one BLAS matrix-vector product each; longer ones in
#: chunks (see _row_sums).
BLAS_ROW_MAX = 2048


def _ones(n: int, dtype: Any) -> np.ndarray:
    key = (n, dtype)
    ones = _ones_cache.get(key)
    if ones is None:
        ones = _ones_cache.setdefault(key, np.ones(n, dtype=dtype))
    return ones


def _chunk(C: int) -> int:
    """A divisor of ``C`` in [256, BLAS_ROW_MAX] (0 if none): the chunk of a long row."""
    k = _chunk_cache.get(C)
    if k is None:
        k = next((d for d in range(256, BLAS_ROW_MAX + 1) if C % d == 0), 0)
        _chunk_cache[C] = k
    return k


def _row_sums(s: np.ndarray) -> np.ndarray:
    """Row sums of a non-negative block in float64, to a few units of the block's rounding.

    For C-contiguous blocks a matrix-vector product with ones runs 2-4x faster than
    ``np.add.reduce`` over rows. BLAS adds each row in a handful of running float32
    sums, so a long row would lose precision (rows of 2**20: 1e-5 relative): rows longer
    than :data:`BLAS_ROW_MAX` are summed in chunks of at most that many entries by one
    product over the block seen as (rows * chunks, chunk), and the chunks' sums are added
    in float64 (as fast as the plain product, 1e-8 relative). Rows with no such chunk
    length use NumPy's pairwise sum. Other layouts (column-major blocks, strided views)
    would add element by element in the block's dtype, so they accumulate in float64.
    """
    if not (s.flags.c_contiguous and USE_BLAS_ROW_SUMS):
        return np.add.reduce(s, axis=1, dtype=np.float64)
    n, C = s.shape
    if C <= BLAS_ROW_MAX:
        return np.matmul(s, _ones(C, s.dtype)).astype(np.float64)
    k = _chunk(C)
    if k == 0:
        return np.add.reduce(s, axis=1).astype(np.float64)
    partial = np.matmul(s.reshape(n * (C // k), k), _ones(k, s.dtype))
    return np.add.reduce(partial.reshape(n, C // k), axis=1, dtype=np.float64)


def _row_dot(x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Per-row ``sum_c w_c x_ic`` (plain sum without ``w``) in float64, any layout."""
    if x.flags.c_contiguous:
        r = np.add.reduce(x, axis=1) if w is None else x @ w
        return r.astype(np.float64)
    if w is None:
        return np.add.reduce(x, axis=1, dtype=np.float64)
    return np.einsum("ij,j->i", x, w, dtype=np.float64)


def _exp_rows(
    x: np.ndarray, s: np.ndarray, tiny: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """exp(x) into ``s``; return (row sums in float64, per-row shift, rows shifted).

    Shift and mask are None when no row needed one. The caller silences floating-point
    warnings: rows that overflow are redone here, with their maximum subtracted.
    """
    np.exp(x, out=s)
    sums = _row_sums(s)
    if sums.min() >= tiny and sums.max() < np.inf:  # false with NaN too
        return sums, None, None
    ok = sums >= tiny
    ok &= sums < np.inf
    shift = np.zeros_like(sums)
    redo = ~ok
    _shift_rows(x, s, sums, shift, np.flatnonzero(redo))
    return sums, shift, redo


def _shift_rows(
    x: np.ndarray, s: np.ndarray, sums: np.ndarray, shift: np.ndarray, idx: np.ndarray
) -> None:
    """Redo rows ``idx`` of ``s = exp(x)`` the textbook way, with the row maximum subtracted.

    ``x`` is only read (the rows are copied). A row whose maximum is ``-inf`` (all
    entries ``-inf``) keeps shift 0 and gives 0/0 = NaN downstream; a maximum of ``+inf``
    is subtracted as it is, so that the row becomes NaN, as in PyTorch.
    """
    if idx.size == 0:
        return
    xb = x[idx]  # a copy; the input block itself is never written here
    m = np.max(xb, axis=1)
    m[m == -np.inf] = 0.0
    xb -= m[:, None]
    np.exp(xb, out=xb)
    s[idx] = xb
    sums[idx] = np.add.reduce(xb, axis=1, dtype=np.float64)
    shift[idx] = m


def _exp_rows_inplace(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(x - max) written over x; return (row sums in float64, per-row shift).

    x is destroyed here, so no row can be redone later: every row is shifted.
    """
    m = np.max(x, axis=1)
    m[m == -np.inf] = 0.0  # all -inf rows: 0/0 = NaN downstream; +inf rows become NaN
    np.subtract(x, m[:, None], out=x)
    np.exp(x, out=x)
    return _row_sums(x), m.astype(np.float64)


# --- softmax cross-entropy --------------------------------------------------------------


def _xent_prologue(logits: Any, labels: Any, weight: Any, out: Any) -> bool:
    if not _plain(logits) or not _plain(labels):
        return False
    if logits.dtype not in _FAST_DTYPES or logits.size == 0:
        return False
    if labels.dtype == np.uint64:
        return False  # values past 2**63 would wrap in intp; the generic path compares them
    if weight is not None and not _plain(weight):
        return False
    return out is None or _plain(out)


@register_fast_path("numpy", "softmax_cross_entropy")
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
) -> Any:
    """Blocked, threaded NumPy version of :func:`gradcore.softmax_cross_entropy`."""
    if not _xent_prologue(logits, labels, weight, out):
        return NotImplemented
    if softcap is not None:
        return _xent_softcap(
            logits, labels, softcap, axis=axis, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss,
            check_labels=check_labels, out=out, inplace=inplace,
        )  # fmt: skip
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
        xp=np_compat,
    )
    check_thread_setting()  # a bad GRADCORE_NUM_THREADS fails on first use, at any size
    labels, weight = _unalias(inplace, logits, out, labels, weight)
    if (
        logits.ndim == 2
        and args.axis == 1
        and not args.soft
        and weight is None
        and out is None
        and args.label_smoothing == 0.0
        and args.z_loss == 0.0
        and logits.nbytes <= min(SMALL_BYTES, BLOCK_BYTES)
        and logits.flags.c_contiguous
    ):
        result = _xent_small(logits, labels, args.ignore_index, args.reduction, inplace)
        if result is not None:
            return result
    dtype = logits.dtype
    ax, C = args.axis, args.num_classes
    eps, z = args.label_smoothing, args.z_loss
    rows_shape = logits.shape[:ax] + logits.shape[ax + 1 :]
    N = math.prod(rows_shape)

    X = _rows_input(logits, ax, C)
    # Column-major rows (Fortran order, or axis=0 of C order): a block of a few rows
    # would touch one cache line and one page per class, so blocks span many samples.
    transposed = X.strides[0] == dtype.itemsize and X.strides[1] != dtype.itemsize and N > 1
    reads = [logits, labels] + ([] if weight is None else [weight])
    target = _grad_target(logits, ax, out, inplace, reads, transposed)
    G = target.rows
    w64 = None if weight is None else np.asarray(weight, dtype=np.float64)
    W = float(C) if w64 is None else float(w64.sum())
    wv = None if w64 is None else w64.astype(dtype)
    tiny = _stable_limits(dtype)
    block = max(1, BLOCK_BYTES // (C * dtype.itemsize))
    if transposed and not args.soft:
        block = max(block, TRANSPOSED_BLOCK_ROWS)
    row_loss = np.empty(N, dtype=np.float64)

    if args.soft:
        Y = _rows_input(labels, ax, C)
        if Y.dtype != dtype:
            Y = Y.astype(dtype)
        scale = 1.0 / N if args.reduction == "mean" else 1.0
        divisor = float(N)
        work = _soft_worker(X, Y, G, row_loss, wv, eps, z, scale, tiny, block)
        bad_rows = None
    else:
        lab = np.reshape(labels, -1).astype(np.intp, copy=False)
        ignored = lab == ignore_index
        in_range = (lab >= 0) & (lab < C)
        active = in_range & ~ignored
        bad = ~ignored & ~in_range
        bad_rows = bad if bad.any() else None
        lab_safe = np.where(in_range, lab, 0)
        if w64 is None:
            w_y = active.astype(np.float64)
        else:
            w_y = np.where(active, w64[lab_safe], 0.0)
        divisor = float(w_y.sum()) if args.reduction == "mean" else 1.0
        if divisor == 0.0:
            # PyTorch's 0/0: a NaN mean, NaN rows for every row not ignored (all its
            # terms are divided by 0), zero rows for ignored ones (see the docstring).
            def fill(lo: int, hi: int) -> None:
                g = G[lo:hi]
                g[...] = 0
                g[~ignored[lo:hi]] = np.nan

            _parallel(N, max(1, BLOCK_BYTES // (C * dtype.itemsize)), N * C, fill)
            return np.asarray(np.nan, dtype=dtype), target.finish()
        scale = 1.0 / divisor
        with np.errstate(invalid="ignore"):
            at_label = ((1.0 - eps) * scale * w_y).astype(dtype)
            dense: Any = None
            if eps > 0.0:
                dense = (eps / C) * scale * (1.0 if w64 is None else w64)
                dense = np.asarray(dense).astype(dtype)
        work = _hard_worker(
            X, G, row_loss, lab_safe, active, bad_rows, w_y, at_label, dense, wv,
            eps, z, W, scale, tiny, block,
        )  # fmt: skip

    _parallel(N, block, N * C, work)
    grad = target.finish()

    with np.errstate(invalid="ignore", divide="ignore"):
        if args.reduction == "none":
            loss = row_loss.astype(dtype).reshape(rows_shape)
        else:
            total = float(np.sum(row_loss))
            if bad_rows is not None:
                total = math.nan
            if args.reduction == "mean":
                total = total / divisor if divisor != 0.0 else math.nan
            loss = np.asarray(total, dtype=dtype)
    return loss, grad


def _xent_small(
    x: np.ndarray, labels: np.ndarray, ignore_index: int, reduction: str, inplace: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer labels, all in range, no options: one block on the calling thread.

    The same arithmetic as the blocked loop, without its bookkeeping (per-row weights,
    masks, thread pool). Returns None, having written nothing, when a label is out of
    range or ignored, or when a row needs the max-shifted route; the general path then
    runs.
    """
    N, C = x.shape
    dtype = x.dtype
    lab = labels if labels.dtype == np.intp else labels.astype(np.intp)
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= C or (lo <= ignore_index <= hi and bool((lab == ignore_index).any())):
        return None
    with np.errstate(all="ignore"):
        s = np.exp(x)
        sums = _row_sums(s)
        scale = 1.0 / N if reduction == "mean" else 1.0
        # Every row's factor scale / s_i in [_COEF_MIN, _COEF_MAX] (see _coef_ok), and
        # s_i finite and not tiny; else a row needs the shifted route.
        s_lo = max(_TINY[dtype], scale / _COEF_MAX[dtype])
        s_hi = scale / _COEF_MIN[dtype]
        top = sums.max()
        if not (sums.min() >= s_lo and top <= s_hi and top < np.inf):
            return None
        coef = 1.0 / sums
        if scale != 1.0:
            coef *= scale
        rows = np.arange(N)
        picked = x[rows, lab].astype(np.float64)
        lse = np.log(sums)
        loss = lse - picked
        g = x if inplace else s
        np.multiply(s, coef.astype(dtype)[:, None], out=g)
        g[rows, lab] -= dtype.type(scale)
        if reduction == "none":
            return loss.astype(dtype), g
        total = float(np.sum(loss))
        if reduction == "mean":
            total /= float(N)
        return np.asarray(total, dtype=dtype), g


def _hard_terms(
    sums: np.ndarray,
    shift: np.ndarray | None,
    wy: np.ndarray,
    act: np.ndarray,
    picked: np.ndarray,
    xw: np.ndarray | None,
    eps: float,
    C: int,
    z: float,
    W: float,
    scale: float,
    all_active: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (loss, factor c_i) of the integer-label path, from the rows' exp sums.

    Ignored rows get 0 for both, whatever their logits (inf, NaN) gave.
    """
    lse = np.log(sums)
    if shift is not None:
        lse += shift
    a = wy if eps == 0.0 else (1.0 - eps) * wy
    loss = a * (lse - picked)
    if eps > 0.0:
        assert xw is not None
        a = a + (eps / C) * W * act
        loss += np.where(act, (eps / C) * (W * lse - xw), 0.0)
    if z > 0.0:
        a = a + (2.0 * z) * lse * act
        loss += np.where(act, z * lse * lse, 0.0)
    coef = a / sums
    if scale != 1.0:
        coef *= scale
    if all_active:
        return loss, coef
    return np.where(act, loss, 0.0), np.where(act, coef, 0.0)


def _finite_loss_rows(
    loss: np.ndarray,
    x: np.ndarray,
    sums: np.ndarray,
    shift: np.ndarray | None,
    w: np.ndarray | None,
    f: float,
    z: float,
    rows: np.ndarray | None = None,
    label: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Redo the rows whose loss overflowed although their logits are finite.

    The blocks compute a weighted cross-entropy term as ``W * lse - sum_c w_c x_c``
    (``mass * lse - sum_c t_c x_c`` for soft targets), whose two parts overflow
    separately for logits near the dtype's maximum (float64 ``9e307``) while their
    difference does not. Those rare rows get
    ``f * sum_c w_c (lse - x_c) + z lse^2`` (plus ``a_i (lse - x_{i,y_i})`` with
    ``label = (a, picked)``), computed directly; a zero ``w_c`` counts 0 even against an
    infinite difference. ``w`` is per class (1-D), per entry (2-D) or None (ones);
    ``rows`` masks the rows that may be redone (not ignored ones).
    """
    bad = ~np.isfinite(loss)
    if rows is not None:
        bad &= rows
    if not bad.any():
        return
    idx = np.flatnonzero(bad)
    xk = x[idx].astype(np.float64)
    keep = np.isfinite(xk).all(axis=1)  # inf / NaN logits: NaN stays, as in PyTorch
    idx, xk = idx[keep], xk[keep]
    if idx.size == 0:
        return
    lse = np.log(sums[idx])
    if shift is not None:
        lse = lse + shift[idx]
    diff = lse[:, None] - xk
    if w is None:
        term = diff.sum(axis=1)
    else:
        wk = (w[idx] if w.ndim == 2 else w[None, :]).astype(np.float64)
        term = np.where(wk == 0, 0.0, wk * diff).sum(axis=1)
    value = f * term + (z * lse) * lse
    if label is not None:
        a, picked = label
        value += a[idx] * (lse - picked[idx])
    loss[idx] = value


def _soft_terms(
    sums: np.ndarray,
    shift: np.ndarray | None,
    mass: np.ndarray,
    dot: np.ndarray,
    z: float,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (loss, factor c_i) of the soft-label path, from the rows' exp sums."""
    lse = np.log(sums)
    if shift is not None:
        lse += shift
    loss = mass * lse - dot
    a = mass
    if z > 0.0:
        loss += z * lse * lse
        a = a + (2.0 * z) * lse
    return loss, a * scale / sums


def _hard_worker(
    X: np.ndarray,
    G: np.ndarray,
    row_loss: np.ndarray,
    lab: np.ndarray,
    active: np.ndarray,
    bad: np.ndarray | None,
    w_y: np.ndarray,
    at_label: np.ndarray,
    dense: Any,
    wv: np.ndarray | None,
    eps: float,
    z: float,
    W: float,
    scale: float,
    tiny: float,
    block: int,
) -> Callable[[int, int], None]:
    """The per-thread loop of the integer-label path over row blocks ``[start, stop)``."""
    dtype = X.dtype
    C = X.shape[1]

    # exp(x) goes straight into the gradient. When that is x itself (in place), x must
    # stay intact until the rows needing the max-shifted route are known, so exp goes
    # to a per-thread scratch block and the final multiply writes x; only for wide
    # column-major blocks, where that scratch would be large, every row is shifted
    # first, in place.
    separate = not np.may_share_memory(X, G)
    max_first = not separate and block * C * dtype.itemsize > 2 * BLOCK_BYTES

    def work(start: int, stop: int) -> None:
        # Overflow, 0/0 and log(0) are all handled per row below; silence them once.
        with np.errstate(all="ignore"):
            loop(start, stop)

    def loop(start: int, stop: int) -> None:
        rows = min(block, stop - start)
        S = None if separate or max_first else np.empty((rows, C), dtype=dtype)
        ar = np.arange(rows)
        for r0 in range(start, stop, block):
            r1 = min(stop, r0 + block)
            n = r1 - r0
            x, g, i = X[r0:r1], G[r0:r1], ar[:n]
            s = g if S is None else S[:n]
            lb, act, wy = lab[r0:r1], active[r0:r1], w_y[r0:r1]
            # Everything read from x happens before g (possibly x itself) is written.
            picked = x[i, lb].astype(np.float64)
            xw = _row_dot(x, wv) if eps > 0.0 else None
            all_active = bool(act.all())
            row = (wy, act, picked, xw, eps, C, z, W, scale, all_active)

            shift: np.ndarray | None
            if max_first:
                sums, shift = _exp_rows_inplace(x)
                loss, coef = _hard_terms(sums, shift, *row)
            else:
                sums, shift, shifted = _exp_rows(x, s, tiny)
                loss, coef = _hard_terms(sums, shift, *row)
                # Rows whose factor would round badly (large logits: c_i below the
                # normal range; tiny row sums: c_i above 1/eps) take the shifted route.
                redo = _coef_bad(coef, dtype)
                if redo is not None and shifted is not None:
                    redo &= ~shifted
                if redo is not None and redo.any():
                    shift = np.zeros_like(sums) if shift is None else shift
                    _shift_rows(x, s, sums, shift, np.flatnonzero(redo))
                    loss, coef = _hard_terms(sums, shift, *row)
                if eps > 0.0:
                    _finite_loss_rows(
                        loss, x, sums, shift, wv, eps / C, z, act, ((1.0 - eps) * wy, picked)
                    )
            np.multiply(s, coef.astype(dtype)[:, None], out=g)  # s may be g
            if dense is not None:
                g -= dense
            if dense is not None or not (all_active or np.isfinite(sums[~act]).all()):
                g[~act] = 0  # ignored rows: no gradient, whatever their logits
            g[i, lb] -= at_label[r0:r1]
            if bad is not None:
                b = bad[r0:r1]
                if b.any():
                    g[b] = np.nan
                    loss[b] = np.nan
            row_loss[r0:r1] = loss

    return work


def _soft_worker(
    X: np.ndarray,
    Y: np.ndarray,
    G: np.ndarray,
    row_loss: np.ndarray,
    wv: np.ndarray | None,
    eps: float,
    z: float,
    scale: float,
    tiny: float,
    block: int,
) -> Callable[[int, int], None]:
    """The per-thread loop of the soft-label path over row blocks ``[start, stop)``."""
    dtype = X.dtype
    C = X.shape[1]
    mix = eps > 0.0 or wv is not None

    def work(start: int, stop: int) -> None:
        with np.errstate(all="ignore"):  # non-finite rows are handled per row below
            loop(start, stop)

    def loop(start: int, stop: int) -> None:
        S = np.empty((min(block, stop - start), C), dtype=dtype)
        T = np.empty_like(S) if mix else None
        for r0 in range(start, stop, block):
            r1 = min(stop, r0 + block)
            n = r1 - r0
            x, g, s, y = X[r0:r1], G[r0:r1], S[:n], Y[r0:r1]
            t = y
            if T is not None:
                t = T[:n]
                np.multiply(y, 1.0 - eps, out=t)
                if eps > 0.0:
                    t += eps / C
                if wv is not None:
                    t *= wv
            mass = _row_dot(t, None)
            if x.flags.c_contiguous and t.flags.c_contiguous:
                dot = np.einsum("ij,ij->i", t, x).astype(np.float64)
            else:  # strided rows would add element by element in the block's dtype
                dot = np.einsum("ij,ij->i", t, x, dtype=np.float64)
            odd = ~np.isfinite(dot)
            if odd.any():
                # 0 * (-inf) for a masked class with no target mass counts as 0.
                k = np.flatnonzero(odd)
                tk, xk = t[k], x[k]
                prod = np.where(tk == 0, 0.0, tk.astype(np.float64) * xk)
                dot[k] = prod.sum(axis=1)
            sums, shift, shifted = _exp_rows(x, s, tiny)
            loss, coef = _soft_terms(sums, shift, mass, dot, z, scale)
            redo = _coef_bad(coef, dtype)  # see _hard_worker
            if redo is not None and shifted is not None:
                redo &= ~shifted
            if redo is not None and redo.any():
                shift = np.zeros_like(sums) if shift is None else shift
                _shift_rows(x, s, sums, shift, np.flatnonzero(redo))
                loss, coef = _soft_terms(sums, shift, mass, dot, z, scale)
            _finite_loss_rows(loss, x, sums, shift, t, 1.0, z)
            np.multiply(s, coef.astype(dtype)[:, None], out=g)
            if scale != 1.0:
                np.multiply(t, scale, out=s)
                g -= s
            else:
                g -= t
            row_loss[r0:r1] = loss

    return work


# --- elementwise losses: MSE and BCE-with-logits ------------------------------------------


def _elementwise_prologue(x: Any, *others: Any) -> bool:
    if not _plain(x) or x.dtype not in _FAST_DTYPES or x.size == 0:
        return False
    return all(o is None or _plain(o) for o in others)


class _Elementwise:
    """Blocked views of same-shaped inputs (plus broadcast extras) and the gradient.

    C-contiguous operands are flattened into 1-D chunks; anything else is blocked along
    its first axis, where NumPy's ufuncs handle strides and broadcasting.
    """

    def __init__(
        self,
        x: np.ndarray,
        full: list[np.ndarray],
        extras: list[np.ndarray | None],
        out: np.ndarray | None,
        inplace: bool,
        reduction: str,
        block_elems: int,
    ) -> None:
        shape = x.shape if x.ndim else (1,)
        self.shape = x.shape
        dest = x if inplace else out
        self.dest = dest
        self.copy_back = False
        if dest is not None and not inplace:
            reads = [x, *full, *(e for e in extras if e is not None)]
            # Only out= that is x itself, block for block, is safe to write as we go.
            self.copy_back = any(
                np.may_share_memory(dest, r) and not (r is x and _aliases(dest, x)) for r in reads
            )
        grad = np.empty(shape, x.dtype) if dest is None or self.copy_back else dest.reshape(shape)
        self.grad = grad
        self.elementwise = np.empty(shape, x.dtype) if reduction == "none" else None
        ops: list[np.ndarray] = [x.reshape(shape), *(a.reshape(shape) for a in full), grad]
        if self.elementwise is not None:
            ops.append(self.elementwise)
        flat = all(a.flags.c_contiguous for a in ops) and all(
            e is None or (e.shape == x.shape and e.flags.c_contiguous) for e in extras
        )
        self.ops: list[np.ndarray]
        self.extras: list[np.ndarray | None]
        if flat:
            self.ops = [a.reshape(-1) for a in ops]
            self.extras = [None if e is None else e.reshape(-1) for e in extras]
            self.block = block_elems
        else:
            self.ops = ops
            self.extras = [None if e is None else np.broadcast_to(e, shape) for e in extras]
            self.block = max(1, block_elems // max(1, math.prod(shape[1:])))
        self.rows = self.ops[0].shape[0]
        self.partials: dict[int, float] = {}

    def finish(self, reduction: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
        dtype = self.grad.dtype
        if self.elementwise is not None:
            loss = self.elementwise.reshape(self.shape)
        else:
            parts = [self.partials[k] for k in sorted(self.partials)]
            try:
                total = math.fsum(parts)
            except OverflowError:  # finite parts whose exact sum overflows float64: inf
                total = float(np.sum(parts))
            loss = np.asarray(total * scale if reduction == "mean" else total, dtype=dtype)
        grad = self.grad.reshape(self.shape)
        if self.dest is None:
            return loss, grad
        if self.copy_back:
            np.copyto(self.dest, grad)
        return loss, self.dest


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` over two same-shaped blocks, any layout (float64 when strided).

    A sum past the dtype's range is ``inf``, the loss PyTorch gives too: no warning.
    """
    with np.errstate(over="ignore"):
        if a.flags.c_contiguous and b.flags.c_contiguous:
            return float(np.dot(a.reshape(-1), b.reshape(-1)))
        idx = "abcdefghijklmnopqrstuvwxyz"[: a.ndim]
        return float(np.einsum(f"{idx},{idx}->", a, b, dtype=np.float64))


def _mse_small(
    pred: np.ndarray, target: np.ndarray, reduction: str, scale: float, factor: Any
) -> tuple[np.ndarray, np.ndarray]:
    """One contiguous block, no weight: the blocked loop's arithmetic without the plan."""
    g = np.subtract(pred, target, out=np.empty_like(pred))
    total = _dot(g, g)
    elementwise = np.multiply(g, g, out=np.empty_like(g)) if reduction == "none" else None
    g *= factor
    if elementwise is not None:
        return elementwise, g
    return np.asarray(total * scale if reduction == "mean" else total, dtype=pred.dtype), g


@register_fast_path("numpy", "mse")
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
    """Blocked, threaded NumPy version of :func:`gradcore.mse`."""
    if not _elementwise_prologue(pred, target, weight, out):
        return NotImplemented
    reduction = _validate_mse(
        pred, target, weight=weight, reduction=reduction, out=out, inplace=inplace, xp=np_compat
    )
    check_thread_setting()  # a bad GRADCORE_NUM_THREADS fails on first use, at any size
    target, weight = _unalias(inplace, pred, out, target, weight)
    dtype = pred.dtype
    scale = 1.0 / pred.size if reduction == "mean" else 1.0
    factor = dtype.type(2.0 * scale)
    if (
        weight is None
        and out is None
        and not inplace
        and pred.nbytes <= min(SMALL_BYTES, BLOCK_BYTES)
        and target.dtype == dtype
        and pred.flags.c_contiguous
        and target.flags.c_contiguous
    ):
        return _mse_small(pred, target, reduction, scale, factor)
    plan = _Elementwise(
        pred, [target], [weight], out, inplace, reduction, BLOCK_BYTES // dtype.itemsize
    )
    P, T, G = plan.ops[0], plan.ops[1], plan.ops[2]
    L = plan.elementwise is not None and plan.ops[3]
    Wt = plan.extras[0]

    def work(start: int, stop: int) -> None:
        S = None if Wt is None else np.empty((min(plan.block, stop - start), *G.shape[1:]), dtype)
        for r0 in range(start, stop, plan.block):
            r1 = min(stop, r0 + plan.block)
            g = G[r0:r1]
            np.subtract(P[r0:r1], T[r0:r1], out=g)
            if Wt is None:
                plan.partials[r0] = _dot(g, g)
                if L is not False:
                    np.multiply(g, g, out=L[r0:r1])
                g *= factor
            else:
                wd = S[: r1 - r0]  # type: ignore[index]
                np.multiply(g, Wt[r0:r1], out=wd)
                plan.partials[r0] = _dot(wd, g)
                if L is not False:
                    np.multiply(wd, g, out=L[r0:r1])
                g *= factor  # before the weight: w * diff may overflow where this won't
                g *= Wt[r0:r1]

    _parallel(plan.rows, plan.block, pred.size, work)
    return plan.finish(reduction, scale)


@register_fast_path("numpy", "binary_cross_entropy_with_logits")
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
    """Blocked, threaded NumPy version of :func:`gradcore.binary_cross_entropy_with_logits`."""
    if not _elementwise_prologue(logits, targets, weight, pos_weight, out):
        return NotImplemented
    reduction = _validate_bce(
        logits,
        targets,
        weight=weight,
        pos_weight=pos_weight,
        reduction=reduction,
        out=out,
        inplace=inplace,
        xp=np_compat,
    )
    check_thread_setting()  # a bad GRADCORE_NUM_THREADS fails on first use, at any size
    targets, weight, pos_weight = _unalias(inplace, logits, out, targets, weight, pos_weight)
    dtype = logits.dtype
    scale = 1.0 / logits.size if reduction == "mean" else 1.0
    plan = _Elementwise(
        logits,
        [targets],
        [weight, pos_weight],
        out,
        inplace,
        reduction,
        BLOCK_BYTES // (4 * dtype.itemsize),
    )
    X, Y, G = plan.ops[0], plan.ops[1], plan.ops[2]
    L = plan.elementwise is not None and plan.ops[3]
    Wt, Q = plan.extras
    one = dtype.type(1.0)

    def work(start: int, stop: int) -> None:
        for r0 in range(start, stop, plan.block):
            r1 = min(stop, r0 + plan.block)
            x, g = X[r0:r1], G[r0:r1]
            y = Y[r0:r1].astype(dtype, copy=False)
            e = np.abs(x)
            np.negative(e, out=e)
            np.exp(e, out=e)  # exp(-|x|) never overflows
            l1p = np.log1p(e)
            sp = np.maximum(x, 0)
            sp += l1p  # softplus(x) = -log(1 - sigmoid(x))
            sn = np.maximum(np.negative(x), 0)
            sn += l1p  # softplus(-x) = -log(sigmoid(x)), without cancelling against x
            sig = np.add(e, one)
            np.divide(one, sig, out=sig)
            np.multiply(e, sig, out=e, where=x < 0)
            np.copyto(sig, e, where=x < 0)  # sigmoid(x), from the side that is stable
            qy = y if Q is None else Q[r0:r1] * y
            rest = one - y  # the negative term's weight (1 - y)
            loss = qy * sn
            loss += rest * sp
            rest += qy
            np.multiply(rest, sig, out=g)
            g -= qy
            if scale != 1.0:
                g *= dtype.type(scale)
            if Wt is not None:  # after the mean's 1/N, as in the generic path
                w = Wt[r0:r1]
                loss *= w
                g *= w
            if L is not False:
                L[r0:r1] = loss
            plan.partials[r0] = float(np.add.reduce(loss, axis=None, dtype=np.float64))

    _parallel(plan.rows, plan.block, logits.size, work)
    return plan.finish(reduction, scale)


# --- activations ---------------------------------------------------------------------------
#
# The generic bodies select with ``where``, which NumPy runs element by element with a
# data-dependent branch: about 4 ns per element on random signs, 10x a streaming
# ufunc. Here every selection is branch-free and bit-exact: a comparison gives a 0/1
# mask, turned into all-ones/all-zeros words of the float's width, and the result is
# an AND of bit patterns (relu, relu_vjp), a maximum between values whose order is known
# (leaky_relu, sigmoid's numerator), or a product with a per-element factor assembled
# from the bit patterns of 1 and the slope (leaky_relu_vjp). Results equal the generic
# ones bit for bit, NaN, infinities and signed zeros included. Every output is a new
# array in the input's layout, written with ``out=`` so that 0-d inputs stay arrays.
# Other dtypes, mixed dtypes and ndarray subclasses return NotImplemented (generic path).

_UINT: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(np.float32): np.dtype(np.uint32),
    np.dtype(np.float64): np.dtype(np.uint64),
}
_SIGN = {d: _UINT[d].type(1 << (8 * d.itemsize - 1)) for d in _FAST_DTYPES}


def _fast1(x: Any) -> bool:
    return type(x) is np.ndarray and x.dtype in _FAST_DTYPES


def _fast2(g: Any, y: Any, y_name: str) -> bool:
    """Both plain float32/float64 arrays of one dtype; raises the generic shape error."""
    if not (_fast1(g) and type(y) is np.ndarray and y.dtype == g.dtype):
        return False
    check_same_shape(g, y, "g", y_name)
    return True


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(_UINT[a.dtype])


def _keep_mask(cond: Any, out: np.ndarray) -> np.ndarray:
    """All-ones words of ``out``'s width where ``cond``, zero words elsewhere (into ``out``)."""
    words = _bits(out)
    np.copyto(words, cond)  # 1 or 0
    np.negative(words, out=words)  # all ones or 0 (unsigned wrap-around)
    return words


@register_fast_path("numpy", "relu")
def relu(x: Any, /) -> Any:
    """Branch-free NumPy :func:`gradcore.relu`: x's bits AND a mask of ``not x < 0``."""
    if not _fast1(x):
        return NotImplemented
    out = np.empty_like(x)
    words = _bits(out)
    np.copyto(words, np.less(x, 0))  # 1 where x < 0 (never for NaN)
    np.subtract(words, 1, out=words)  # 0 there, all ones elsewhere (wrap-around)
    np.bitwise_and(words, _bits(x), out=words)
    return out


@register_fast_path("numpy", "relu_vjp")
def relu_vjp(g: Any, y: Any, /) -> Any:
    """Branch-free NumPy :func:`gradcore.relu_vjp`: g's bits AND a mask of ``y > 0``."""
    if not _fast2(g, y, "y"):
        return NotImplemented
    out = np.empty_like(g)
    words = _keep_mask(np.greater(y, 0), out)
    np.bitwise_and(words, _bits(g), out=words)
    return out


@register_fast_path("numpy", "leaky_relu")
def leaky_relu(x: Any, /, *, negative_slope: float = 0.01) -> Any:
    """NumPy :func:`gradcore.leaky_relu` as ``max(x, slope * x)`` (``min`` for slope > 1).

    For a positive slope ``x`` and ``slope * x`` share their sign (zeros included), so
    the maximum picks ``x`` for ``x > 0`` and ``slope * x`` otherwise, as ``where``
    does. A zero slope (``inf * 0``) and negative slopes take the generic path.
    """
    if not _fast1(x):
        return NotImplemented
    slope = _act._check_slope(negative_slope)
    if not slope > 0.0:
        return NotImplemented
    out = np.multiply(x, slope, out=np.empty_like(x))
    (np.maximum if slope <= 1.0 else np.minimum)(x, out, out=out)
    return out


@register_fast_path("numpy", "leaky_relu_vjp")
def leaky_relu_vjp(g: Any, y: Any, /, *, negative_slope: float = 0.01) -> Any:
    """NumPy :func:`gradcore.leaky_relu_vjp`: ``g`` times a factor, 1 or the slope.

    The factor's bits are ``slope_bits + [y > 0] * (one_bits - slope_bits)`` in unsigned
    integers, exactly 1 or exactly the slope; ``g * 1`` is ``g`` and ``g * slope`` is the
    generic's product, so results match bit for bit.
    """
    if not _fast2(g, y, "y"):
        return NotImplemented
    slope = _act._check_slope(negative_slope)
    if slope < 0.0:
        return NotImplemented  # the generic path raises its error
    dtype = g.dtype
    ut = _UINT[dtype].type
    s_bits = int(np.asarray(slope, dtype=dtype).view(_UINT[dtype]))
    one_bits = int(np.asarray(1.0, dtype=dtype).view(_UINT[dtype]))
    out = np.empty_like(g)
    words = _bits(out)
    np.copyto(words, np.greater(y, 0))
    np.multiply(words, ut((one_bits - s_bits) % (1 << (8 * dtype.itemsize))), out=words)
    np.add(words, ut(s_bits), out=words)
    np.multiply(g, out, out=out)
    return out


@register_fast_path("numpy", "sigmoid")
def sigmoid(x: Any, /) -> Any:
    """NumPy :func:`gradcore.sigmoid`, the generic formula with a branch-free numerator.

    With ``e = exp(-|x|)`` in [0, 1], the generic ``where(x >= 0, 1, e) / (1 + e)`` has
    the numerator ``max(e, [x >= 0])``: 1 where x >= 0, e elsewhere (NaN stays NaN).
    """
    if not _fast1(x):
        return NotImplemented
    e = np.empty_like(x)
    np.bitwise_or(_bits(x), _SIGN[x.dtype], out=_bits(e))  # -|x|
    np.exp(e, out=e)
    out = np.empty_like(x)
    np.copyto(out, np.greater_equal(x, 0))
    np.maximum(e, out, out=out)
    np.add(e, 1.0, out=e)
    np.divide(out, e, out=out)
    return out


@register_fast_path("numpy", "sigmoid_vjp")
def sigmoid_vjp(g: Any, y: Any, /) -> Any:
    """NumPy :func:`gradcore.sigmoid_vjp`: ``g * (y * (1 - y))`` in one buffer."""
    if not _fast2(g, y, "y"):
        return NotImplemented
    out = np.subtract(1.0, y, out=np.empty_like(g))
    np.multiply(y, out, out=out)
    np.multiply(g, out, out=out)
    return out


@register_fast_path("numpy", "tanh")
def tanh(x: Any, /) -> Any:
    """NumPy :func:`gradcore.tanh` without the dispatch overhead."""
    if not _fast1(x):
        return NotImplemented
    return np.tanh(x, out=np.empty_like(x))


@register_fast_path("numpy", "tanh_vjp")
def tanh_vjp(g: Any, y: Any, /) -> Any:
    """NumPy :func:`gradcore.tanh_vjp`: ``g * (1 - y * y)`` in one buffer."""
    if not _fast2(g, y, "y"):
        return NotImplemented
    out = np.multiply(y, y, out=np.empty_like(g))
    np.subtract(1.0, out, out=out)
    np.multiply(g, out, out=out)
    return out


# --- linear -------------------------------------------------------------------------------


def _fast_linear_args(*arrays: Any) -> bool:
    """Plain arrays of one float32/float64 dtype (None skipped)."""
    dtype = arrays[0].dtype if type(arrays[0]) is np.ndarray else None
    if dtype not in _FAST_DTYPES:
        return False
    return all(a is None or (type(a) is np.ndarray and a.dtype == dtype) for a in arrays)


@register_fast_path("numpy", "linear")
def linear(x: Any, W: Any, /, b: Any = None) -> Any:
    """NumPy :func:`gradcore.linear`: one ``matmul`` and the bias added in place."""
    if not _fast_linear_args(x, W, b):
        return NotImplemented
    _check_x_w(x, W)
    if b is not None and b.shape != (W.shape[1],):
        return NotImplemented  # the generic path raises its error
    y = np.matmul(x, W)
    if b is not None:
        np.add(y, b, out=y)
    return y


@register_fast_path("numpy", "linear_vjp")
def linear_vjp(g: Any, x: Any, W: Any, /, *, need_dx: bool = True) -> Any:
    """NumPy :func:`gradcore.linear_vjp`: three ``matmul``/``add.reduce`` calls."""
    if not _fast_linear_args(g, x, W):
        return NotImplemented
    _check_x_w(x, W)
    n_in, n_out = W.shape
    if g.shape != (*x.shape[:-1], n_out):
        return NotImplemented  # the generic path raises its error
    dx = np.matmul(g, W.T) if need_dx else None
    n = math.prod(x.shape[:-1])
    g2 = g.reshape(n, n_out)
    dW = np.matmul(x.reshape(n, n_in).T, g2)
    db = np.add.reduce(g2, axis=0)
    return dx, dW, db


# --- softcapped cross-entropy and fused linear + cross-entropy -----------------------------
#
# Both wrap the fused cross-entropy above rather than changing it. The soft-cap
# c*tanh(x/c) is written into the gradient's buffer, the fused kernel runs in place on
# it, and the result is multiplied by the cap's derivative 1 - tanh(x/c)^2, kept in one
# logits-sized scratch array. The linear + cross-entropy runs BLAS products into
# preallocated chunk buffers and the fused kernel in place on each chunk's logits.


def _xent_softcap(
    logits: np.ndarray,
    labels: np.ndarray,
    softcap: Any,
    *,
    axis: int,
    weight: Any,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    z_loss: float,
    check_labels: bool | None,
    out: Any,
    inplace: bool,
) -> Any:
    """:func:`softmax_cross_entropy` of ``softcap * tanh(logits / softcap)``, chained."""
    options = {
        "axis": axis,
        "weight": weight,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "reduction": reduction,
        "z_loss": z_loss,
    }
    _validate_xent(
        logits, labels, check_labels=check_labels, out=out, inplace=inplace, xp=np_compat,
        **options,
    )  # fmt: skip
    cap = _check_softcap(softcap)
    assert cap is not None
    dtype = logits.dtype
    _check_softcap_dtype(np_compat, cap, dtype)
    with np.errstate(all="ignore"):
        deriv = np.divide(logits, dtype.type(cap))  # every read of logits happens here
        np.tanh(deriv, out=deriv)
    dest = logits if inplace else out
    reads = [labels] + ([] if weight is None else [weight])
    # The capped logits are written into the destination before the loss reads the
    # labels and weights: one that overlaps them (the logits as their own soft labels,
    # in place) gets a fresh buffer, copied over at the end.
    if dest is None or any(np.may_share_memory(dest, r) for r in reads):
        grad = np.empty_like(logits)
    else:
        grad = dest
    np.multiply(deriv, dtype.type(cap), out=grad)
    np.multiply(deriv, deriv, out=deriv)
    np.subtract(dtype.type(1.0), deriv, out=deriv)
    loss, grad = softmax_cross_entropy(grad, labels, check_labels=False, inplace=True, **options)
    np.multiply(grad, deriv, out=grad)
    if dest is not None and grad is not dest:
        np.copyto(dest, grad)
        grad = dest
    return loss, grad


#: Bytes of the scratch block through which ``x.T @ g`` is added to ``dW`` when SciPy's
#: BLAS (``gemm`` with ``beta=1``) is not installed.
DW_BLOCK_BYTES = 16 * 1024 * 1024
#: Use SciPy's ``gemm`` with ``beta=1`` to add each chunk's ``x.T @ g`` to ``dW`` in place.
USE_SCIPY_GEMM = True


def _gemm(dtype: np.dtype) -> Any:
    """SciPy's BLAS ``gemm`` for ``dtype``, or None without SciPy."""
    if not USE_SCIPY_GEMM:
        return None
    try:
        from scipy.linalg import blas
    except ImportError:
        return None
    return blas.sgemm if dtype == np.float32 else blas.dgemm


def _accumulate_xt_g(dW: np.ndarray, xt: np.ndarray, g: np.ndarray, gemm: Any) -> None:
    """``dW += xt @ g`` in place (``dW`` and ``g`` C-contiguous).

    NumPy's matmul has no ``beta=1``; BLAS's ``gemm`` does. In Fortran terms ``dW.T``
    (C-contiguous ``dW``) is a column-major ``V x H`` matrix, updated as
    ``dW.T += g.T @ xt.T`` (``gemm`` told to transpose ``xt``), with no copy of the
    chunk-sized ``g``. Without SciPy, column blocks of the product go through a scratch
    buffer and are added block by block.
    """
    if gemm is not None:
        c = dW.T
        r = gemm(1.0, g.T, xt, beta=1.0, c=c, trans_b=True, overwrite_c=True)
        if not np.shares_memory(r, c):  # never expected: f2py copied the output
            np.copyto(c, r)
        return
    H = dW.shape[0]
    cols = max(1, min(g.shape[1], DW_BLOCK_BYTES // (H * dW.dtype.itemsize)))
    scratch = np.empty((H, cols), dtype=dW.dtype)
    for j0 in range(0, g.shape[1], cols):
        j1 = min(g.shape[1], j0 + cols)
        block = scratch[:, : j1 - j0]
        np.matmul(xt, g[:, j0:j1], out=block)
        dW[:, j0:j1] += block


@register_fast_path("numpy", "linear_cross_entropy")
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
    """NumPy :func:`gradcore.linear_cross_entropy`: BLAS into reused chunk buffers and
    the fused cross-entropy in place on each chunk; nothing of size ``N x V``."""
    if not (_fast_linear_args(x, W, bias) and _plain(labels)):
        return NotImplemented
    if (weight is not None and not _plain(weight)) or labels.dtype == np.uint64:
        return NotImplemented
    args = _validate_lxent(
        x, W, labels, bias=bias, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, need_dx=need_dx, check_labels=check_labels, xp=np_compat,
    )  # fmt: skip
    N, H, V = args.n_rows, args.n_in, args.n_classes
    if N == 0 or H == 0:
        return NotImplemented  # degenerate shapes: the generic body handles them
    dtype = x.dtype
    rows = min(args.chunk_rows, N)
    X = x.reshape(N, H)  # a copy only for layouts that cannot be viewed as rows
    Y = labels.reshape((N, V) if args.soft else (N,))

    if args.reduction == "mean":
        if args.soft:
            divisor = float(N)
        else:
            lab = Y.astype(np.intp, copy=False)
            active = (lab != args.ignore_index) & (lab >= 0) & (lab < V)
            if weight is None:
                divisor = float(np.count_nonzero(active))
            else:
                w64 = np.asarray(weight, dtype=np.float64)
                divisor = float(np.sum(w64[np.where(active, lab, 0)], where=active))
        scale = 1.0 / divisor if divisor != 0.0 else 1.0
    else:
        divisor, scale = 1.0, 1.0
    # A zero divisor is 0/0 for every row not ignored (the generic body and PyTorch):
    # their gradient rows are NaN, never a silent zero.
    nan_rows = None
    if args.reduction == "mean" and divisor == 0.0 and not args.soft:
        nan_rows = lab != args.ignore_index
        if not nan_rows.any():
            nan_rows = None

    xent = {
        "weight": weight,
        "ignore_index": args.ignore_index,
        "label_smoothing": args.label_smoothing,
        "reduction": "none" if args.reduction == "none" else "sum",
        "z_loss": args.z_loss,
        "softcap": args.softcap,
        "check_labels": False,
    }
    Z = np.empty((rows, V), dtype=dtype)  # the one chunk of logits, reused
    dx = np.empty((N, H), dtype=dtype) if need_dx else None
    dxt_buf = np.empty((H, rows if need_dx else 0), dtype=dtype)
    dW = np.empty((H, V), dtype=dtype)
    db = None if bias is None else np.zeros(V, dtype=np.float64)
    # 1/divisor goes on the chunk's rows of x for dW only when it shrinks them: a
    # divisor below 1 (tiny class weights) would push x * scale past the dtype's range
    # (inf/NaN in dW); then dW is scaled once at the end instead.
    xs = np.empty((rows, H), dtype=dtype) if scale < 1.0 else None
    gemm = _gemm(dtype)
    row_loss = np.empty(N, dtype=dtype) if args.reduction == "none" else None
    total = 0.0
    with np.errstate(all="ignore"):  # NaN rows (unchecked bad labels) propagate as NaN
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            n = r1 - r0
            z, xc = Z[:n], X[r0:r1]
            np.matmul(xc, W, out=z)
            if bias is not None:
                z += bias
            loss_c, g = _xent_chunk(z, Y[r0:r1], xent)
            if nan_rows is not None:
                g[nan_rows[r0:r1]] = np.nan
            if row_loss is not None:
                row_loss[r0:r1] = loss_c
            else:
                total += float(loss_c)
            # The mean's 1/divisor goes on the small operands, not on the chunk.
            if dx is not None:
                # W @ g.T, then a small transposed copy: OpenBLAS runs g @ W.T with few
                # rows several times slower (measured: 6x at 128 rows of 32000 classes).
                dxt = np.matmul(W, g.T, out=dxt_buf[:, :n])
                d = dx[r0:r1]
                if scale != 1.0:
                    np.multiply(dxt.T, dtype.type(scale), out=d)
                else:
                    np.copyto(d, dxt.T)
            if xs is not None:
                xc = np.multiply(xc, dtype.type(scale), out=xs[:n])
            if r0 == 0:
                np.matmul(xc.T, g, out=dW)
            else:
                _accumulate_xt_g(dW, xc.T, g, gemm)
            if db is not None:
                db += np.add.reduce(g, axis=0, dtype=np.float64) * scale

        if scale > 1.0:
            np.multiply(dW, dtype.type(scale), out=dW)
        if row_loss is not None:
            loss = row_loss.reshape(x.shape[:-1])
        elif args.reduction == "mean":
            loss = np.asarray(total / divisor if divisor != 0.0 else math.nan, dtype=dtype)
        else:
            loss = np.asarray(total, dtype=dtype)
    dx_out = None if dx is None else dx.reshape(x.shape)
    return loss, dx_out, dW, None if db is None else db.astype(dtype)


def _xent_chunk(z: np.ndarray, labels: np.ndarray, options: dict[str, Any]) -> Any:
    """The fused cross-entropy written over the chunk's logits ``z`` (its gradient)."""
    result = softmax_cross_entropy(z, labels, inplace=True, **options)
    if result is NotImplemented:  # a label dtype the fast path leaves to the generic code
        from gradcore.losses import softmax_cross_entropy as generic

        body = generic.__gradcore_generic__  # type: ignore[attr-defined]
        result = body(z, labels, inplace=True, xp=np_compat, **options)
    return result
