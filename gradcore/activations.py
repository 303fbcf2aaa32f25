r"""Elementwise and row-wise activations, each a forward map and its VJP side by side.

Every activation ``f`` comes with ``f_vjp(g, saved)``, the vector-Jacobian product
:math:`g^\top J_f`, where ``g`` is the gradient of the loss with respect to ``f``'s
output. When the derivative can be written with the output ``y`` alone (relu,
leaky_relu, sigmoid, tanh, softmax, log_softmax) the VJP takes ``y``, so a layer only
has to keep its output; gelu's derivative needs the input ``x``.

All kernels are generic array-API code: they never write into their inputs, never
branch in Python on array values (no device synchronisation, no Dask compute), keep
the input dtype, and compute float16 (or bfloat16) in float32 before rounding back.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ._checks import as_int, astype, check_floating, check_same_shape, compute_dtype
from ._dispatch import dispatchable
from ._namespace import array_arguments, get_namespace

__all__ = [
    "gelu",
    "gelu_vjp",
    "leaky_relu",
    "leaky_relu_vjp",
    "log_softmax",
    "log_softmax_vjp",
    "relu",
    "relu_vjp",
    "sigmoid",
    "sigmoid_vjp",
    "softmax",
    "softmax_vjp",
    "tanh",
    "tanh_vjp",
]

# gelu's tanh approximation: x/2 (1 + tanh(c (x + a x^3))), c = sqrt(2/pi).
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
# gelu's polynomial is evaluated on x clipped to [-T, T]. Beyond |x| = 20 already
# sigma(2u) is 0 or 1 and s(1-s) ~ exp(-0.07 |x|^3) is below every float's smallest
# subnormal, so clipping changes no result, but it keeps x^3 from overflowing float32
# (near 7e12) and turning the derivative's 0 * inf into NaN.
_GELU_CLIP = 1e4


# --- helpers ---------------------------------------------------------------------------


def _check_axis(x: Any, axis: Any, name: str = "x") -> int:
    axis = as_int(axis, "axis")
    ndim = x.ndim
    if ndim == 0:
        raise ValueError(f"{name} must have at least one dimension to take softmax along axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for {name} with {ndim} dimension(s)")
    return axis


def _check_slope(negative_slope: Any) -> float:
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(
            f"negative_slope must be a real number, got {type(negative_slope).__name__}"
        )
    if not math.isfinite(negative_slope):
        raise ValueError(f"negative_slope must be finite, got {negative_slope!r}")
    return float(negative_slope)


def _scalar(xp: Any, value: float, like: Any) -> Any:
    """A 0-d array of ``like``'s dtype and device (2023.12 ``where`` needs arrays)."""
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))


def _sigmoid(xp: Any, x: Any) -> Any:
    # exp(-|x|) lies in (0, 1]: neither branch can overflow, whatever the sign of x.
    e = xp.exp(-xp.abs(x))
    one_plus = 1.0 + e
    return xp.where(x >= 0, 1.0 / one_plus, e / one_plus)


# --- relu ------------------------------------------------------------------------------


@array_arguments("x")
@dispatchable
def relu(x: Any, /, *, xp: Any = None) -> Any:
    r"""Rectified linear unit, elementwise.

    Parameters
    ----------
    x : array, shape (...), real floating dtype
        Input.

    Returns
    -------
    y : array, shape (...), dtype of ``x``
        ``max(x, 0)``; NaN stays NaN.

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype.

    Notes
    -----
    Forward map: :math:`y_i = \max(x_i, 0)`.

    Jacobian: diagonal, :math:`\partial y_i / \partial x_i = [x_i > 0]`. At the kink
    :math:`x_i = 0` the subgradient 0 is used, as in PyTorch.

    VJP: :math:`\bar x_i = \bar y_i \, [y_i > 0]` (see :func:`relu_vjp`), since
    :math:`y_i > 0` exactly when :math:`x_i > 0`.
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    return xp.where(x < 0, _scalar(xp, 0.0, x), x)


@array_arguments("g", "y")
@dispatchable
def relu_vjp(g: Any, y: Any, /, *, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`relu`, from its output.

    Parameters
    ----------
    g : array, shape (...)
        Gradient of the loss with respect to ``y``.
    y : array, shape (...)
        The output of :func:`relu`.

    Returns
    -------
    dx : array, shape (...), dtype of ``g``
        Gradient with respect to the input: ``g`` where ``y > 0``, else 0.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype.
    ValueError
        If ``g`` and ``y`` differ in shape.

    Notes
    -----
    :math:`\bar x = \bar y \odot [y > 0]`; the subgradient at :math:`x = 0` is 0.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    return xp.where(y > 0, g, _scalar(xp, 0.0, g))


# --- leaky relu ------------------------------------------------------------------------


@array_arguments("x")
@dispatchable
def leaky_relu(x: Any, /, *, negative_slope: float = 0.01, xp: Any = None) -> Any:
    r"""Leaky rectified linear unit, elementwise.

    Parameters
    ----------
    x : array, shape (...), real floating dtype
        Input.
    negative_slope : float, default 0.01
        Slope for negative inputs. :func:`leaky_relu_vjp` needs it non-negative.

    Returns
    -------
    y : array, shape (...), dtype of ``x``
        ``x`` where ``x > 0``, else ``negative_slope * x``.

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype or ``negative_slope`` not a number.
    ValueError
        If ``negative_slope`` is not finite.

    Notes
    -----
    Forward map: :math:`y_i = x_i` if :math:`x_i > 0`, else :math:`\alpha x_i`.

    Jacobian: diagonal, :math:`\partial y_i / \partial x_i = 1` for :math:`x_i > 0` and
    :math:`\alpha` otherwise; at the kink :math:`x_i = 0` the subgradient
    :math:`\alpha` is used, as in PyTorch (and 0 for :math:`\alpha = 0`, like
    :func:`relu`).

    VJP: :math:`\bar x_i = \bar y_i` where :math:`y_i > 0`, else
    :math:`\alpha \bar y_i` (see :func:`leaky_relu_vjp`).
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    slope = _check_slope(negative_slope)
    return xp.where(x > 0, x, x * slope)


@array_arguments("g", "y")
@dispatchable
def leaky_relu_vjp(g: Any, y: Any, /, *, negative_slope: float = 0.01, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`leaky_relu`, from its output.

    Parameters
    ----------
    g : array, shape (...)
        Gradient of the loss with respect to ``y``.
    y : array, shape (...)
        The output of :func:`leaky_relu`.
    negative_slope : float, default 0.01
        The slope the forward pass used; must be non-negative.

    Returns
    -------
    dx : array, shape (...), dtype of ``g``
        ``g`` where ``y > 0``, else ``negative_slope * g``.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype, or ``negative_slope`` is
        not a number.
    ValueError
        If ``g`` and ``y`` differ in shape, or ``negative_slope`` is negative or not
        finite.

    Notes
    -----
    :math:`\bar x = \bar y \odot (1 \text{ if } y > 0 \text{ else } \alpha)`. For
    :math:`\alpha \ge 0` the sign of :math:`y` tells whether :math:`x > 0`; a negative
    slope maps negative inputs to positive outputs, so the VJP could not be recovered
    from the output and is refused. At :math:`x = 0` the subgradient is :math:`\alpha`.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    slope = _check_slope(negative_slope)
    if slope < 0:
        raise ValueError(
            f"negative_slope must be >= 0 to take the VJP from the output, got {slope!r}"
        )
    return xp.where(y > 0, g, g * slope)


# --- sigmoid ---------------------------------------------------------------------------


@array_arguments("x")
@dispatchable
def sigmoid(x: Any, /, *, xp: Any = None) -> Any:
    r"""Logistic sigmoid, elementwise, without overflow for any input.

    Parameters
    ----------
    x : array, shape (...), real floating dtype
        Input.

    Returns
    -------
    y : array, shape (...), dtype of ``x``
        ``1 / (1 + exp(-x))``, in [0, 1].

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype.

    Notes
    -----
    Forward map: :math:`y_i = \sigma(x_i) = 1 / (1 + e^{-x_i})`, evaluated as
    :math:`1 / (1 + e^{-|x|})` for :math:`x \ge 0` and :math:`e^{-|x|} / (1 + e^{-|x|})`
    for :math:`x < 0`, so that ``exp`` never overflows and tiny outputs keep their
    relative accuracy.

    Jacobian: diagonal, :math:`\partial y_i / \partial x_i = y_i (1 - y_i)`.

    VJP: :math:`\bar x = \bar y \odot y \odot (1 - y)` (see :func:`sigmoid_vjp`).
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    work = compute_dtype(xp, x.dtype)
    return astype(xp, _sigmoid(xp, astype(xp, x, work)), x.dtype)


@array_arguments("g", "y")
@dispatchable
def sigmoid_vjp(g: Any, y: Any, /, *, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`sigmoid`, from its output.

    Parameters
    ----------
    g : array, shape (...)
        Gradient of the loss with respect to ``y``.
    y : array, shape (...)
        The output of :func:`sigmoid`.

    Returns
    -------
    dx : array, shape (...), dtype of ``g`` and ``y`` promoted
        ``g * y * (1 - y)``.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype.
    ValueError
        If ``g`` and ``y`` differ in shape.

    Notes
    -----
    :math:`\bar x = \bar y \odot y \odot (1 - y)`.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    return g * (y * (1.0 - y))


# --- tanh ------------------------------------------------------------------------------


@array_arguments("x")
@dispatchable
def tanh(x: Any, /, *, xp: Any = None) -> Any:
    r"""Hyperbolic tangent, elementwise.

    Parameters
    ----------
    x : array, shape (...), real floating dtype
        Input.

    Returns
    -------
    y : array, shape (...), dtype of ``x``
        ``tanh(x)``, in [-1, 1].

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype.

    Notes
    -----
    Forward map: :math:`y_i = \tanh x_i`.

    Jacobian: diagonal, :math:`\partial y_i / \partial x_i = 1 - y_i^2`.

    VJP: :math:`\bar x = \bar y \odot (1 - y^2)` (see :func:`tanh_vjp`).
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    work = compute_dtype(xp, x.dtype)
    return astype(xp, xp.tanh(astype(xp, x, work)), x.dtype)


@array_arguments("g", "y")
@dispatchable
def tanh_vjp(g: Any, y: Any, /, *, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`tanh`, from its output.

    Parameters
    ----------
    g : array, shape (...)
        Gradient of the loss with respect to ``y``.
    y : array, shape (...)
        The output of :func:`tanh`.

    Returns
    -------
    dx : array, shape (...), dtype of ``g`` and ``y`` promoted
        ``g * (1 - y**2)``.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype.
    ValueError
        If ``g`` and ``y`` differ in shape.

    Notes
    -----
    :math:`\bar x = \bar y \odot (1 - y^2)`.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    return g * (1.0 - y * y)


# --- gelu ------------------------------------------------------------------------------


@array_arguments("x")
@dispatchable
def gelu(x: Any, /, *, xp: Any = None) -> Any:
    r"""Gaussian error linear unit, tanh approximation, elementwise.

    The exact GELU needs ``erf``, which the array API standard lacks; this is the
    approximation PyTorch computes with ``gelu(x, approximate="tanh")``.

    Parameters
    ----------
    x : array, shape (...), real floating dtype
        Input.

    Returns
    -------
    y : array, shape (...), dtype of ``x``
        ``x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x**3)))``.

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype.

    Notes
    -----
    Forward map, with :math:`u = c (x + a x^3)`, :math:`c = \sqrt{2/\pi}`,
    :math:`a = 0.044715`:

    .. math:: y = \tfrac{x}{2} (1 + \tanh u) = x\, \sigma(2u),

    evaluated in the second form: :math:`1 + \tanh u` cancels catastrophically for
    negative :math:`x`, the stable sigmoid does not. :math:`u` is computed from
    :math:`x` clipped to :math:`[-10^4, 10^4]`, where :math:`\sigma(2u)` is already
    exactly 0 or 1, so that :math:`x^3` cannot overflow.

    Jacobian: diagonal, with :math:`s = \sigma(2u)`,

    .. math:: \frac{\partial y}{\partial x} = s + 2 c\, x\, s (1 - s) (1 + 3 a x^2).

    VJP: :math:`\bar x = \bar y \odot \partial y / \partial x`; it needs the input
    ``x`` (see :func:`gelu_vjp`). ``gelu(-inf)`` is NaN (``-inf * 0``), as in PyTorch.
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    work = compute_dtype(xp, x.dtype)
    xw = astype(xp, x, work)
    xc = xp.clip(xw, -_GELU_CLIP, _GELU_CLIP)
    u2 = (2.0 * _GELU_C) * (xc + _GELU_A * (xc * xc * xc))
    return astype(xp, xw * _sigmoid(xp, u2), x.dtype)


@array_arguments("g", "x")
@dispatchable
def gelu_vjp(g: Any, x: Any, /, *, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`gelu`, from its input.

    Parameters
    ----------
    g : array, shape (...)
        Gradient of the loss with respect to ``gelu(x)``.
    x : array, shape (...)
        The input of :func:`gelu` (its output does not determine the derivative).

    Returns
    -------
    dx : array, shape (...), dtype of ``g`` and ``x`` promoted
        ``g * gelu'(x)``.

    Raises
    ------
    TypeError
        If ``g`` or ``x`` is not of a real floating dtype.
    ValueError
        If ``g`` and ``x`` differ in shape.

    Notes
    -----
    With :math:`u = c (x + a x^3)` and :math:`s = \sigma(2u)`:

    .. math:: \bar x = \bar y \odot \bigl(s + 2 c\, x\, s (1 - s) (1 + 3 a x^2)\bigr).

    The polynomial is evaluated on :math:`x` clipped to :math:`[-10^4, 10^4]`: beyond
    :math:`|x| \approx 20` the second term is below the smallest subnormal anyway, and
    the clip keeps :math:`x^3` from overflowing into ``0 * inf``.
    """
    xp = get_namespace(g, x, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, x, "x")
    check_same_shape(g, x, "g", "x")
    out_dtype = xp.result_type(g, x)
    work = compute_dtype(xp, out_dtype)
    xc = xp.clip(astype(xp, x, work), -_GELU_CLIP, _GELU_CLIP)
    x2 = xc * xc
    u2 = (2.0 * _GELU_C) * (xc + _GELU_A * (x2 * xc))
    # s (1 - s) = e / (1 + e)^2 with e = exp(-|2u|): accurate on both tails, where
    # forming 1 - s would cancel.
    e = xp.exp(-xp.abs(u2))
    p = 1.0 / (1.0 + e)
    s = xp.where(u2 >= 0, p, e * p)
    tail = (2.0 * _GELU_C) * xc * (1.0 + (3.0 * _GELU_A) * x2)
    dydx = s + tail * (e * (p * p))
    return astype(xp, astype(xp, g, work) * dydx, out_dtype)


# --- softmax and log-softmax -----------------------------------------------------------


@array_arguments("x")
@dispatchable
def softmax(x: Any, /, *, axis: int = -1, xp: Any = None) -> Any:
    r"""Softmax along one axis, stabilised by subtracting the maximum.

    Parameters
    ----------
    x : array, shape (..., n, ...), real floating dtype
        Logits. Entries of ``-inf`` (masked classes) give probability 0.
    axis : int, default -1
        The axis that sums to one.

    Returns
    -------
    y : array, same shape and dtype as ``x``
        Probabilities along ``axis``. A slice that is entirely ``-inf`` (or holds
        ``+inf`` or NaN) gives NaN.

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype or ``axis`` is not an int.
    ValueError
        If ``x`` is 0-d or ``axis`` is out of range.

    Notes
    -----
    Forward map: :math:`y_i = e^{x_i - m} / \sum_j e^{x_j - m}` with
    :math:`m = \max_j x_j` (the shift cancels; it keeps ``exp`` from overflowing).
    float16 is exponentiated and summed in float32.

    Jacobian of one slice: :math:`J = \operatorname{diag}(y) - y y^\top`.

    VJP: :math:`\bar x = y \odot (\bar y - \langle \bar y, y\rangle)`, the inner
    product taken along ``axis`` (see :func:`softmax_vjp`).
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    axis = _check_axis(x, axis)
    work = compute_dtype(xp, x.dtype)
    xw = astype(xp, x, work)
    e = xp.exp(xw - xp.max(xw, axis=axis, keepdims=True))
    return astype(xp, e / xp.sum(e, axis=axis, keepdims=True), x.dtype)


@array_arguments("g", "y")
@dispatchable
def softmax_vjp(g: Any, y: Any, /, *, axis: int = -1, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`softmax`, from its output.

    Parameters
    ----------
    g : array, shape of ``y``
        Gradient of the loss with respect to ``y``.
    y : array, shape (..., n, ...)
        The output of :func:`softmax` along ``axis``.
    axis : int, default -1
        The axis the forward pass normalised.

    Returns
    -------
    dx : array, shape of ``y``, dtype of ``g`` and ``y`` promoted
        ``y * (g - sum(g * y, axis))``.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype, or ``axis`` is not an int.
    ValueError
        If ``g`` and ``y`` differ in shape, or ``axis`` is out of range.

    Notes
    -----
    :math:`\bar x = (\operatorname{diag}(y) - y y^\top) \bar y
    = y \odot (\bar y - \langle \bar y, y\rangle)` per slice; masked entries
    (:math:`y_i = 0`) get gradient 0. float16 sums in float32.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    axis = _check_axis(y, axis, "y")
    out_dtype = xp.result_type(g, y)
    work = compute_dtype(xp, out_dtype)
    gw, yw = astype(xp, g, work), astype(xp, y, work)
    dot = xp.sum(gw * yw, axis=axis, keepdims=True)
    return astype(xp, yw * (gw - dot), out_dtype)


@array_arguments("x")
@dispatchable
def log_softmax(x: Any, /, *, axis: int = -1, xp: Any = None) -> Any:
    r"""Logarithm of the softmax along one axis, without forming the softmax.

    Parameters
    ----------
    x : array, shape (..., n, ...), real floating dtype
        Logits. Entries of ``-inf`` (masked classes) give ``-inf``; the other entries
        stay finite.
    axis : int, default -1
        The axis to normalise along.

    Returns
    -------
    y : array, same shape and dtype as ``x``
        ``x - logsumexp(x, axis)``. A slice that is entirely ``-inf`` (or holds
        ``+inf`` or NaN) gives NaN.

    Raises
    ------
    TypeError
        If ``x`` is not of a real floating dtype or ``axis`` is not an int.
    ValueError
        If ``x`` is 0-d or ``axis`` is out of range.

    Notes
    -----
    Forward map: :math:`y_i = (x_i - m) - \log \sum_j e^{x_j - m}`,
    :math:`m = \max_j x_j`; the sum is at least 1, so the log never sees 0.
    float16 is computed in float32.

    Jacobian of one slice: :math:`J = I - \mathbf 1\, p^\top` with
    :math:`p = e^{y}` the softmax.

    VJP: :math:`\bar x = \bar y - e^{y} \sum_j \bar y_j` (see
    :func:`log_softmax_vjp`).
    """
    xp = get_namespace(x, xp=xp)
    check_floating(xp, x, "x")
    axis = _check_axis(x, axis)
    work = compute_dtype(xp, x.dtype)
    xw = astype(xp, x, work)
    z = xw - xp.max(xw, axis=axis, keepdims=True)
    return astype(xp, z - xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True)), x.dtype)


@array_arguments("g", "y")
@dispatchable
def log_softmax_vjp(g: Any, y: Any, /, *, axis: int = -1, xp: Any = None) -> Any:
    r"""Vector-Jacobian product of :func:`log_softmax`, from its output.

    Parameters
    ----------
    g : array, shape of ``y``
        Gradient of the loss with respect to ``y``.
    y : array, shape (..., n, ...)
        The output of :func:`log_softmax` along ``axis``.
    axis : int, default -1
        The axis the forward pass normalised.

    Returns
    -------
    dx : array, shape of ``y``, dtype of ``g`` and ``y`` promoted
        ``g - exp(y) * sum(g, axis)``.

    Raises
    ------
    TypeError
        If ``g`` or ``y`` is not of a real floating dtype, or ``axis`` is not an int.
    ValueError
        If ``g`` and ``y`` differ in shape, or ``axis`` is out of range.

    Notes
    -----
    :math:`\bar x = (I - p \mathbf 1^\top) \bar y = \bar y - p \sum_j \bar y_j`,
    :math:`p = e^{y}`; masked entries (:math:`y_i = -\infty`, :math:`p_i = 0`) pass
    :math:`\bar y_i` through, as in PyTorch. float16 sums in float32.
    """
    xp = get_namespace(g, y, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, y, "y")
    check_same_shape(g, y, "g", "y")
    axis = _check_axis(y, axis, "y")
    out_dtype = xp.result_type(g, y)
    work = compute_dtype(xp, out_dtype)
    gw, yw = astype(xp, g, work), astype(xp, y, work)
    total = xp.sum(gw, axis=axis, keepdims=True)
    return astype(xp, gw - xp.exp(yw) * total, out_dtype)
