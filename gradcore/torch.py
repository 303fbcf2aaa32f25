r"""Drop-in PyTorch autograd losses backed by gradcore's fused kernels.

``gradcore.torch`` mirrors :mod:`torch.nn.functional` and :mod:`torch.nn`::

    import gradcore.torch as gt

    loss = gt.cross_entropy(logits, target, label_smoothing=0.1)  # F.cross_entropy
    loss.backward()

    criterion = gt.CrossEntropyLoss(ignore_index=0)  # a torch.nn.CrossEntropyLoss

Each loss runs gradcore's fused loss-and-gradient kernel in the forward pass, keeps the
gradient, and in the backward pass only scales it by the incoming gradient (a scalar
for ``"mean"``/``"sum"``, one factor per row for ``"none"``, whose kernel gradient is
that of the sum, so the row scaling is exact). There is no second pass over the logits
in the backward, and none at all when the incoming gradient is exactly 1 (the usual
``loss.backward()``) in eager mode on the CPU.

``linear_cross_entropy`` (:func:`torch.nn.functional.linear_cross_entropy`, weight in
PyTorch's (C, H) layout) runs :func:`gradcore.linear_cross_entropy` in row chunks and
keeps ``dx``, ``dW``, ``db``; the backward scales them by the scalar incoming gradient.
Its ``reduction="none"`` is the exception: ``dW`` of :math:`\sum_i g_i \ell_i` is
:math:`\sum_i g_i x_i^\top \delta_i`, not a multiple of the sum's, so the backward
recomputes the logits chunk by chunk and scales each row before contracting (a second
pass). It routes CPU float32/float64 tensors to the NumPy fast path and everything else
(CUDA included) to the generic kernel.

Routing, decided per call from the logits' device and dtype, always zero-copy:

- CPU float32/float64: :meth:`torch.Tensor.numpy` views go to the NumPy fast path
  (cache-blocked, threaded, in place); the gradient is written straight into a tensor
  that PyTorch allocated.
- CUDA float32/float16/bfloat16 with the class axis last, contiguous, when CuPy is
  installed: DLPack views go to the fused CUDA kernel, launched on PyTorch's current
  stream (no host synchronisation, no stream switch).
- Anything else (float16/bfloat16 on the CPU, other devices, no CuPy, N-d CUDA
  logits): gradcore's generic kernel on the tensors themselves, i.e. PyTorch's own ops.

The losses are ``torch.library.custom_op``\ s (namespace ``gradcore``) with fake
implementations and autograd formulas, so they work under
``torch.compile(fullgraph=True)`` and :func:`torch.func.grad`. Gradients are first-order
only: a double backward through them raises.

Gradients with respect to the class ``weight``, ``pos_weight`` and soft or binary
targets are not computed; passing such a tensor with ``requires_grad=True`` raises
rather than silently giving it a zero gradient (MSE's ``target`` is supported).

``inplace=True`` (cross-entropy, MSE, BCE) writes the gradient over the input's own
storage instead of allocating one: the memory of a full logits tensor is saved. Safe
when nothing reads the logits after the loss (the usual ``logits = model(x); loss =
criterion(logits, y); loss.backward()``). The input's version counter is bumped and the
tensor is marked as modified, so autograd raises — rather than computing a wrong
gradient — when an earlier operation saved the logits for its own backward (e.g.
``torch.exp``, ``torch.sigmoid``, another loss), and when the overwritten logits are used
in a later differentiable computation; reading them outside autograd (e.g. an argmax
for accuracy after the loss) is the caller's responsibility. A leaf tensor that requires
grad is refused (autograd's usual in-place rule). Under ``torch.compile`` and
``torch.func`` transforms ``inplace=True`` is ignored: the compiler plans the memory.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import losses as _losses

__all__ = [
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "mse_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
_NUMPY_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- routing ------------------------------------------------------------------------------


def _plain(t: Tensor | None) -> bool:
    return t is None or type(t) is Tensor or type(t) is torch.nn.Parameter


def _numpy_views(*tensors: Tensor | None) -> list[Any] | None:
    """Host NumPy views of CPU tensors (None kept), or None if one has no NumPy dtype."""
    views: list[Any] = []
    for t in tensors:
        if t is None:
            views.append(None)
            continue
        if t.device.type != "cpu" or not _plain(t):
            return None
        t = t.detach()
        if t.is_neg() or t.is_conj():
            t = t.resolve_neg().resolve_conj()  # a lazy negation/conjugation: materialise
        try:
            views.append(t.numpy())
        except (TypeError, RuntimeError):  # bfloat16, float8, ...: no NumPy dtype
            return None
    return views


_cupy_module: Any = None


def _cupy() -> Any:
    """The ``cupy`` module, or None when it is not installed (looked up once)."""
    global _cupy_module
    if _cupy_module is None:
        try:
            import cupy

            _cupy_module = cupy
        except ImportError:
            _cupy_module = False
    return _cupy_module or None


def _route(
    x: Tensor, *others: Tensor | None, class_last: bool = True, bf16_kernel: bool = False
) -> str:
    """``"numpy"``, ``"cupy"`` or ``"generic"`` for a kernel call on these tensors.

    CuPy has no bfloat16 dtype: bfloat16 reaches CUDA only where gradcore has a kernel
    on the raw bits (``bf16_kernel``, cross-entropy).
    """
    if not all(_plain(t) for t in (x, *others)):
        return "generic"
    if x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
        return "numpy"
    if (
        x.device.type == "cuda"
        and x.dtype in _CUDA_DTYPES
        and (x.dtype != torch.bfloat16 or bf16_kernel)
        and class_last
        and x.is_contiguous()
        and x.numel() > 0
        and all(t is None or t.device == x.device for t in others)
        and _cupy() is not None
    ):
        return "cupy"
    return "generic"


def _fake_strides_like(x: Tensor) -> tuple[int, ...]:
    """The strides ``torch.empty_like(x)`` has; the fake implementations promise them."""
    return tuple(torch.empty_like(x, device="meta").stride())


def _as_declared(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` in the layout the fake implementation declares, never aliasing ``x``."""
    same_storage = grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    if same_storage or tuple(grad.stride()) != _fake_strides_like(x) or grad.dtype != x.dtype:
        out = torch.empty_like(x)
        out.copy_(grad)
        return out
    return grad


def _run(
    kernel: Any,
    x: Tensor,
    others: tuple[Tensor | None, ...],
    keywords: dict[str, Any],
    names: tuple[str, ...],
    *,
    inplace: bool = False,
    class_last: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``kernel(x, others[0], name=others[i] ..., **keywords)`` on the best route.

    ``others[0]`` is the second positional argument (the target); the rest are passed
    as the keywords ``names[1:]``. Returns ``(loss, grad)`` as tensors on ``x``'s
    device; ``grad`` is ``x`` itself when ``inplace``, else a new tensor laid out as
    ``torch.empty_like(x)``.
    """
    bf16_kernel = kernel is _losses.softmax_cross_entropy
    route = _route(x, *others, class_last=class_last, bf16_kernel=bf16_kernel)
    if route == "numpy":
        views = _numpy_views(x, *others)
        if views is not None:
            xn, *rest = views
            arrays = {n: a for n, a in zip(names[1:], rest[1:], strict=True) if a is not None}
            if inplace:
                loss, _ = kernel(xn, rest[0], inplace=True, **arrays, **keywords)
                grad = x
            else:
                grad = torch.empty_like(x)
                loss, _ = kernel(xn, rest[0], out=grad.numpy(), **arrays, **keywords)
            return torch.from_numpy(np.asarray(loss)).contiguous(), grad
    if route == "cupy":
        return _run_cupy(kernel, x, others, keywords, names, inplace=inplace)
    # The generic kernel on the tensors themselves: PyTorch's own ops, any device.
    xd = x.detach()
    rest = [None if t is None else t.detach() for t in others]
    arrays = {n: a for n, a in zip(names[1:], rest[1:], strict=True) if a is not None}
    loss, grad = kernel(xd, rest[0], **arrays, **keywords)
    if inplace:
        xd.copy_(grad)
        return loss, x
    return loss.contiguous(), _as_declared(grad, x)


def _run_cupy(
    kernel: Any,
    x: Tensor,
    others: tuple[Tensor | None, ...],
    keywords: dict[str, Any],
    names: tuple[str, ...],
    *,
    inplace: bool,
) -> tuple[Tensor, Tensor]:
    """The fused CUDA kernel on DLPack views, on PyTorch's current stream."""
    cupy = _cupy()
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)
    grad = x if inplace else torch.empty_like(x)
    bf16 = x.dtype == torch.bfloat16
    with cupy.cuda.Device(device), cupy.cuda.ExternalStream(stream.cuda_stream, device):
        # Inside this block CuPy's current stream is PyTorch's, so the DLPack exchanges
        # below need no synchronisation and the kernels queue behind PyTorch's work.
        def view(t: Tensor | None, storage_of_bf16: bool = False) -> Any:
            if t is None:
                return None
            if t.dtype == torch.bfloat16:
                if storage_of_bf16:
                    return cupy.from_dlpack(t.detach().view(torch.int16))
                t = t.float()  # bf16 soft targets / weights: the kernel reads float32
            return cupy.from_dlpack(t.detach())

        xc = view(x, storage_of_bf16=True)
        rest = [view(t) for t in others]
        arrays = {n: a for n, a in zip(names[1:], rest[1:], strict=True) if a is not None}
        target = {"inplace": True} if inplace else {"out": view(grad, storage_of_bf16=True)}
        if bf16:
            from .backends.cupy import softmax_cross_entropy_bf16

            loss, _ = softmax_cross_entropy_bf16(xc, rest[0], **target, **arrays, **keywords)
            loss_t = torch.from_dlpack(loss).view(torch.bfloat16)
        else:
            loss, _ = kernel(xc, rest[0], **target, **arrays, **keywords)
            loss_t = torch.from_dlpack(loss)
    return loss_t, grad


# --- shared autograd pieces ---------------------------------------------------------------


def _check_reduction(reduction: Any, size_average: Any, reduce: Any) -> str:
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce, emit_warning=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return str(reduction)


def _refuse_grad(t: Tensor | None, name: str, loss: str) -> None:
    if t is not None and t.requires_grad:
        raise NotImplementedError(
            f"{loss}: the gradient with respect to {name} is not computed by gradcore; "
            f"pass {name}.detach() (or use torch.nn.functional for that gradient)"
        )


def _transforms_active() -> bool:
    return bool(torch._C._are_functorch_transforms_active())


def _unit(d: Tensor) -> bool:
    """Whether the incoming gradient is exactly 1, checked only where that is free.

    Eager CPU only: on a GPU it would synchronise, and under ``torch.compile`` or a
    ``torch.func`` transform it would make the graph depend on a value.
    """
    return (
        d.numel() == 1
        and d.device.type == "cpu"
        and not d.requires_grad
        and not torch.compiler.is_compiling()
        and not _transforms_active()
        and bool(d == 1)
    )


def _scale(grad: Tensor, d: Tensor | None, axis: int | None) -> Tensor | None:
    """``grad`` times the incoming gradient ``d`` (0-d, or per row along ``axis``)."""
    if d is None:  # the loss took no part in what is differentiated
        return None
    if _unit(d):
        return grad
    if d.ndim and axis is not None:
        d = d.unsqueeze(axis)
    return grad * d


def _register_autograd(op: Any, setup: Any, backward: Any) -> Any:
    """Register ``backward`` (first order only) as ``op``'s autograd formula, and return
    its twin ``autograd.Function`` for ``torch.func``.

    A custom op's registered autograd formula is an old-style ``autograd.Function``,
    which ``torch.func`` transforms refuse; under a transform the public functions call
    the twin instead, whose forward is the same op (run below the transform's level).
    """
    backward = torch.autograd.function.once_differentiable(backward)
    op.register_autograd(backward, setup_context=setup)

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(*args: Any) -> Any:
            return op(*args)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            setup(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    Twin.__name__ = Twin.__qualname__ = f"{op._name.split('::')[-1]}_functorch"
    return Twin


def _differentiating_levels() -> int:
    """How many ``torch.func`` transforms that differentiate (grad, vjp, jvp) are active."""
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = (TransformType.Grad, TransformType.Jvp)
        return sum(i.key() in kinds for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # private API moved: count every level
        level = torch._C._functorch.maybe_current_level()
        return 0 if level is None else int(level)


def _call(op: Any, twin: Any, *args: Any) -> Tensor:
    """The loss of ``op(*args)``: the custom op, or its twin under ``torch.func``."""
    if not _transforms_active():
        loss, _ = op(*args)
        return loss
    if _differentiating_levels() > 1:
        # The saved gradient is a constant to an outer transform: grad of grad would
        # silently lose the second derivative.
        raise NotImplementedError(
            f"{op._name}: gradcore.torch losses are first-order only; nested "
            "torch.func.grad/jvp transforms are not supported"
        )
    loss, _ = twin.apply(*args)
    return loss


# --- cross-entropy ------------------------------------------------------------------------


def _class_axis(x: Tensor) -> int:
    return 1 if x.ndim >= 2 else 0


def _xent_keywords(
    x: Tensor,
    soft: bool,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "axis": _class_axis(x),
        # Probability targets have no index to ignore; PyTorch ignores the argument.
        "ignore_index": -100 if soft else ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
    }
    if softcap is not None:
        kw["softcap"] = softcap
    return kw


_XENT_NAMES = ("target", "weight")


def _xent_impl(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    kw = _xent_keywords(
        input, target.is_floating_point(), ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    return _run(
        _losses.softmax_cross_entropy,
        input,
        (target, weight),
        kw,
        _XENT_NAMES,
        class_last=_class_axis(input) == input.ndim - 1,
    )


@torch.library.custom_op("gradcore::cross_entropy", mutates_args=())
def _xent_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    return _xent_impl(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )


def _rows_shape(x: Tensor) -> list[int]:
    axis = _class_axis(x)
    return [s for i, s in enumerate(x.shape) if i != axis]


@_xent_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    shape = _rows_shape(input) if reduction == "none" else []
    return input.new_empty(shape), torch.empty_like(input)


def _setup_xent(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    # The gradient output is never differentiated; without this, autograd would hand
    # the backward a materialised zero tensor for it: a logits-sized allocation.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.axis = _class_axis(inputs[0])


def _backward_xent(ctx: Any, d_loss: Tensor, _d_grad: Any) -> tuple[Any, ...]:
    if any(ctx.needs_input_grad[1:3]):
        raise NotImplementedError(
            "gradcore.torch.cross_entropy: gradients with respect to target and weight "
            "are not computed; detach them"
        )
    (grad,) = ctx.saved_tensors
    return (_scale(grad, d_loss, ctx.axis), None, None, None, None, None, None, None)


_XentTwin = _register_autograd(_xent_op, _setup_xent, _backward_xent)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace: bool = False,
) -> Tensor:
    r"""Cross-entropy of logits and targets: :func:`torch.nn.functional.cross_entropy`.

    Same arguments, semantics, shapes and dtypes as PyTorch's (class indices or class
    probabilities as ``target``, class axis 1 for N-d input, ``weight``,
    ``ignore_index``, ``label_smoothing``, the deprecated ``size_average``/``reduce``),
    computed by :func:`gradcore.softmax_cross_entropy`.

    Parameters
    ----------
    input : Tensor, shape (C,), (N, C) or (N, C, d1, ...)
        Logits.
    target : Tensor
        Class indices (integer, the input's shape without the class axis) or class
        probabilities (floating, the input's shape).
    weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As in :func:`torch.nn.functional.cross_entropy`.
    z_loss : float >= 0
        Adds :math:`z\,\mathrm{lse}^2` per non-ignored row (PaLM's z-loss), counted in
        the same divisor as the cross-entropy.
    softcap : float, optional
        Cap the logits at :math:`c\tanh(x/c)` first (Gemma 2's soft-capping); the
        gradient includes the cap's derivative :math:`1 - \tanh^2(x/c)`.
    inplace : bool
        Write the gradient over ``input``'s storage (see the module notes for when it
        is safe). Ignored under ``torch.compile`` and ``torch.func`` transforms.

    Returns
    -------
    Tensor
        0-d for ``"mean"``/``"sum"``, else one loss per row; the input's dtype.

    Notes
    -----
    With :math:`p=\mathrm{softmax}(x)` over the class axis and target :math:`y`, the
    kernel's gradient is :math:`\partial\ell/\partial x = a\,p - w_y e_y - \dots` (see
    :func:`gradcore.softmax_cross_entropy`); the backward multiplies it by the incoming
    gradient :math:`g` (a scalar, or :math:`g_i` per row for ``"none"``): the VJP
    :math:`g^\top \partial\ell/\partial x`.
    """
    reduction = _check_reduction(reduction, size_average, reduce)
    if softcap is not None:
        softcap = float(softcap)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be torch Tensors, got {type(input).__name__} and "
            f"{type(target).__name__}"
        )
    if target.is_floating_point():
        _refuse_grad(target, "target", "cross_entropy")
    _refuse_grad(weight, "weight", "cross_entropy")
    args = (
        target,
        weight,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        softcap,
    )
    if inplace and _inplace_allowed(input):
        return _apply_inplace(_xent_inplace_kernel, _class_axis(input), input, *args)
    return _call(_xent_op, _XentTwin, input, *args)


def _xent_inplace_kernel(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> Tensor:
    kw = _xent_keywords(
        input, target.is_floating_point(), ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    loss, _ = _run(
        _losses.softmax_cross_entropy,
        input,
        (target, weight),
        kw,
        _XENT_NAMES,
        inplace=True,
        class_last=_class_axis(input) == input.ndim - 1,
    )
    return loss


# --- linear + cross-entropy ---------------------------------------------------------------


def _lxent_forward(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    keywords: dict[str, Any],
    need_grads: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``gradcore.linear_cross_entropy`` with PyTorch's (V, H) weight: loss, dx, dW, db.

    CPU float32/float64 tensors go to the NumPy fast path as views (the weight as the
    transposed view ``W.T``, shape (H, V)); anything else runs the generic kernel on the
    tensors themselves. ``dW`` is returned in PyTorch's (V, H) layout, contiguous.
    """
    from . import linear_cross_entropy as kernel

    tensors = (input, linear_weight, target, bias, weight)
    views = _numpy_views(*tensors) if _route(*tensors) == "numpy" else None
    if views is not None:
        xn, wn, yn, bn, cn = views
        loss, dx, dw, db = kernel(xn, wn.T, yn, bias=bn, weight=cn, need_dx=need_grads, **keywords)
        loss_t = torch.from_numpy(np.asarray(loss)).contiguous()
        if not need_grads:
            return loss_t, None, None, None
        return (
            loss_t,
            torch.from_numpy(dx),
            torch.from_numpy(dw).t().contiguous(),
            None if db is None else torch.from_numpy(db),
        )
    b, c = (None if t is None else t.detach() for t in (bias, weight))
    loss, dx, dw, db = kernel(
        input.detach(), linear_weight.detach().t(), target.detach(), bias=b, weight=c,
        need_dx=need_grads, **keywords,
    )  # fmt: skip
    if not need_grads:
        return loss.contiguous(), None, None, None
    return (
        loss.contiguous(),
        _as_declared(dx, input),
        _as_declared(dw.t(), linear_weight),
        None if bias is None else _as_declared(db, bias),  # db exists exactly with a bias
    )


def _lxent_keywords(
    soft: bool,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> dict[str, Any]:
    return {
        "ignore_index": -100 if soft else ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
        "chunk_size": chunk_size,
    }


@torch.library.custom_op("gradcore::linear_cross_entropy", mutates_args=())
def _lxent_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and, for "mean"/"sum", the kernel's dx, dW, db (empty placeholders for
    "none", whose backward recomputes: its gradient is not a scaling of the sum's)."""
    kw = _lxent_keywords(
        target.is_floating_point(),
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        chunk_size,
    )
    keep = reduction != "none"
    loss, dx, dw, db = _lxent_forward(input, linear_weight, target, bias, weight, kw, keep)
    empty = input.new_empty(0)
    return (
        loss,
        empty.clone() if dx is None else dx,
        empty.clone() if dw is None else dw,
        empty.clone() if db is None else db,
    )


@_lxent_op.register_fake
def _(input, linear_weight, target, bias, weight, ignore_index, reduction, *_options):
    if reduction == "none":
        empty = input.new_empty(0)
        return input.new_empty(input.shape[:-1]), empty, empty.clone(), empty.clone()
    db = input.new_empty(0) if bias is None else torch.empty_like(bias)
    return input.new_empty([]), torch.empty_like(input), torch.empty_like(linear_weight), db


@torch.library.custom_op("gradcore::linear_cross_entropy_rows_backward", mutates_args=())
def _lxent_rows_op(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    d_loss: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The exact VJP of ``reduction="none"`` for per-row cotangents ``d_loss``.

    Recomputes each chunk's logits, takes the cross-entropy gradient :math:`\delta_i`
    of every row, scales row :math:`i` by :math:`g_i` and only then contracts:
    :math:`\bar x_i = g_i\delta_i W`, :math:`\bar W = \sum_i g_i\,\delta_i^\top x_i`,
    :math:`\bar b = \sum_i g_i\delta_i`. (The sum's :math:`\bar W` cannot be rescaled
    afterwards unless all :math:`g_i` are equal.)
    """
    from .linear_xent import default_chunk_rows

    n_in = input.shape[-1]
    n_classes = linear_weight.shape[0]
    soft = target.is_floating_point()
    x2 = input.detach().reshape(-1, n_in)
    n_rows = x2.shape[0]
    t2 = target.detach().reshape(n_rows, n_classes) if soft else target.detach().reshape(n_rows)
    g2 = d_loss.detach().reshape(n_rows).to(input.dtype)
    w = linear_weight.detach()
    acc = torch.promote_types(input.dtype, torch.float32)
    w_acc = w.to(acc)
    dx = torch.empty(x2.shape, dtype=acc, device=input.device)
    dw = torch.zeros(w.shape, dtype=acc, device=input.device)
    db = torch.zeros(n_classes, dtype=acc, device=input.device)
    rows = chunk_size if chunk_size is not None else default_chunk_rows(n_rows, n_in, n_classes)
    kw = _xent_keywords(x2, soft, ignore_index, "none", label_smoothing, z_loss, softcap)
    for start in range(0, n_rows, rows):
        xc = x2[start : start + rows]
        z = xc @ w.t()
        if bias is not None:
            z = z + bias.detach()
        _, delta = _run(
            _losses.softmax_cross_entropy, z, (t2[start : start + rows], weight), kw, _XENT_NAMES
        )
        delta = (delta * g2[start : start + rows, None]).to(acc)
        dx[start : start + rows] = delta @ w_acc
        dw += delta.t() @ xc.to(acc)
        db += delta.sum(0)
    db_out = input.new_empty(0) if bias is None else db.to(bias.dtype)
    return dx.to(input.dtype).reshape(input.shape), dw.to(w.dtype), db_out


@_lxent_rows_op.register_fake
def _(input, linear_weight, target, bias, weight, d_loss, *_options):
    db = input.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(input), torch.empty_like(linear_weight), db


def _setup_lxent(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    ctx.set_materialize_grads(False)  # as in _setup_xent
    ctx.mark_non_differentiable(*output[1:])
    (input, linear_weight, target, bias, weight, ignore_index, reduction, *options) = inputs
    ctx.reduction = reduction
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.options = (ignore_index, *options)
        ctx.save_for_backward(input, linear_weight, target, bias, weight)
    else:
        ctx.save_for_backward(*output[1:])


def _backward_lxent(ctx: Any, d_loss: Tensor | None, *_d_grads: Any) -> tuple[Any, ...]:
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
        raise NotImplementedError(
            "gradcore.torch.linear_cross_entropy: gradients with respect to target and "
            "weight are not computed; detach them"
        )
    nones = (None,) * 7
    if d_loss is None:
        return (None, None, None, None, None, *nones)
    if ctx.reduction == "none":
        input, linear_weight, target, bias, weight = ctx.saved_tensors
        dx, dw, db = _lxent_rows_op(
            input, linear_weight, target, bias, weight, d_loss, *ctx.options
        )
    else:
        dx, dw, db = (_scale(t, d_loss, None) for t in ctx.saved_tensors)
    grads = (dx, dw, db if ctx.has_bias else None)
    want = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    dx, dw, db = (g if w else None for g, w in zip(grads, want, strict=True))
    return (dx, dw, None, db, None, *nones)


_LxentTwin = _register_autograd(_lxent_op, _setup_lxent, _backward_lxent)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Fused linear + cross-entropy: :func:`torch.nn.functional.linear_cross_entropy`.

    Same arguments and semantics as PyTorch's (``cross_entropy(linear(input,
    linear_weight, linear_bias), target, ...)``, with ``ignore_index=None`` meaning
    -100), computed by :func:`gradcore.linear_cross_entropy` in row chunks, so the
    ``N x C`` logits never exist. Differentiable with respect to ``input``,
    ``linear_weight`` and ``linear_bias``.

    Parameters
    ----------
    input : Tensor, shape (H,) or (N, H)
    linear_weight : Tensor, shape (C, H)
        PyTorch's :class:`torch.nn.Linear` layout (the kernel gets the view ``.T``).
        Multi-dimensional weights (PyTorch's ``(C, d1, ..., H)``) are not supported.
    target : Tensor
        Class indices, shape () or (N,), or class probabilities, shape (C,) or (N, C).
    linear_bias : Tensor, shape (C,), optional
    weight, reduction, ignore_index, label_smoothing
        As in :func:`torch.nn.functional.linear_cross_entropy`.
    options : torch.nn.LinearCrossEntropyOptions, optional
        Only its ``batch_chunk_size`` is read (as ``chunk_size`` when that is None);
        gradcore always works in chunks.
    z_loss, softcap
        As in :func:`cross_entropy`.
    chunk_size : int, optional
        Rows per chunk; default :func:`gradcore.linear_xent.default_chunk_rows`.

    Returns
    -------
    Tensor
        0-d for ``"mean"``/``"sum"``, else the per-row losses (shape of ``target``
        for class indices).

    Notes
    -----
    With :math:`Z = XW^\top + b` and :math:`\delta_i = \partial\ell_i/\partial z_i`, the
    forward returns :math:`\bar X = \Delta W`, :math:`\bar W = \Delta^\top X`,
    :math:`\bar b = \Delta^\top\mathbf 1` with the loss; for ``"mean"``/``"sum"`` the
    backward multiplies them by the scalar incoming gradient. For ``"none"`` with
    incoming :math:`g_i` per row, :math:`\bar W = \sum_i g_i\,\delta_i^\top x_i` is not
    a multiple of the sum's, so the backward recomputes the logits chunk by chunk (a
    second pass of the forward's cost) and contracts the row-scaled :math:`\delta`.
    """
    reduction = _check_reduction(reduction, None, None)
    for t, name in ((input, "input"), (linear_weight, "linear_weight"), (target, "target")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch Tensor, got {type(t).__name__}")
    if linear_weight.ndim != 2:
        raise ValueError(
            "linear_weight must have shape (C, in_features); multi-dimensional weights "
            f"are not supported by gradcore, got shape {tuple(linear_weight.shape)}"
        )
    if input.ndim not in (1, 2) or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(
            f"input must have shape (in_features,) or (N, in_features) with in_features = "
            f"{linear_weight.shape[1]}, got {tuple(input.shape)}"
        )
    if input.dtype != linear_weight.dtype or (
        linear_bias is not None and linear_bias.dtype != input.dtype
    ):
        raise TypeError(
            "input, linear_weight and linear_bias must have the same dtype, got "
            f"{input.dtype}, {linear_weight.dtype}"
            + ("" if linear_bias is None else f", {linear_bias.dtype}")
        )
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if target.is_floating_point():
        _refuse_grad(target, "target", "linear_cross_entropy")
    _refuse_grad(weight, "weight", "linear_cross_entropy")
    args = (
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        -100 if ignore_index is None else int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        None if chunk_size is None else int(chunk_size),
    )
    if not _transforms_active():
        return _lxent_op(*args)[0]
    if _differentiating_levels() > 1:
        raise NotImplementedError(
            "gradcore::linear_cross_entropy: gradcore.torch losses are first-order only; "
            "nested torch.func.grad/jvp transforms are not supported"
        )
    return _LxentTwin.apply(*args)[0]


# --- in place: an autograd.Function that marks the input as modified ---------------------


def _inplace_allowed(x: Tensor) -> bool:
    if torch.compiler.is_compiling() or _transforms_active() or not _plain(x):
        return False  # the compiler / transform plans memory; the out-of-place op runs
    if x.is_leaf and x.requires_grad:
        raise ValueError(
            "inplace=True would overwrite a leaf tensor that requires grad (a parameter "
            "or an input you differentiate); use inplace=False"
        )
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape, strict=True)):
        raise ValueError("inplace=True needs input without overlapping (expanded) elements")
    return True


class _Inplace(torch.autograd.Function):
    """A loss that overwrites its input with the gradient (eager mode only).

    The input is returned as a second output and marked dirty, so autograd rebases its
    history on this node: a later differentiable use of the overwritten tensor reaches
    :meth:`backward` with a gradient for it, and that raises. The version-counter bump
    makes earlier operations that saved the input raise in their own backward.
    """

    @staticmethod
    def forward(ctx: Any, kernel: Any, axis: int, input: Tensor, *args: Any) -> Any:
        loss = kernel(input, *args)
        torch.autograd.graph.increment_version(input)
        ctx.mark_dirty(input)
        ctx.set_materialize_grads(False)
        ctx.axis = axis
        ctx.save_for_backward(input)  # now the gradient
        return loss, input

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_loss: Tensor | None, d_input: Tensor | None) -> Any:
        if d_input is not None:
            raise RuntimeError(
                "a tensor overwritten by a gradcore.torch loss with inplace=True was used "
                "after the loss in a computation that is differentiated; its values are "
                "the gradient now, not the logits. Use inplace=False"
            )
        if any(ctx.needs_input_grad[3:]):
            raise NotImplementedError(
                "gradcore.torch: gradients with respect to the target and weights are not "
                "computed; detach them"
            )
        nones = (None,) * (len(ctx.needs_input_grad) - 3)
        if d_loss is None:
            return (None, None, None, *nones)
        (grad,) = ctx.saved_tensors
        return (None, None, _scale(grad, d_loss, ctx.axis), *nones)


def _apply_inplace(*args: Any) -> Tensor:
    loss, _ = _Inplace.apply(*args)
    return loss


# --- MSE and BCE with logits ---------------------------------------------------------------


def _same_shape_target(input: Tensor, target: Tensor, loss: str) -> Tensor:
    if target.shape == input.shape:
        return target
    warnings.warn(
        f"{loss}: using a target size ({target.size()}) that is different to the input size "
        f"({input.size()}); the target is broadcast to the input",
        stacklevel=3,
    )
    try:
        return target.expand_as(input)
    except RuntimeError:
        raise ValueError(
            f"{loss}: target of shape {tuple(target.shape)} does not broadcast to the input's "
            f"shape {tuple(input.shape)} (gradcore broadcasts the target only)"
        ) from None


_MSE_NAMES = ("target", "weight")


def _mse_call(
    input: Tensor, target: Tensor, weight: Tensor | None, reduction: str, inplace: bool
) -> tuple[Tensor, Tensor]:
    if weight is not None and reduction == "mean":
        # PyTorch's weighted mean divides by the weights' sum, not the element count:
        # sum(w' (x - y)^2) with w' = w / sum(w) is exactly that, with no extra pass.
        weight = weight / weight.sum()
        reduction = "sum"
    return _run(
        _losses.mse,
        input,
        (target, weight),
        {"reduction": reduction},
        _MSE_NAMES,
        inplace=inplace,
    )


@torch.library.custom_op("gradcore::mse_loss", mutates_args=())
def _mse_op(
    input: Tensor, target: Tensor, weight: Tensor | None, reduction: str
) -> tuple[Tensor, Tensor]:
    return _mse_call(input, target, weight, reduction, False)


def _pointwise_fake(input: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """The loss (input-shaped for ``"none"``, else 0-d) and the gradient, as metadata."""
    shape = list(input.shape) if reduction == "none" else []
    return input.new_empty(shape), torch.empty_like(input)


@_mse_op.register_fake
def _(input, target, weight, reduction):
    return _pointwise_fake(input, reduction)


def _setup_elementwise(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.set_materialize_grads(False)  # as in _setup_xent
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _backward_mse(ctx: Any, d_loss: Tensor, _d_grad: Any) -> tuple[Any, ...]:
    if ctx.needs_input_grad[2]:
        raise NotImplementedError(
            "gradcore.torch.mse_loss: the gradient with respect to weight is not computed"
        )
    (grad,) = ctx.saved_tensors
    g = _scale(grad, d_loss, 0)
    # d/d target of (x - y)^2 is minus d/d input.
    d_target = -g if g is not None and ctx.needs_input_grad[1] else None
    return (g if ctx.needs_input_grad[0] else None, d_target, None, None)


_MseTwin = _register_autograd(_mse_op, _setup_elementwise, _backward_mse)


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
    *,
    inplace: bool = False,
) -> Tensor:
    r"""Mean squared error: :func:`torch.nn.functional.mse_loss`, via :func:`gradcore.mse`.

    Same arguments and semantics as PyTorch's, including ``weight`` (same shape as the
    input; the ``"mean"`` then divides by the weights' sum). The gradient with respect
    to ``target`` is supported; with respect to ``weight`` it is not (raises).
    ``inplace=True`` writes the input's gradient over the input (see the module notes);
    it is refused when the target needs a gradient.

    Notes
    -----
    :math:`\ell_i = w_i (x_i - y_i)^2`, :math:`\partial\ell_i/\partial x_i = 2 w_i (x_i -
    y_i) = -\partial\ell_i/\partial y_i`; the backward scales the kernel's gradient by
    the incoming one (elementwise for ``"none"``).
    """
    reduction = _check_reduction(reduction, size_average, reduce)
    target = _same_shape_target(input, target, "mse_loss")
    if weight is not None and weight.shape != input.shape:
        raise ValueError("Weights and input must have the same size.")
    _refuse_grad(weight, "weight", "mse_loss")
    if inplace and target.requires_grad:
        raise ValueError("inplace=True cannot give the target's gradient; use inplace=False")
    if inplace and _inplace_allowed(input):
        return _apply_inplace(_mse_inplace_kernel, 0, input, target, weight, reduction)
    return _call(_mse_op, _MseTwin, input, target, weight, reduction)


def _mse_inplace_kernel(
    input: Tensor, target: Tensor, weight: Tensor | None, reduction: str
) -> Tensor:
    return _mse_call(input, target, weight, reduction, True)[0]


_BCE_NAMES = ("target", "weight", "pos_weight")


def _bce_call(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
    inplace: bool,
) -> tuple[Tensor, Tensor]:
    return _run(
        _losses.binary_cross_entropy_with_logits,
        input,
        (target, weight, pos_weight),
        {"reduction": reduction},
        _BCE_NAMES,
        inplace=inplace,
    )


@torch.library.custom_op("gradcore::binary_cross_entropy_with_logits", mutates_args=())
def _bce_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
) -> tuple[Tensor, Tensor]:
    return _bce_call(input, target, weight, pos_weight, reduction, False)


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction):
    return _pointwise_fake(input, reduction)


def _backward_bce(ctx: Any, d_loss: Tensor, _d_grad: Any) -> tuple[Any, ...]:
    if any(ctx.needs_input_grad[1:4]):
        raise NotImplementedError(
            "gradcore.torch.binary_cross_entropy_with_logits: gradients with respect to "
            "target, weight and pos_weight are not computed; detach them"
        )
    (grad,) = ctx.saved_tensors
    return (_scale(grad, d_loss, 0), None, None, None, None)


_BceTwin = _register_autograd(_bce_op, _setup_elementwise, _backward_bce)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
    *,
    inplace: bool = False,
) -> Tensor:
    r"""Sigmoid + binary cross-entropy, fused and stable:
    :func:`torch.nn.functional.binary_cross_entropy_with_logits`, via
    :func:`gradcore.binary_cross_entropy_with_logits`.

    Same arguments and semantics as PyTorch's (``weight`` and ``pos_weight`` broadcast
    to the input). Gradients with respect to ``target``, ``weight`` and ``pos_weight``
    are not computed (requesting one raises). ``inplace=True``: see the module notes.

    Notes
    -----
    :math:`\ell = w\,(q\,y\,\mathrm{softplus}(-x) + (1-y)\,\mathrm{softplus}(x))`,
    :math:`\partial\ell/\partial x = w\,((q y + 1 - y)\,\sigma(x) - q y)`; the backward
    scales it by the incoming gradient.
    """
    reduction = _check_reduction(reduction, size_average, reduce)
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    for t, name in ((target, "target"), (weight, "weight"), (pos_weight, "pos_weight")):
        _refuse_grad(t, name, "binary_cross_entropy_with_logits")
    args = (target, weight, pos_weight, reduction)
    if inplace and _inplace_allowed(input):
        return _apply_inplace(_bce_inplace_kernel, 0, input, *args)
    return _call(_bce_op, _BceTwin, input, *args)


def _bce_inplace_kernel(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
) -> Tensor:
    return _bce_call(input, target, weight, pos_weight, reduction, True)[0]


# --- modules ------------------------------------------------------------------------------


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""A :class:`torch.nn.CrossEntropyLoss` computed by :func:`cross_entropy`.

    Same constructor arguments (and ``weight`` buffer, state dict, ``isinstance``) as
    PyTorch's, plus the keyword-only ``z_loss``, ``softcap`` and ``inplace`` of
    :func:`cross_entropy`.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace = inplace

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        return f"z_loss={self.z_loss}, softcap={self.softcap}, inplace={self.inplace}"


class MSELoss(torch.nn.MSELoss):
    """A :class:`torch.nn.MSELoss` computed by :func:`mse_loss` (plus ``inplace``)."""

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        inplace: bool = False,
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        self.inplace = inplace

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction, inplace=self.inplace)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """A :class:`torch.nn.BCEWithLogitsLoss` computed by
    :func:`binary_cross_entropy_with_logits` (plus ``inplace``)."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: Tensor | None = None,
        *,
        inplace: bool = False,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.inplace = inplace

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(
            input,
            target,
            self.weight,
            reduction=self.reduction,
            pos_weight=self.pos_weight,
            inplace=self.inplace,
        )


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    r"""A :class:`torch.nn.LinearCrossEntropyLoss` computed by :func:`linear_cross_entropy`.

    Same constructor arguments, parameters (``self.linear``) and state dict as PyTorch's,
    plus the keyword-only ``z_loss``, ``softcap`` and ``chunk_size``. Multi-dimensional
    ``out_features`` are refused.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: Any = None,
        dtype: Any = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if tuple(out_features) != ():
            raise ValueError(
                "out_features must be () (gradcore has no K-dimensional heads), "
                f"got {out_features!r}"
            )
        super().__init__(
            in_features,
            num_classes,
            out_features=out_features,
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
        )
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"z_loss={self.z_loss}, softcap={self.softcap}, chunk_size={self.chunk_size}"
