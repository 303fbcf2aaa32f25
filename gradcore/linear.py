r"""The affine layer ``y = x W + b`` and its VJP.

``W`` has shape ``(in, out)`` so that a row of ``x`` maps to a row of ``y`` by a
right product, as in the lecture's numerator-layout chain rule; ``x`` may carry any
number of leading batch dimensions, all of which the parameter gradients sum over.
"""

from __future__ import annotations

import math
from typing import Any

from ._checks import astype, check_floating, compute_dtype
from ._dispatch import dispatchable
from ._namespace import array_arguments, get_namespace

__all__ = ["linear", "linear_vjp"]


def _check_x_w(x: Any, W: Any) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D with shape (in, out), got shape {tuple(W.shape)}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (its last is the input features)")
    if x.shape[-1] != W.shape[0]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must match W's first ({W.shape[0]}): "
            f"got x.shape={tuple(x.shape)} and W.shape={tuple(W.shape)}"
        )


@array_arguments("x", "W", "b", optional=("b",))
@dispatchable
def linear(x: Any, W: Any, /, b: Any = None, *, xp: Any = None) -> Any:
    r"""Affine map ``x @ W + b`` over the last axis of ``x``.

    Parameters
    ----------
    x : array, shape (..., in), real floating dtype
        Inputs; any leading dimensions are batch dimensions (``x`` may be 1-D).
    W : array, shape (in, out), real floating dtype
        Weights.
    b : array, shape (out,), optional
        Bias; omitted (None) means no bias.

    Returns
    -------
    y : array, shape (..., out)
        Of the promoted dtype of ``x``, ``W`` and ``b``; float16 is multiplied and
        accumulated in float32, then rounded back.

    Raises
    ------
    TypeError
        If an input is not of a real floating dtype.
    ValueError
        If ``W`` is not 2-D, ``x``'s last dimension differs from ``W``'s first, or
        ``b`` is not of shape ``(out,)``.

    Notes
    -----
    Forward map, per row :math:`x` (a row vector): :math:`y = x W + b`.

    Jacobians (numerator layout): :math:`\partial y / \partial x = W^\top`,
    :math:`\partial y_j / \partial W_{kl} = x_k \delta_{jl}`,
    :math:`\partial y / \partial b = I`.

    VJP, for the incoming row gradient :math:`\bar y`: :math:`\bar x = \bar y W^\top`,
    :math:`\bar W = x^\top \bar y` and :math:`\bar b = \bar y`, the last two summed over
    all batch rows (see :func:`linear_vjp`).
    """
    xp = get_namespace(x, W, b, xp=xp)
    check_floating(xp, x, "x")
    check_floating(xp, W, "W")
    _check_x_w(x, W)
    if b is not None:
        check_floating(xp, b, "b")
        if tuple(b.shape) != (W.shape[1],):
            raise ValueError(
                f"b must have shape (out,) = ({W.shape[1]},) to match W.shape="
                f"{tuple(W.shape)}, got shape {tuple(b.shape)}"
            )
        out_dtype = xp.result_type(x, W, b)
    else:
        out_dtype = xp.result_type(x, W)
    work = compute_dtype(xp, out_dtype)
    y = xp.matmul(astype(xp, x, work), astype(xp, W, work))
    if b is not None:
        y = y + astype(xp, b, work)
    return astype(xp, y, out_dtype)


@array_arguments("g", "x", "W")
@dispatchable
def linear_vjp(
    g: Any, x: Any, W: Any, /, *, need_dx: bool = True, xp: Any = None
) -> tuple[Any, Any, Any]:
    r"""Vector-Jacobian product of :func:`linear` with respect to ``x``, ``W`` and ``b``.

    Parameters
    ----------
    g : array, shape (..., out)
        Gradient of the loss with respect to ``linear(x, W, b)``.
    x : array, shape (..., in)
        The input of the forward pass (same leading dimensions as ``g``).
    W : array, shape (in, out)
        The weights of the forward pass.
    need_dx : bool, default True
        Whether to compute ``dx``. A network's first layer has no use for the
        gradient of its input; ``False`` skips that matrix product and returns
        ``dx=None``.

    Returns
    -------
    dx : array, shape (..., in), or None
        ``g @ W.T`` (None when ``need_dx`` is False).
    dW : array, shape (in, out)
        ``x.T @ g`` with every leading dimension flattened into the rows.
    db : array, shape (out,)
        ``g`` summed over every leading dimension (ignore it for a layer without
        bias). All three have the promoted dtype of ``g``, ``x`` and ``W``; float16
        accumulates in float32.

    Raises
    ------
    TypeError
        If an input is not of a real floating dtype.
    ValueError
        If ``W`` is not 2-D, ``x``'s last dimension differs from ``W``'s first, or
        ``g`` is not of shape ``x.shape[:-1] + (out,)``.

    Notes
    -----
    Stacking the batch rows of ``x`` into :math:`X` (N, in) and of ``g`` into
    :math:`G` (N, out), :math:`Y = X W + \mathbf 1 b^\top` gives

    .. math:: \bar X = G W^\top, \qquad \bar W = X^\top G, \qquad
              \bar b = G^\top \mathbf 1.
    """
    xp = get_namespace(g, x, W, xp=xp)
    check_floating(xp, g, "g")
    check_floating(xp, x, "x")
    check_floating(xp, W, "W")
    _check_x_w(x, W)
    n_in, n_out = W.shape
    expected = (*tuple(x.shape[:-1]), n_out)
    if tuple(g.shape) != expected:
        raise ValueError(
            f"g must have shape x.shape[:-1] + (out,) = {expected}, got shape "
            f"{tuple(g.shape)} (x.shape={tuple(x.shape)}, W.shape={tuple(W.shape)})"
        )
    out_dtype = xp.result_type(g, x, W)
    work = compute_dtype(xp, out_dtype)
    gw, xw, Ww = astype(xp, g, work), astype(xp, x, work), astype(xp, W, work)
    dx = xp.matmul(gw, xp.matrix_transpose(Ww)) if need_dx else None
    lead = tuple(x.shape[:-1])
    # An explicit row count (not -1) so that in == 0 or out == 0 still reshapes.
    n = math.prod(lead) if all(isinstance(d, int) for d in lead) else -1
    x2 = xp.reshape(xw, (n, n_in))
    g2 = xp.reshape(gw, (n, n_out))
    dW = xp.matmul(xp.matrix_transpose(x2), g2)
    db = xp.sum(g2, axis=0)
    dx = None if dx is None else astype(xp, dx, out_dtype)
    return dx, astype(xp, dW, out_dtype), astype(xp, db, out_dtype)
