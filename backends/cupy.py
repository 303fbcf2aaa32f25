r"""CuPy fast paths: fused CUDA kernels for the losses.

Imported lazily by :mod:`gradcore._dispatch` the first time a CuPy array reaches a
kernel. Each fast path first calls the generic kernel's validator (so errors are the
same on every path), then launches hand-written CUDA kernels from ``cuda/*.cu``:

``softmax_cross_entropy``
    ``cuda/softmax_xent.cu``: one group of threads per row holds the row in registers,
    so each logit is read once and each gradient written once (warp, block, or on
    sm_90+ a thread-block cluster per row; a two-read online-softmax fallback for rows
    too long for any of them). The mean's divisor is computed on the device and the
    per-row losses are reduced in a fixed order into a 0-d device array: no host
    synchronisation, and bitwise reproducible results for the same shapes, device and
    data-pointer alignment (the alignment picks the vector width, which changes the
    order of the sums).
``mse``, ``binary_cross_entropy_with_logits``
    ``cuda/pointwise_losses.cu``: a grid-stride kernel with per-block partial sums and a
    deterministic single-block second stage (bitwise reproducible for the same shapes,
    device and data-pointer alignment).

With ``out=`` or ``inplace=True``, a gradient buffer that overlaps another input (labels,
targets, weights; or the logits other than exactly, as ``inplace`` does) is refused with a
``ValueError``: the kernels read those inputs while they write the gradient.

Kernels are specialised with ``#define``\ s (``-DNAME=VALUE`` options), compiled by
NVRTC through :class:`cupy.RawModule` once per process, device and specialisation, and
launched on the current stream inside the input's device. Float32, float16 and
bfloat16 (a CuPy ``bfloat16`` dtype where CuPy has one, else raw bits in a ``uint16``
array through :func:`softmax_cross_entropy_bf16`) are handled; anything else (float64,
non-contiguous arrays, a class axis other than the last, empty arrays) returns
``NotImplemented`` and the generic code runs.

The launch-configuration helpers at the top are pure Python so they can be tested
without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradcore._dispatch import register_fast_path
from gradcore._namespace import get_namespace
from gradcore.losses import _validate_bce, _validate_mse, _validate_xent

try:  # the helpers below work without CuPy; the fast paths only ever see CuPy arrays
    import cupy
except ImportError:  # pragma: no cover - exercised on machines without CuPy
    cupy = None

__all__ = [
    "XentLaunch",
    "choose_pointwise_launch",
    "choose_xent_launch",
    "force_xent_variant",
    "softmax_cross_entropy_bf16",
]

CUDA_DIR = Path(__file__).with_name("cuda")

#: Variant names of ``softmax_xent.cu`` (its ``VARIANT`` define is the index).
XENT_VARIANTS = ("warp", "block", "cluster", "online")

#: Floats one thread may hold in registers for a row (halved for soft targets, which
#: are held too). 32 keeps a 512-thread block under 64 registers per thread or close.
REGISTER_FLOATS = 32

#: Most threads of a block that holds a row in registers. At 1024 threads a thread may
#: use only 64 registers, and 32 floats of row plus the rest spill (ptxas -v for sm_90:
#: 140 bytes at C = 32000); at 512 the kernel takes about 80 registers and spills none.
#: Longer rows go to a cluster (sm_90+) or the online variant.
MAX_ROW_BLOCK = 512

#: Storage codes of the kernels' ``*_KIND`` defines.
FLOAT_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}
TARGET_KINDS = {**FLOAT_KINDS, "bool": 3, "uint8": 3, "int32": 4, "int64": 5}


# --- pure-Python launch configuration ----------------------------------------------------


@dataclass(frozen=True)
class XentLaunch:
    """How ``xent_rows`` is launched: variant, block, grid and register tiling."""

    variant: str
    block: int
    items: int
    vec: int
    cluster: int
    grid: int

    def defines(self) -> dict[str, int]:
        """The ``#define``\\ s this configuration compiles with."""
        return {
            "VARIANT": XENT_VARIANTS.index(self.variant),
            "BLOCK": self.block,
            "ITEMS": self.items,
            "VEC": self.vec,
            "CLUSTER": self.cluster,
        }


def vector_width(n_cols: int, itemsizes: Sequence[int], addresses: Sequence[int]) -> int:
    """Elements per vector access: the widest of 8, 4, 2, 1 that keeps 16-byte accesses
    aligned for every array (``addresses`` are their data pointers) and divides a row."""
    widest = max(itemsizes)
    for vec in (8, 4, 2, 1):
        if vec * widest > 16 or n_cols % vec:
            continue
        if all(addr % (vec * size) == 0 for addr, size in zip(addresses, itemsizes, strict=True)):
            return vec
    return 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_xent_launch(
    n_rows: int,
    n_cols: int,
    *,
    vec: int,
    soft: bool,
    cluster_ok: bool,
    force: str | None = None,
    softcap: bool = False,
) -> XentLaunch:
    """Pick the kernel variant that holds a row of ``n_cols`` classes on chip.

    Parameters
    ----------
    n_rows, n_cols : int
        Rows and classes (both >= 1).
    vec : int
        Elements per vector access (:func:`vector_width`).
    soft : bool
        Soft targets are held in registers too, which halves the room for logits.
    cluster_ok : bool
        Whether the device supports thread-block clusters (compute capability >= 9.0).
    force : str, optional
        One of :data:`XENT_VARIANTS`, for tests; ``ValueError`` if the row cannot fit it.
    softcap : bool
        Soft-capped logits keep their tanh in registers too, which halves the room again.

    Returns
    -------
    XentLaunch
        Warp per row up to 32 registers-worth of floats per lane, then a block per row
        (64 to :data:`MAX_ROW_BLOCK` threads), then on sm_90+ a cluster of 2 to 8 blocks,
        else the two-read online fallback.
    """
    if n_rows < 1 or n_cols < 1:
        raise ValueError(f"need at least one row and one class, got {n_rows}x{n_cols}")
    if force is not None and force not in XENT_VARIANTS:
        raise ValueError(f"force must be one of {XENT_VARIANTS}, got {force!r}")
    budget = REGISTER_FLOATS // (2 if soft else 1) // (2 if softcap else 1)
    vecs = -(-n_cols // vec)  # vectors per row

    def warp() -> XentLaunch | None:
        items = -(-vecs // 32)
        if items * vec > budget:
            return None
        rows_per_block = 4
        return XentLaunch("warp", 32 * rows_per_block, items, vec, 1, -(-n_rows // rows_per_block))

    def block() -> XentLaunch | None:
        threads = min(max(_next_pow2(-(-n_cols // budget)), 64), MAX_ROW_BLOCK)
        items = -(-vecs // threads)
        if items * vec > budget:
            return None
        return XentLaunch("block", threads, items, vec, 1, n_rows)

    def cluster() -> XentLaunch | None:
        if not cluster_ok:
            return None
        threads = MAX_ROW_BLOCK  # 1024-thread blocks spill (28 bytes at C = 262144)
        # A power of two: 2, 4 or 8 blocks (8 is the portable maximum). Other sizes are
        # legal on paper but have not been run here, so they are not used.
        size = _next_pow2(max(2, -(-n_cols // (threads * budget))))
        if size > 8:
            return None
        items = -(-vecs // (size * threads))
        if items * vec > budget:
            return None
        return XentLaunch("cluster", threads, items, vec, size, n_rows * size)

    def online() -> XentLaunch:
        # At most MAX_ROW_BLOCK threads too: at 1024 (64 registers) it spills 4 bytes.
        threads = min(max(_next_pow2(-(-vecs // 4)), 128), MAX_ROW_BLOCK)
        return XentLaunch("online", threads, 1, vec, 1, n_rows)

    choices = {"warp": warp, "block": block, "cluster": cluster, "online": online}
    if force is not None:
        found = choices[force]()
        if found is None:
            raise ValueError(f"a row of {n_cols} classes does not fit the {force!r} variant")
        return found
    for name in ("warp", "block", "cluster"):
        found = choices[name]()
        if found is not None:
            return found
    return online()


def choose_pointwise_launch(n: int, *, vec: int, multiprocessors: int) -> tuple[int, int]:
    """``(grid, block)`` of the grid-stride elementwise kernel for ``n`` elements.

    Enough blocks to fill the device a few times over, and no more: the grid-stride
    loop takes the rest, and fewer blocks mean fewer partial sums to add up.
    """
    block = 256
    vectors = max(1, -(-n // vec))
    grid = max(1, min(-(-vectors // block), 8 * max(1, multiprocessors)))
    return grid, block


def broadcast_layout(shape: Sequence[int], wshape: Sequence[int]) -> tuple[int, int] | None:
    """``(inner, size)`` such that element ``i`` of a C-contiguous array of ``shape``
    uses ``w.ravel()[(i // inner) % size]`` when ``w`` (C-contiguous, of ``wshape``) is
    broadcast to ``shape``; ``None`` when the broadcast is not of that form (a 1 between
    two non-1 dimensions of ``w``, say).
    """
    shape, wshape = tuple(shape), tuple(wshape)
    if len(wshape) > len(shape):
        return None
    wfull = (1,) * (len(shape) - len(wshape)) + wshape
    if any(w not in (1, s) for w, s in zip(wfull, shape, strict=True)):
        return None
    size = math.prod(wfull)
    if size == 1:
        return 1, 1
    kept = [i for i, (w, s) in enumerate(zip(wfull, shape, strict=True)) if w == s and s != 1]
    first, last = kept[0], kept[-1]
    # Between its first and last non-1 dimension, w must match shape exactly.
    if any(wfull[i] != shape[i] for i in range(first, last + 1)):
        return None
    inner = math.prod(shape[last + 1 :])
    return inner, size


def define_options(defines: dict[str, int]) -> tuple[str, ...]:
    """NVRTC options for a specialisation: ``-DNAME=VALUE``, sorted by name.

    No ``-std``: the sources need only C++11, and NVRTC's default is newer.
    """
    return tuple(f"-D{k}={int(v)}" for k, v in sorted(defines.items()))


# --- module cache and small CuPy helpers --------------------------------------------------

_modules: dict[tuple[str, tuple[str, ...], int], Any] = {}
#: RawKernel objects by (file, options, device, kernel name): get_function builds a new
#: one on every call.
_kernels: dict[tuple[str, tuple[str, ...], int, str], Any] = {}
_modules_lock = threading.Lock()
_forced = threading.local()
#: Devices where a cluster launch was refused (see ``_xent``); they use the online variant.
_no_clusters: set[int] = set()


@contextlib.contextmanager
def force_xent_variant(variant: str | None) -> Iterator[None]:
    """Make ``softmax_cross_entropy`` on CuPy use one kernel variant inside the block
    (for tests and benchmarks; ``ValueError`` at the call if the row does not fit)."""
    if variant is not None and variant not in XENT_VARIANTS:
        raise ValueError(f"variant must be one of {XENT_VARIANTS} or None, got {variant!r}")
    previous = getattr(_forced, "variant", None)
    _forced.variant = variant
    try:
        yield
    finally:
        _forced.variant = previous


def _kernel(filename: str, name: str, defines: dict[str, int], device_id: int) -> Any:
    options = define_options(defines)
    kernel = _kernels.get((filename, options, device_id, name))
    if kernel is not None:
        return kernel
    key = (filename, options, device_id)
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            source = (CUDA_DIR / filename).read_text()
            module = cupy.RawModule(code=source, options=options)
            _modules[key] = module
        kernel_key = (filename, options, device_id, name)
        kernel = _kernels.get(kernel_key)
        if kernel is None:
            kernel = module.get_function(name)
            _kernels[kernel_key] = kernel
    return kernel


def _dtype_name(dtype: Any) -> str:
    return str(getattr(dtype, "name", dtype))


@functools.cache
def _compute_capability(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).compute_capability)


@functools.cache
def _multiprocessors(device_id: int) -> int:
    # Cached: cudaGetDeviceProperties is slow (it fills every field), and this is asked
    # on every call of a pointwise loss.
    attrs = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(attrs["multiProcessorCount"])


#: Largest grid.x of a launch (CUDA's limit for compute capability >= 3.0).
MAX_GRID = 2**31 - 1

#: Classes per row the kernels index with 32-bit ints (the row's column loops step past
#: the end by at most BLOCK * VEC <= 8192 before they stop).
MAX_COLS = 2**31 - 2**14


def _on_device(device_id: int, *arrays: Any) -> bool:
    """Whether every array given (None skipped) is a CuPy array on ``device_id``."""
    return all(
        a is None or (isinstance(a, cupy.ndarray) and int(a.device.id) == device_id) for a in arrays
    )


def _contiguous(x: Any) -> bool:
    return bool(x.flags.c_contiguous)


def _span(x: Any) -> tuple[int, int]:
    """``[start, end)`` device addresses of a C-contiguous array's elements."""
    start = int(x.data.ptr)
    return start, start + int(x.size) * int(x.dtype.itemsize)


def _check_no_overlap(grad: Any, name: str, x: Any, inputs: Sequence[tuple[str, Any]]) -> None:
    """``ValueError`` if the gradient buffer overlaps an input the kernel reads while it
    writes: any of ``inputs``, or ``x`` other than exactly (``inplace``/``out=x``)."""
    g0, g1 = _span(grad)
    x0, x1 = _span(x)
    if (g0, g1) != (x0, x1) and g0 < x1 and x0 < g1:
        raise ValueError(
            f"out overlaps {name} without being {name} itself; the kernel would read "
            f"{name} after writing the gradient over it (pass a separate buffer, or "
            "inplace=True)"
        )
    for input_name, a in inputs:
        if a is None or int(a.size) == 0:
            continue
        a0, a1 = _span(a)
        if g0 < a1 and a0 < g1:
            what = "the gradient (out=)" if grad is not x else f"{name} (inplace=True)"
            raise ValueError(
                f"{what} overlaps {input_name}, which the kernel reads while it writes the "
                f"gradient; pass {input_name} in a separate buffer"
            )


#: Driver errors with which a cluster launch is refused before anything ran (the only
#: ones that switch a device to the online variant): CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
#: CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_INVALID_CLUSTER_SIZE.
CLUSTER_REFUSED = frozenset({701, 801, 912})


# --- softmax cross-entropy ---------------------------------------------------------------


def _xent(
    logits: Any,
    labels: Any,
    args: Any,
    kind: int,
    weight: Any,
    out: Any,
    inplace: bool,
    softcap: float | None = None,
) -> Any:
    if args.axis != logits.ndim - 1 or logits.size == 0:
        return NotImplemented
    if not _contiguous(logits) or (out is not None and not _contiguous(out)):
        return NotImplemented
    n_cols = int(args.num_classes)
    n_rows = int(logits.size) // n_cols
    device_id = int(logits.device.id)
    if not _on_device(device_id, labels, weight, out):
        return NotImplemented
    cc = _compute_capability(device_id)
    if cc < 60 or n_cols > MAX_COLS:
        return NotImplemented

    if args.soft:
        target_kind = FLOAT_KINDS.get(_dtype_name(labels.dtype))
        if target_kind is None or not _contiguous(labels):
            return NotImplemented
        label_kind = 2
    else:
        target_kind = kind
        if _dtype_name(labels.dtype) == "uint64":
            return NotImplemented  # past 2**63 it would wrap in int64; the generic compares

    # Everything allocated from here on (converted labels and weights included) must be
    # on the logits' device, whichever device is current.
    with cupy.cuda.Device(device_id):
        if not args.soft:
            if _dtype_name(labels.dtype) not in ("int32", "int64"):
                labels = labels.astype(cupy.int64)
            labels = cupy.ascontiguousarray(labels)
            label_kind = 0 if labels.dtype == cupy.int32 else 1
        w = None if weight is None else cupy.ascontiguousarray(weight, dtype=cupy.float32)
        grad = logits if inplace else (out if out is not None else cupy.empty_like(logits))
        if out is not None or inplace:
            _check_no_overlap(grad, "logits", logits, [("labels", labels), ("weight", w)])
        arrays = [logits, grad] + ([labels] if args.soft else [])
        vec = vector_width(
            n_cols, [a.dtype.itemsize for a in arrays], [int(a.data.ptr) for a in arrays]
        )
        launch = choose_xent_launch(
            n_rows,
            n_cols,
            vec=vec,
            soft=args.soft,
            cluster_ok=cc >= 90 and device_id not in _no_clusters,
            force=getattr(_forced, "variant", None),
            softcap=softcap is not None,
        )
        if launch.grid > MAX_GRID:
            return NotImplemented
        reduction = {"none": 0, "mean": 1, "sum": 2}[args.reduction]
        options = {
            "LOGIT_KIND": kind,
            "LABEL_KIND": label_kind,
            "TARGET_KIND": target_kind,
            "HAS_WEIGHT": int(w is not None),
            "REDUCTION": reduction,
            "SOFTCAP": int(softcap is not None),
        }
        defines = {**options, **launch.defines()}
        denom = cupy.empty(1, dtype=cupy.float32)
        if reduction == 1:
            if args.soft:
                denom.fill(float(n_rows))
            else:
                kernel = _kernel("softmax_xent.cu", "xent_denominator", defines, device_id)
                kernel(
                    (1,),
                    (1024,),
                    (
                        labels,
                        denom if w is None else w,
                        denom,
                        np.int64(n_rows),
                        np.int64(n_cols),
                        np.int64(args.ignore_index),
                    ),
                )
        rows_shape = tuple(logits.shape[:-1])
        if reduction == 0:
            row_loss = cupy.empty(rows_shape, dtype=logits.dtype)
        else:
            row_loss = cupy.empty(n_rows, dtype=cupy.float32)
        row_args = (
            logits,
            labels,
            denom if w is None else w,
            grad,
            row_loss,
            denom,
            np.int64(n_rows),
            np.int64(n_cols),
            np.int64(args.ignore_index),
            np.float32(args.label_smoothing),
            np.float32(args.z_loss),
            np.float32(0.0 if softcap is None else softcap),
        )
        kernel = _kernel("softmax_xent.cu", "xent_rows", defines, device_id)
        try:
            kernel((launch.grid,), (launch.block,), row_args)
        except cupy.cuda.driver.CUDADriverError as exc:
            # A cluster the driver refuses to schedule is reported by the launch call
            # itself, before anything has run: fall back to the online variant, and do
            # not try clusters on this device again. Any other error (a sticky one left
            # by an earlier kernel, say) is not about clusters and is raised.
            if (
                launch.variant != "cluster"
                or getattr(_forced, "variant", None) is not None
                or getattr(exc, "status", None) not in CLUSTER_REFUSED
            ):
                raise
            _no_clusters.add(device_id)
            launch = choose_xent_launch(
                n_rows,
                n_cols,
                vec=vec,
                soft=args.soft,
                cluster_ok=False,
                force="online",
                softcap=softcap is not None,
            )
            defines = {**options, **launch.defines()}
            kernel = _kernel("softmax_xent.cu", "xent_rows", defines, device_id)
            kernel((launch.grid,), (launch.block,), row_args)
        if reduction == 0:
            return row_loss, grad
        loss = cupy.empty((), dtype=logits.dtype)
        kernel = _kernel("softmax_xent.cu", "xent_finalize", defines, device_id)
        kernel((1,), (1024,), (row_loss, denom, loss, np.int64(n_rows)))
        return loss, grad


@register_fast_path("cupy", "softmax_cross_entropy")
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
    """Fused CUDA softmax cross-entropy; see :func:`gradcore.softmax_cross_entropy`.

    ``softcap=c`` (Gemma 2 logit soft-capping) replaces each logit ``z`` by
    ``c * tanh(z / c)`` before the loss and multiplies its gradient by
    ``1 - tanh(z / c)**2``. An invalid ``softcap`` is left to the generic path, so that
    its error is the generic one.
    """
    try:
        softcap = _check_softcap(softcap)
    except (TypeError, ValueError):
        return NotImplemented
    xp = get_namespace(logits, labels, weight, out)
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
    kind = FLOAT_KINDS.get(_dtype_name(logits.dtype))
    if kind is None:
        return NotImplemented
    return _xent(logits, labels, args, kind, weight, out, inplace, softcap)


def _check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        raise TypeError(f"softcap must be a float or None, got {softcap!r}") from None
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"softcap must be a finite number > 0, got {softcap!r}")
    return value


def softmax_cross_entropy_bf16(
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
) -> tuple[Any, Any]:
    r"""Fused softmax cross-entropy for bfloat16 logits stored as raw bits.

    CuPy has no bfloat16 dtype in most versions; pass the logits as a ``uint16`` (or
    ``int16``) view of the bfloat16 bits, e.g. ``cupy.from_dlpack(t.view(torch.int16))``
    for a PyTorch bfloat16 tensor ``t``. The options are those of
    :func:`gradcore.softmax_cross_entropy`; soft targets must be float32 or float16
    (integer labels int32 or int64 work as usual).

    Returns
    -------
    loss, grad : cupy.ndarray
        In the same 16-bit storage as ``logits`` (bfloat16 bits).
    """
    if cupy is None or not isinstance(logits, cupy.ndarray):
        raise TypeError("softmax_cross_entropy_bf16 needs a CuPy array of bfloat16 bits")
    softcap = _check_softcap(softcap)
    if _dtype_name(logits.dtype) not in ("uint16", "int16"):
        raise TypeError(
            f"logits must be a uint16 or int16 array of bfloat16 bits, got {logits.dtype}"
        )
    if out is not None and (not isinstance(out, cupy.ndarray) or out.dtype != logits.dtype):
        raise TypeError(f"out must be a CuPy array of dtype {logits.dtype}")
    # The validator sees float16 views: same shape and itemsize, a floating dtype.
    as_half = logits.view(cupy.float16)
    out_half = None if out is None else out.view(cupy.float16)
    xp = get_namespace(as_half, labels, weight, out_half)
    args = _validate_xent(
        as_half,
        labels,
        axis=axis,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        z_loss=z_loss,
        check_labels=check_labels,
        out=out_half,
        inplace=inplace,
        xp=xp,
    )
    result = _xent(logits, labels, args, FLOAT_KINDS["bfloat16"], weight, out, inplace, softcap)
    if result is NotImplemented:
        raise ValueError(
            "softmax_cross_entropy_bf16 needs C-contiguous logits (and out) with the class "
            "axis last, at least one element, float32/float16 soft targets, and every "
            "array on the logits' device"
        )
    return result


# --- MSE and BCE with logits --------------------------------------------------------------


def _pointwise(
    loss: int,
    pred: Any,
    target: Any,
    weight: Any,
    pos_weight: Any,
    reduction: str,
    out: Any,
    inplace: bool,
    kind: int | None = None,
) -> Any:
    if kind is None:
        kind = FLOAT_KINDS.get(_dtype_name(pred.dtype))
    target_kind = TARGET_KINDS.get(_dtype_name(target.dtype))
    if kind is None or target_kind is None or pred.size == 0:
        return NotImplemented
    if not (_contiguous(pred) and _contiguous(target)):
        return NotImplemented
    if out is not None and not _contiguous(out):
        return NotImplemented
    shape = tuple(pred.shape)
    layouts = []
    for extra in (weight, pos_weight):
        if extra is None:
            layouts.append((1, 1))
            continue
        layout = broadcast_layout(shape, tuple(extra.shape))
        if layout is None:
            return NotImplemented
        layouts.append(layout)
    n = int(pred.size)
    device_id = int(pred.device.id)
    if not _on_device(device_id, target, weight, pos_weight, out):
        return NotImplemented
    if _compute_capability(device_id) < 60:
        return NotImplemented

    with cupy.cuda.Device(device_id):
        w = None if weight is None else cupy.ascontiguousarray(weight, dtype=cupy.float32)
        q = None if pos_weight is None else cupy.ascontiguousarray(pos_weight, dtype=cupy.float32)
        grad = pred if inplace else (out if out is not None else cupy.empty_like(pred))
        if out is not None or inplace:
            name = "pred" if loss == 0 else "logits"
            others = [("target" if loss == 0 else "targets", target), ("weight", w)]
            _check_no_overlap(grad, name, pred, [*others, ("pos_weight", q)])
        arrays = [pred, target, grad]
        red = {"none": 0, "mean": 1, "sum": 2}[reduction]
        if red == 0:
            elementwise = cupy.empty(shape, dtype=pred.dtype)
            arrays.append(elementwise)
        vec = vector_width(n, [a.dtype.itemsize for a in arrays], [int(a.data.ptr) for a in arrays])
        grid, block = choose_pointwise_launch(
            n, vec=vec, multiprocessors=_multiprocessors(device_id)
        )
        defines = {
            "LOSS": loss,
            "PRED_KIND": kind,
            "TARGET_KIND": target_kind,
            "HAS_WEIGHT": int(w is not None),
            "HAS_POS": int(q is not None),
            "REDUCTION": red,
            "BLOCK": block,
            "VEC": vec,
        }
        partials = elementwise if red == 0 else cupy.empty(grid, dtype=cupy.float64)
        scale = 1.0 / n if red == 1 else 1.0
        # Python scalars are not type-checked by CuPy's launcher: numpy scalars throughout.
        dummy = grad if w is None and q is None else (w if w is not None else q)
        kernel = _kernel("pointwise_losses.cu", "pointwise_loss", defines, device_id)
        kernel(
            (grid,),
            (block,),
            (
                pred,
                target,
                dummy if w is None else w,
                dummy if q is None else q,
                grad,
                partials,
                np.int64(n),
                np.float32(scale),
                np.int64(layouts[0][0]),
                np.int64(layouts[0][1]),
                np.int64(layouts[1][0]),
                np.int64(layouts[1][1]),
            ),
        )
        if red == 0:
            return elementwise, grad
        total = cupy.empty((), dtype=pred.dtype)
        kernel = _kernel("pointwise_losses.cu", "pointwise_finalize", defines, device_id)
        kernel((1,), (1024,), (partials, np.int64(grid), total, np.float64(scale)))
        return total, grad


@register_fast_path("cupy", "mse")
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
    """Fused CUDA MSE and gradient; see :func:`gradcore.mse`."""
    xp = get_namespace(pred, target, weight, out)
    reduction = _validate_mse(
        pred, target, weight=weight, reduction=reduction, out=out, inplace=inplace, xp=xp
    )
    return _pointwise(0, pred, target, weight, None, reduction, out, inplace)


@register_fast_path("cupy", "binary_cross_entropy_with_logits")
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
    """Fused CUDA BCE-with-logits and gradient; see
    :func:`gradcore.binary_cross_entropy_with_logits`."""
    xp = get_namespace(logits, targets, weight, pos_weight, out)
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
    return _pointwise(1, logits, targets, weight, pos_weight, reduction, out, inplace)


# The fused linear + cross-entropy's CuPy fast path lives beside this module and
# registers itself when it is imported; the dispatcher imports only this one.
from . import cupy_linear  # noqa: E402, F401
