r"""Explicit Jacobian matrices, the chain rule, and gradient checking.

The kernels of gradcore never build a Jacobian: the matrices of the common steps are
diagonal or rank-one corrections of a diagonal, and their product with the incoming
gradient collapses into one elementwise expression (a VJP). This module builds the
matrices anyway, so that the collapse can be seen and checked:

* :func:`jacobian` builds the explicit Jacobian of any function of one array, from a
  VJP on basis vectors or by central finite differences in float64;
* the closed-form Jacobians of the steps the fused kernels collapse:
  :func:`mean_jacobian`, :func:`squared_error_jacobian`, :func:`linear_jacobians`,
  :func:`diagonal_jacobian`, :func:`activation_jacobian`, :func:`softmax_jacobian`,
  :func:`log_softmax_jacobian`, :func:`cross_entropy_jacobian` and
  :func:`binary_cross_entropy_jacobian`;
* :func:`chain` multiplies Jacobians in the order of the chain rule, checking shapes;
* :func:`check_grad` compares an analytic gradient with finite differences and names
  the worst element.

Layout
------
Jacobians use the *numerator layout*: the derivative of ``f`` (shape ``m``) by ``x``
(shape ``n``) has one row per output and one column per input, so

==========================  =====================  =====================================
case                        Jacobian shape         reads as
==========================  =====================  =====================================
scalar by scalar            ``()``                 a number
vector ``(m,)`` by scalar   ``(m,)``               a column
scalar by vector ``(n,)``   ``(n,)``               a row (the gradient, as a row vector)
vector ``(m,)`` by ``(n,)`` ``(m, n)``             a matrix
==========================  =====================  =====================================

:func:`jacobian` keeps the array shapes (``f(x).shape + x.shape``). The closed-form
Jacobians and :func:`chain` work with *matrices*: a matrix-shaped array such as logits
``(N, K)`` is read as its row-major flattening, a vector of ``N*K`` entries (reshape a
:func:`jacobian` result to ``(f(x).size, x.size)`` to chain it).

All functions are written against the Python array API standard: they return arrays
of the caller's library on the caller's device, and never write into their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

from ._checks import check_floating, is_floating
from ._namespace import (
    array_arguments,
    backend_name,
    check_array_argument,
    get_namespace,
    to_numpy,
)

__all__ = [
    "GradCheck",
    "activation_jacobian",
    "binary_cross_entropy_jacobian",
    "chain",
    "check_grad",
    "cross_entropy_jacobian",
    "diagonal_jacobian",
    "jacobian",
    "linear_jacobians",
    "log_softmax_jacobian",
    "mean_jacobian",
    "softmax_jacobian",
    "squared_error_jacobian",
]

#: Default for ``max_elements`` of :func:`jacobian`: 10**8 entries (800 MB in float64).
MAX_JACOBIAN_ELEMENTS = 10**8

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


# --- helpers ---------------------------------------------------------------------------


def _size(shape: tuple[Any, ...]) -> int:
    return math.prod(int(s) for s in shape)


def _device(x: Any) -> Any:
    return array_api_compat.device(x)


def _widest_float(xp: Any, x: Any) -> Any:
    """float64 where the library has it on ``x``'s device, else float32.

    JAX without ``jax_enable_x64`` (and some GPUs) have no float64; asking for it would
    silently give float32 with a warning, so ask the inspection API first.
    """
    try:
        info = xp.__array_namespace_info__()
        try:
            floats = info.dtypes(kind="real floating", device=_device(x))
        except TypeError:
            floats = info.dtypes(kind="real floating")
    except (AttributeError, NotImplementedError):
        return xp.float64
    return floats.get("float64", floats.get("float32", xp.float64))


def _float64(xp: Any, x: Any) -> Any:
    """``x`` in float64 when the library has it (JAX without x64: float32)."""
    widest = _widest_float(xp, x)
    if x.dtype == widest:
        return x
    return xp.astype(x, widest)


def _as_array(value: Any, xp: Any, like: Any, what: str) -> Any:
    if isinstance(value, tuple):
        raise TypeError(
            f"{what} returned a tuple; it must return one array "
            "(for a gradcore loss use `lambda p: loss(p, target)[0]`)"
        )
    if isinstance(value, (int, float)):
        return xp.asarray(value, dtype=like.dtype, device=_device(like))
    if not array_api_compat.is_array_api_obj(value):
        raise TypeError(f"{what} must return an array, got {type(value).__name__}")
    return value


def _unit(xp: Any, n: int, j: int, dtype: Any, device: Any) -> Any:
    """The j-th basis vector of length n, built without writing into an array."""
    return xp.astype(xp.arange(n, device=device) == j, dtype)


def _eye(xp: Any, n: int, dtype: Any, like: Any) -> Any:
    return xp.eye(n, dtype=dtype, device=_device(like))


def _diag(xp: Any, d: Any) -> Any:
    """The square matrix with the vector ``d`` on its diagonal (the standard has no diag)."""
    n = int(d.shape[0])
    return _eye(xp, n, d.dtype, d) * xp.reshape(d, (1, n))


def _rows(xp: Any, a: Any, name: str) -> Any:
    """``a`` as a (rows, last axis) matrix; a vector is one row."""
    if a.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a 0-d array")
    k = int(a.shape[-1])
    return xp.reshape(a, (_size(tuple(a.shape)) // max(k, 1), k))


def _block_diagonal(xp: Any, blocks: Any) -> Any:
    """(N, K, K) blocks -> the (N*K, N*K) block-diagonal matrix."""
    n, k = int(blocks.shape[0]), int(blocks.shape[1])
    eye_n = xp.reshape(_eye(xp, n, blocks.dtype, blocks), (n, 1, n, 1))
    full = eye_n * xp.reshape(blocks, (n, k, 1, k))
    return xp.reshape(full, (n * k, n * k))


def _same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


# --- the explicit Jacobian -------------------------------------------------------------


def jacobian(
    f: Callable[[Any], Any],
    x: Any,
    /,
    *,
    vjp: Callable[[Any], Any] | None = None,
    batched: bool = False,
    eps: float | None = None,
    max_elements: int = MAX_JACOBIAN_ELEMENTS,
) -> Any:
    r"""The explicit Jacobian :math:`\partial f/\partial x` of a function of one array.

    Parameters
    ----------
    f : callable
        ``f(x) -> y``, one array out (any shape, including 0-d).
    x : array, shape (*in_shape)
        The point at which to differentiate.
    vjp : callable, optional
        ``vjp(v) -> v^T J``: the vector-Jacobian product of ``f`` at ``x``, taking an
        array shaped like ``y`` and returning one shaped like ``x``. When given, the
        Jacobian is built row by row from one VJP per output element (the basis
        vectors :math:`e_i`, since :math:`e_i^\top J` is row ``i``), in the dtype the
        VJP returns. When None, the columns are central finite differences in float64.
    batched : bool
        With ``vjp``: call it once on the stack of all basis vectors, of shape
        ``(y.size, *y.shape)``, expecting ``(y.size, *x.shape)`` back. Only for VJPs
        that broadcast over a leading axis (most elementwise ones do).
    eps : float, optional
        Finite-difference step, relative to ``max(1, |x_j|)``. Default: the cube root
        of the machine epsilon of the working dtype (about 6e-6 in float64), which
        balances truncation and rounding error for central differences.
    max_elements : int
        Refuse (``ValueError``) when the Jacobian would have more entries than this
        (default :data:`MAX_JACOBIAN_ELEMENTS`, 10**8: 800 MB in float64).

    Returns
    -------
    array, shape (*out_shape, *in_shape)
        The Jacobian in numerator layout, an array of ``x``'s library on ``x``'s
        device: ``J[i..., j...] = dy[i...] / dx[j...]``. The four cases:

        * scalar by scalar: shape ``()``;
        * vector ``(m,)`` by scalar: shape ``(m,)``, a column;
        * scalar by vector ``(n,)``: shape ``(n,)``, a row, the gradient;
        * vector ``(m,)`` by vector ``(n,)``: shape ``(m, n)``.

    Raises
    ------
    ValueError
        If the Jacobian would exceed ``max_elements`` entries, or the VJP returns the
        wrong shape.
    TypeError
        If ``f`` does not return an array, or finite differences are asked of an array
        that is not floating-point.

    Notes
    -----
    The cost is ``y.size`` VJPs, or ``2 * x.size`` evaluations of ``f``: fine for the
    small cases this is meant for (learning, testing), hopeless for real layers, which
    is why kernels compute VJPs instead.

    Examples
    --------
    >>> import numpy as np
    >>> from gradcore import jacobian
    >>> jacobian(lambda v: v**2, np.array([1.0, 2.0]))  # diag(2x)
    array([[2., 0.],
           [0., 4.]])
    """
    check_array_argument(x, "x")
    xp = get_namespace(x)
    in_shape = tuple(x.shape)
    n = _size(in_shape)
    y = _as_array(f(x), xp, x, "f")
    out_shape = tuple(y.shape)
    m = _size(out_shape)
    needed = m * n
    if batched and vjp is not None:
        needed = max(needed, m * m)
    if needed > max_elements:
        raise ValueError(
            f"jacobian: the Jacobian of an output of shape {out_shape} by an input of "
            f"shape {in_shape} has {m} x {n} = {m * n} entries"
            + (f" (and the batched basis {m} x {m})" if needed != m * n else "")
            + f", more than max_elements={max_elements}; check a large kernel with a "
            "directional test (gradcore.testing.check_vjp) or raise max_elements"
        )
    device = _device(x)
    if needed == 0:  # an empty input or output: nothing to differentiate
        dtype = y.dtype if vjp is not None else _widest_float(xp, x)
        return xp.zeros((*out_shape, *in_shape), dtype=dtype, device=device)
    if vjp is not None:
        return _jacobian_by_vjp(xp, vjp, x, y, batched, device)
    return _jacobian_by_differences(xp, f, x, y, eps, device)


def _jacobian_by_vjp(
    xp: Any, vjp: Callable[[Any], Any], x: Any, y: Any, batched: bool, device: Any
) -> Any:
    in_shape, out_shape = tuple(x.shape), tuple(y.shape)
    m = _size(out_shape)
    if batched:
        basis = xp.reshape(xp.eye(m, dtype=y.dtype, device=device), (m, *out_shape))
        rows = _as_array(vjp(basis), xp, x, "vjp")
        if tuple(rows.shape) != (m, *in_shape):
            raise ValueError(
                f"batched vjp must map cotangents of shape {(m, *out_shape)} to "
                f"{(m, *in_shape)}, got {tuple(rows.shape)}"
            )
        return xp.reshape(rows, (*out_shape, *in_shape))
    rows_list = []
    for i in range(m):
        e_i = xp.reshape(_unit(xp, m, i, y.dtype, device), out_shape)
        row = _as_array(vjp(e_i), xp, x, "vjp")
        if tuple(row.shape) != in_shape:
            raise ValueError(
                f"vjp must return an array shaped like x {in_shape}, got {tuple(row.shape)}"
            )
        rows_list.append(row)
    return xp.reshape(xp.stack(rows_list, axis=0), (*out_shape, *in_shape))


def _jacobian_by_differences(
    xp: Any, f: Callable[[Any], Any], x: Any, y: Any, eps: float | None, device: Any
) -> Any:
    check_floating(xp, x, "x (for finite differences)")
    in_shape, out_shape = tuple(x.shape), tuple(y.shape)
    n = _size(in_shape)
    x64 = xp.reshape(_float64(xp, x), (n,))
    work = x64.dtype
    if eps is None:
        eps = float(np.cbrt(xp.finfo(work).eps))
    # A relative step keeps the perturbation above rounding for large |x|; the step is
    # then taken as the difference that is actually representable, (x + h) - x.
    h = eps * xp.maximum(xp.abs(x64), xp.ones_like(x64))
    h = (x64 + h) - x64
    columns = []
    for j in range(n):
        step = _unit(xp, n, j, work, device) * h
        up = _as_array(f(xp.reshape(x64 + step, in_shape)), xp, x64, "f")
        down = _as_array(f(xp.reshape(x64 - step, in_shape)), xp, x64, "f")
        if tuple(up.shape) != out_shape:
            raise ValueError(
                f"f changed its output shape from {out_shape} to {tuple(up.shape)} "
                "when x was perturbed"
            )
        columns.append(_float64(xp, up) - _float64(xp, down))
    # One division at the end (not one per column) keeps lazy and JIT-compiled
    # libraries from tracing a separate indexing operation for every j.
    jac = xp.stack(columns, axis=-1) / (2 * h)
    return xp.reshape(jac, (*out_shape, *in_shape))


# --- the chain rule --------------------------------------------------------------------


def chain(*jacobians: Any) -> Any:
    r"""The product :math:`J_1 J_2 \cdots J_k` of Jacobians, in the chain rule's order.

    For :math:`J = f_1(f_2(\cdots f_k(x)))`, pass the Jacobians from the output side
    to the input side: ``chain(dJ_dz, dz_dy, dy_dx)`` is :math:`\partial J/\partial x`.

    Parameters
    ----------
    *jacobians : array, each of ndim 0, 1 or 2
        Matrices in numerator layout. A 2-D array ``(m, n)`` maps ``n`` inputs to ``m``
        outputs; a 0-d array is a scalar by a scalar. A 1-D array is a row (a scalar by
        a vector, like a gradient) when the product to its left has a scalar input,
        in particular when it comes first, and a column (a vector by a scalar)
        otherwise. For the rare product of a column by a row (an outer product through a
        scalar), pass both as 2-D arrays, ``(m, 1)`` and ``(1, n)``.

    Returns
    -------
    array
        The product, shaped by the same four cases: ``()`` when both ends are scalars,
        ``(n,)`` (a row) when only the output is, ``(m,)`` (a column) when only the input
        is, ``(m, n)`` otherwise.

    Raises
    ------
    ValueError
        When no Jacobian is given, one has more than two axes, or two neighbours do not
        fit; the message names the pair by position (1-based) and shape.

    Examples
    --------
    >>> import numpy as np
    >>> from gradcore import chain
    >>> chain(np.full(3, 1 / 3), np.diag([2.0, 4.0, 6.0]), np.ones(3))  # row, matrix, column
    array(4.)
    """
    if not jacobians:
        raise ValueError("chain needs at least one Jacobian")
    for index, jac in enumerate(jacobians, start=1):
        check_array_argument(jac, f"chain: Jacobian {index}")
    xp = get_namespace(*jacobians)
    # The running product is kept as a matrix, with flags for whether its output and
    # input are scalars (which decide how it is shaped at the end, and how a 1-D factor
    # is read).
    product: Any = None
    out_scalar = True
    in_scalar = True
    prev_index, prev_shape = 0, ()
    for index, jac in enumerate(jacobians, start=1):
        shape = tuple(jac.shape)
        if jac.ndim > 2:
            raise ValueError(
                f"chain: Jacobian {index} has shape {shape}; each factor must be a matrix "
                "(ndim 0, 1 or 2): reshape it to (output size, input size) first"
            )
        if jac.ndim == 0:
            mat, f_out_scalar, f_in_scalar = xp.reshape(jac, (1, 1)), True, True
        elif jac.ndim == 1 and in_scalar:
            mat, f_out_scalar, f_in_scalar = xp.reshape(jac, (1, shape[0])), True, False
        elif jac.ndim == 1:
            mat, f_out_scalar, f_in_scalar = xp.reshape(jac, (shape[0], 1)), False, True
        else:
            mat, f_out_scalar, f_in_scalar = jac, False, False
        if product is None:
            product, out_scalar = mat, f_out_scalar
        else:
            inner, rows = int(product.shape[1]), int(mat.shape[0])
            if inner != rows:
                left_in = "a scalar" if in_scalar else f"a vector of {inner}"
                right_out = "a scalar" if f_out_scalar else f"a vector of {rows}"
                raise ValueError(
                    f"chain: Jacobians {prev_index} and {index} do not fit: "
                    f"Jacobian {prev_index} (shape {prev_shape}) takes {left_in} as input "
                    f"but Jacobian {index} (shape {shape}) has {right_out} as output"
                )
            product = xp.matmul(product, mat)
        in_scalar = f_in_scalar
        prev_index, prev_shape = index, shape
    p, q = int(product.shape[0]), int(product.shape[1])
    if out_scalar and in_scalar:
        return xp.reshape(product, ())
    if out_scalar:
        return xp.reshape(product, (q,))
    if in_scalar:
        return xp.reshape(product, (p,))
    return product


# --- closed-form Jacobians of the collapsed pieces -------------------------------------


@array_arguments("values")
def mean_jacobian(values: Any, /, *, xp: Any = None) -> Any:
    r"""Jacobian of the mean :math:`J = \frac1N \sum_i J_0^{(i)}` by the values :math:`J_0`.

    Parameters
    ----------
    values : array, any shape with N elements
        The values averaged (per-sample losses); only their size and dtype matter.

    Returns
    -------
    array, shape (N,)
        The row vector :math:`\partial J/\partial J_0 = (1/N, \dots, 1/N)`, in the
        values' dtype (float64, or the widest float the library has, for integers).
    """
    xp = get_namespace(values, xp=xp)
    n = _size(tuple(values.shape))
    dtype = values.dtype if is_floating(xp, values) else _widest_float(xp, values)
    return xp.full((n,), 1.0 / max(n, 1), dtype=dtype, device=_device(values))


@array_arguments("pred", "target")
def squared_error_jacobian(pred: Any, target: Any, /, *, xp: Any = None) -> Any:
    r"""Jacobian of the squared errors :math:`J_0 = (y - \hat y)^2` by the predictions.

    Parameters
    ----------
    pred : array, any shape with N elements
        The predictions :math:`\hat y`.
    target : array, same shape
        The targets :math:`y`.

    Returns
    -------
    array, shape (N, N)
        :math:`\partial J_0/\partial \hat y = \operatorname{diag}(-2(y - \hat y))`:
        error ``i`` depends only on prediction ``i``.
    """
    xp = get_namespace(pred, target, xp=xp)
    _same_shape(pred, target, "pred", "target")
    check_floating(xp, pred, "pred")
    d = -2.0 * (xp.astype(target, pred.dtype) - pred)
    return _diag(xp, xp.reshape(d, (-1,)))


@array_arguments("x", "W")
def linear_jacobians(x: Any, W: Any, /, *, xp: Any = None) -> tuple[Any, Any, Any]:
    r"""Jacobians of the linear map :math:`\hat y = xW + b` by its input, weights and bias.

    Parameters
    ----------
    x : array, shape (N, in) or (in,)
        The input, one row per sample (leading axes are flattened into N).
    W : array, shape (in, out)
        The weights.

    Returns
    -------
    dy_dx : array, shape (N*out, N*in)
        :math:`\partial \hat y_{no}/\partial x_{mi} = \delta_{nm} W_{io}`: block diagonal,
        one block :math:`W^\top` per sample.
    dy_dW : array, shape (N*out, in*out)
        :math:`\partial \hat y_{no}/\partial W_{ip} = x_{ni}\,\delta_{op}`.
    dy_db : array, shape (N*out, out)
        :math:`\partial \hat y_{no}/\partial b_p = \delta_{op}`: N identity blocks stacked.

    Notes
    -----
    Rows and columns follow the row-major flattening of :math:`\hat y` (N, out), ``x``,
    ``W`` and ``b``. With one output (``out = 1``), ``dy_dW`` is ``x`` itself and
    ``dy_db`` a column of ones: :math:`\partial \hat y/\partial w = x`,
    :math:`\partial \hat y/\partial b = 1`.
    """
    xp = get_namespace(x, W, xp=xp)
    check_floating(xp, x, "x")
    if W.ndim != 2:
        raise ValueError(f"W must have shape (in, out), got {tuple(W.shape)}")
    n_in, n_out = int(W.shape[0]), int(W.shape[1])
    if x.ndim == 0 or int(x.shape[-1]) != n_in:
        raise ValueError(
            f"x must have shape (..., in) with in = W.shape[0] = {n_in}, got {tuple(x.shape)}"
        )
    rows = _rows(xp, x, "x")
    n = int(rows.shape[0])
    dtype = xp.result_type(x.dtype, W.dtype)
    rows, W = xp.astype(rows, dtype), xp.astype(W, dtype)
    eye_n = xp.reshape(_eye(xp, n, dtype, x), (n, 1, n, 1))
    dy_dx = xp.reshape(
        eye_n * xp.reshape(xp.permute_dims(W, (1, 0)), (1, n_out, 1, n_in)), (n * n_out, n * n_in)
    )
    eye_out = _eye(xp, n_out, dtype, x)
    dy_dW = xp.reshape(
        xp.reshape(rows, (n, 1, n_in, 1)) * xp.reshape(eye_out, (1, n_out, 1, n_out)),
        (n * n_out, n_in * n_out),
    )
    dy_db = xp.reshape(
        xp.ones((n, 1, 1), dtype=dtype, device=_device(x)) * xp.reshape(eye_out, (1, n_out, n_out)),
        (n * n_out, n_out),
    )
    return dy_dx, dy_dW, dy_db


@array_arguments("derivative")
def diagonal_jacobian(derivative: Any, /, *, xp: Any = None) -> Any:
    r"""The Jacobian of an elementwise map, from its elementwise derivative.

    Parameters
    ----------
    derivative : array, any shape with N elements
        :math:`\sigma'(x_i)` for each element.

    Returns
    -------
    array, shape (N, N)
        :math:`\operatorname{diag}(\sigma'(x))`: output ``i`` depends on input ``i`` only,
        which is why its VJP is the elementwise product :math:`g \odot \sigma'(x)`.
    """
    xp = get_namespace(derivative, xp=xp)
    return _diag(xp, xp.reshape(derivative, (-1,)))


@array_arguments("x")
def activation_jacobian(
    x: Any, /, *, activation: str, negative_slope: float = 0.01, xp: Any = None
) -> Any:
    r"""The diagonal Jacobian of an elementwise activation, in closed form.

    Parameters
    ----------
    x : array, any shape with N elements
        The activation's input.
    activation : {"relu", "leaky_relu", "sigmoid", "tanh", "gelu"}
        Which activation. ``gelu`` is the tanh approximation.
    negative_slope : float
        The slope of ``leaky_relu`` for negative inputs.

    Returns
    -------
    array, shape (N, N)
        :math:`\operatorname{diag}(\sigma'(x))` with

        * relu: :math:`[x > 0]` (the subgradient 0 at the kink);
        * leaky_relu: 1 for :math:`x > 0`, else ``negative_slope``;
        * sigmoid: :math:`s(1 - s)` with :math:`s = \sigma(x)`;
        * tanh: :math:`1 - \tanh^2 x`;
        * gelu: with :math:`u = c(x + a x^3)`, :math:`c = \sqrt{2/\pi}`,
          :math:`a = 0.044715`: :math:`\tfrac12(1 + \tanh u) +
          \tfrac12 x (1 - \tanh^2 u)\, c (1 + 3 a x^2)`.

    For softmax and log-softmax, whose Jacobians are not diagonal, see
    :func:`softmax_jacobian` and :func:`log_softmax_jacobian`.
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    one = xp.ones_like(x)
    if activation == "relu":
        d = xp.astype(x > 0, x.dtype)
    elif activation == "leaky_relu":
        d = xp.where(x > 0, one, negative_slope * one)
    elif activation == "sigmoid":
        s = one / (one + xp.exp(-x))
        d = s * (one - s)
    elif activation == "tanh":
        t = xp.tanh(x)
        d = one - t * t
    elif activation == "gelu":
        t = xp.tanh(_GELU_C * (x + _GELU_A * x * x * x))
        d = 0.5 * (one + t) + 0.5 * x * (one - t * t) * _GELU_C * (one + 3 * _GELU_A * x * x)
    else:
        raise ValueError(
            f"activation must be one of 'relu', 'leaky_relu', 'sigmoid', 'tanh', 'gelu', "
            f"got {activation!r} (softmax: use softmax_jacobian)"
        )
    return _diag(xp, xp.reshape(d, (-1,)))


@array_arguments("y")
def softmax_jacobian(y: Any, /, *, xp: Any = None) -> Any:
    r"""The Jacobian of the softmax over the last axis, from its output.

    Parameters
    ----------
    y : array, shape (N, K) or (K,)
        Softmax probabilities :math:`\hat y`, one distribution per row.

    Returns
    -------
    array, shape (N*K, N*K) or (K, K)
        Block diagonal with one block :math:`\operatorname{diag}(\hat y) - \hat y \hat
        y^\top` per row: a diagonal minus a rank-one matrix, so its product with a
        vector :math:`g` is :math:`\hat y \odot (g - \langle g, \hat y\rangle)`.
    """
    xp = get_namespace(y, xp=xp)
    check_floating(xp, y, "y")
    rows = _rows(xp, y, "y")
    k = int(rows.shape[1])
    blocks = xp.reshape(_eye(xp, k, y.dtype, y), (1, k, k)) * xp.reshape(rows, (-1, 1, k))
    blocks = blocks - xp.reshape(rows, (-1, k, 1)) * xp.reshape(rows, (-1, 1, k))
    return _block_diagonal(xp, blocks)


@array_arguments("y")
def log_softmax_jacobian(y: Any, /, *, xp: Any = None) -> Any:
    r"""The Jacobian of the log-softmax over the last axis, from its output.

    Parameters
    ----------
    y : array, shape (N, K) or (K,)
        Log-probabilities :math:`\log \hat y`, one distribution per row.

    Returns
    -------
    array, shape (N*K, N*K) or (K, K)
        Block diagonal with one block :math:`I - \mathbf 1 \hat y^\top` per row
        (:math:`\partial \log \hat y_k/\partial l_j = \delta_{kj} - \hat y_j`).
    """
    xp = get_namespace(y, xp=xp)
    check_floating(xp, y, "y")
    p = xp.exp(_rows(xp, y, "y"))
    k = int(p.shape[1])
    blocks = xp.reshape(_eye(xp, k, y.dtype, y), (1, k, k)) - xp.reshape(p, (-1, 1, k))
    return _block_diagonal(xp, blocks)


@array_arguments("probs", "target")
def cross_entropy_jacobian(probs: Any, target: Any, /, *, xp: Any = None) -> Any:
    r"""Jacobian of the per-sample cross-entropies by the probabilities.

    The per-sample loss is :math:`J_0^{(i)} = -\sum_k y^{(i)}_k \log \hat y^{(i)}_k`.

    Parameters
    ----------
    probs : array, shape (N, K) or (K,)
        Predicted probabilities :math:`\hat Y` (positive).
    target : array, same shape
        Target distributions :math:`Y` (one-hot rows for class labels).

    Returns
    -------
    array, shape (N, N*K) or (K,)
        Row ``i`` holds :math:`-y^{(i)}/\hat y^{(i)}` in the columns of sample ``i`` and
        zeros elsewhere; for one sample it is the row vector :math:`-y/\hat y`. Where
        :math:`y_k = 0` the entry is 0 even if :math:`\hat y_k = 0` (a masked class):
        the term :math:`0 \log \hat y_k` is 0 for every :math:`\hat y_k`.
    """
    xp = get_namespace(probs, target, xp=xp)
    _same_shape(probs, target, "probs", "target")
    check_floating(xp, probs, "probs")
    t = xp.astype(target, probs.dtype)
    zero = xp.zeros_like(probs)
    # Divide by 1 where the target is 0, so that 0/0 neither appears nor warns.
    d = xp.where(t == 0, zero, -t / xp.where(t == 0, xp.ones_like(probs), probs))
    if probs.ndim == 1:
        return d
    rows = _rows(xp, d, "probs")
    n, k = int(rows.shape[0]), int(rows.shape[1])
    eye_n = xp.reshape(_eye(xp, n, probs.dtype, probs), (n, n, 1))
    return xp.reshape(eye_n * xp.reshape(rows, (1, n, k)), (n, n * k))


@array_arguments("probs", "target")
def binary_cross_entropy_jacobian(probs: Any, target: Any, /, *, xp: Any = None) -> Any:
    r"""Jacobian of the elementwise binary cross-entropies by the probabilities.

    The loss of each element is :math:`J_0 = -[t \log p + (1 - t)\log(1 - p)]`.

    Parameters
    ----------
    probs : array, any shape with N elements
        Predicted probabilities :math:`p` (strictly between 0 and 1).
    target : array, same shape
        Targets :math:`t` in [0, 1].

    Returns
    -------
    array, shape (N, N)
        :math:`\operatorname{diag}\big(-t/p + (1 - t)/(1 - p)\big)`. Times the sigmoid's
        diagonal :math:`p(1 - p)` it collapses to :math:`p - t`.
    """
    xp = get_namespace(probs, target, xp=xp)
    _same_shape(probs, target, "probs", "target")
    check_floating(xp, probs, "probs")
    t = xp.astype(target, probs.dtype)
    one = xp.ones_like(probs)
    d = -t / probs + (one - t) / (one - probs)
    return _diag(xp, xp.reshape(d, (-1,)))


# --- gradient checking -----------------------------------------------------------------


@dataclass(frozen=True)
class GradCheck:
    r"""The outcome of :func:`check_grad`.

    Attributes
    ----------
    ok : bool
        Whether every element is within ``atol + rtol * |numeric|``.
    worst_index : tuple of int
        Where the analytic gradient is furthest from the numeric one, relative to the
        tolerance (an index into ``x``).
    analytic_value, numeric_value : float
        The two gradients at ``worst_index``.
    abs_error, rel_error : float
        At ``worst_index``: :math:`|a - n|` and :math:`|a - n| / \max(|a|, |n|)`.
    max_abs_error : float
        The largest :math:`|a - n|` over all elements.
    rtol, atol : float
        The tolerances used.
    analytic, numeric : numpy.ndarray
        Both gradients in float64, on the host.
    """

    ok: bool
    worst_index: tuple[int, ...]
    analytic_value: float
    numeric_value: float
    abs_error: float
    rel_error: float
    max_abs_error: float
    rtol: float
    atol: float
    analytic: np.ndarray = field(repr=False)
    numeric: np.ndarray = field(repr=False)

    def message(self) -> str:
        """A one-paragraph report naming the worst element."""
        verdict = "agrees with" if self.ok else "does not match"
        return (
            f"analytic gradient {verdict} central differences: worst element at index "
            f"{self.worst_index}: analytic {self.analytic_value!r}, numeric "
            f"{self.numeric_value!r}, absolute error {self.abs_error:.3g}, relative error "
            f"{self.rel_error:.3g} (rtol={self.rtol:g}, atol={self.atol:g}; largest "
            f"absolute error over all {self.analytic.size} elements {self.max_abs_error:.3g})"
        )


_CHECK_RTOL = {"float64": 1e-6, "float32": 2e-3, "float16": 3e-2, "bfloat16": 1e-1}


def _dtype_name(x: Any) -> str:
    try:
        return str(np.dtype(x.dtype).name)
    except TypeError:
        return str(x.dtype).rsplit(".", 1)[-1]


def check_grad(
    f: Callable[[Any], Any],
    x: Any,
    grad: Any,
    /,
    *,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    raise_on_failure: bool = True,
) -> GradCheck:
    r"""Compare an analytic gradient with central finite differences in float64.

    Parameters
    ----------
    f : callable
        ``f(x) -> loss``, a scalar (0-d array) function of ``x``. It is called on a
        float64 copy of ``x`` (when the library has float64), ``2 * x.size`` times.
    x : array
        The point, of any supported library and device.
    grad : array, shape like ``x``
        The analytic gradient :math:`\partial f/\partial x` at ``x`` (your kernel's).
    eps : float, optional
        The finite-difference step (see :func:`jacobian`).
    rtol, atol : float, optional
        Element ``i`` passes when :math:`|a_i - n_i| \le atol + rtol\,|n_i|`. Defaults
        suit the gradient's dtype: ``rtol`` 1e-6 for float64, 2e-3 for float32, 3e-2
        for float16; ``atol`` is ``rtol`` times 1e-2 of the largest numeric entry (at
        least ``rtol * 1e-6``), so that entries that are zero up to rounding pass.
        Where the library has no float64 (JAX without x64), the differences are taken
        in float32 and ``atol`` is raised to their rounding error,
        ``8 eps |f(x)| / step`` (about 5e-4 for a loss of order one): such a check
        only catches gross errors.
    raise_on_failure : bool
        Raise ``AssertionError`` when the check fails (default); else return the result.

    Returns
    -------
    GradCheck
        The comparison, with the worst element, its values and errors.

    Raises
    ------
    AssertionError
        When an element is out of tolerance; the message gives the worst element's
        index, the analytic and numeric values and the relative error.
    ValueError
        If ``f`` is not scalar or ``grad`` is not shaped like ``x``.

    Examples
    --------
    >>> import numpy as np
    >>> from gradcore import check_grad
    >>> x = np.array([1.0, -2.0, 3.0])
    >>> check_grad(lambda v: (v**2).sum(), x, 2 * x).ok
    True
    """
    check_array_argument(x, "x")
    check_array_argument(grad, "grad")
    xp = get_namespace(x, grad)
    if tuple(grad.shape) != tuple(x.shape):
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")

    def scalar_f(v: Any) -> Any:
        out = _as_array(f(v), xp, v, "f")
        if out.ndim != 0:
            raise ValueError(
                f"check_grad needs a scalar function; f returned shape {tuple(out.shape)} "
                "(reduce it, or compare Jacobians with jacobian())"
            )
        return out

    numeric = to_numpy(jacobian(scalar_f, x, eps=eps, max_elements=2**62)).astype(np.float64)
    analytic = to_numpy(grad).astype(np.float64).reshape(numeric.shape)
    if rtol is None:
        rtol = _CHECK_RTOL.get(_dtype_name(grad), 1e-6)
    if atol is None:
        scale = float(np.max(np.abs(numeric))) if numeric.size else 0.0
        atol = rtol * max(1e-2 * scale, 1e-6)
        work = _float64(xp, x).dtype
        if work != xp.float64:
            # No float64 in this library (JAX without x64): the differences carry a
            # rounding error of about eps * |f| / step, which the tolerance must admit.
            fine = float(xp.finfo(work).eps)
            step = eps if eps is not None else float(np.cbrt(fine))
            size = abs(float(to_numpy(scalar_f(xp.astype(x, work)))))
            atol = max(atol, 8 * fine * max(1.0, size) / step)
    diff = np.abs(analytic - numeric)
    if diff.size == 0:
        return GradCheck(True, (), 0.0, 0.0, 0.0, 0.0, 0.0, rtol, atol, analytic, numeric)
    # NaN in either gradient is the worst possible mismatch.
    score = np.where(np.isnan(diff), np.inf, diff / (atol + rtol * np.abs(numeric)))
    flat = int(np.argmax(score))
    index = tuple(int(i) for i in np.unravel_index(flat, numeric.shape))
    a, n_ = float(analytic.flat[flat]), float(numeric.flat[flat])
    denom = max(abs(a), abs(n_))
    rel = abs(a - n_) / denom if denom > 0 else 0.0
    if np.isnan(a) or np.isnan(n_):
        rel = float("nan")
    result = GradCheck(
        ok=bool(np.all(score <= 1.0)),
        worst_index=index,
        analytic_value=a,
        numeric_value=n_,
        abs_error=abs(a - n_),
        rel_error=rel,
        max_abs_error=float(np.nanmax(diff)) if not np.all(np.isnan(diff)) else float("nan"),
        rtol=float(rtol),
        atol=float(atol),
        analytic=analytic,
        numeric=numeric,
    )
    if not result.ok and raise_on_failure:
        raise AssertionError(f"check_grad on {backend_name(xp)}: {result.message()}")
    return result
