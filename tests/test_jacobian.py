"""Explicit Jacobians, the chain rule and gradient checking, on every backend.

References are float64 NumPy formulas written out here, and central finite differences;
the kernels' gradients are compared with the explicit chain of closed-form Jacobians,
which are themselves compared with finite differences.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcore as gc
from gradcore import (
    activation_jacobian,
    binary_cross_entropy_jacobian,
    chain,
    check_grad,
    cross_entropy_jacobian,
    jacobian,
    linear_jacobians,
    log_softmax_jacobian,
    mean_jacobian,
    softmax_jacobian,
    squared_error_jacobian,
    to_numpy,
)
from gradcore.testing import assert_close, no_compute

ROOT = Path(__file__).resolve().parent.parent

# Finite differences in float64 are good to about 1e-9 on these small, smooth cases.
FD_TOL = {"rtol": 1e-6, "atol": 1e-8}


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _away_from_zero(a: np.ndarray, margin: float = 0.1) -> np.ndarray:
    # Keep relu/leaky_relu inputs off their kink, where finite differences straddle it.
    return np.where(np.abs(a) < margin, np.sign(a + 1e-300) * margin + a, a)


def _np_softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def _np_gelu_derivative(a: np.ndarray) -> np.ndarray:
    c, k = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(c * (a + k * a**3))
    return 0.5 * (1 + t) + 0.5 * a * (1 - t**2) * c * (1 + 3 * k * a**2)


def _flat(xp: Any, a: Any) -> Any:
    return xp.reshape(a, (-1,))


# --- the four shape cases ---------------------------------------------------------------


def test_four_cases_shapes_and_values(backend: Any, xp: Any) -> None:
    rng = _rng(1)
    t = backend.asarray(np.asarray(1.5))
    c_np = rng.standard_normal(3)
    v_np = rng.standard_normal(4)
    A_np = rng.standard_normal((3, 4))
    c, v, A = backend.asarray(c_np), backend.asarray(v_np), backend.asarray(A_np)

    # scalar by scalar: ()
    j = jacobian(lambda s: s * s, t)
    assert tuple(j.shape) == ()
    assert_close(j, np.asarray(3.0), xp=xp, **FD_TOL)
    # vector by scalar: a column (m,)
    j = jacobian(lambda s: c * s, t)
    assert tuple(j.shape) == (3,)
    assert_close(j, c_np, xp=xp, **FD_TOL)
    # scalar by vector: a row (n,), the gradient
    j = jacobian(lambda u: xp.sum(u * u), v)
    assert tuple(j.shape) == (4,)
    assert_close(j, 2 * v_np, xp=xp, **FD_TOL)
    # vector by vector: (m, n)
    j = jacobian(lambda u: xp.matmul(A, u), v)
    assert tuple(j.shape) == (3, 4)
    assert_close(j, A_np, xp=xp, **FD_TOL)
    # the same four by VJP
    assert tuple(jacobian(lambda s: s * s, t, vjp=lambda g: 2 * t * g).shape) == ()
    j = jacobian(lambda s: c * s, t, vjp=lambda g: xp.sum(g * c))
    assert_close(j, c_np, xp=xp)
    j = jacobian(lambda u: xp.sum(u * u), v, vjp=lambda g: 2 * g * v)
    assert_close(j, 2 * v_np, xp=xp)
    j = jacobian(lambda u: xp.matmul(A, u), v, vjp=lambda g: xp.matmul(g, A))
    assert_close(j, A_np, xp=xp)


def test_tensor_shapes_follow_numerator_layout(backend: Any, xp: Any) -> None:
    rng = _rng(2)
    B_np = rng.standard_normal((2, 3, 4))
    x_np = rng.standard_normal(4)
    B, x = backend.asarray(B_np), backend.asarray(x_np)
    j = jacobian(lambda u: xp.sum(B * u, axis=-1), x)  # (2, 3) by (4,)
    assert tuple(j.shape) == (2, 3, 4)
    assert_close(j, B_np, xp=xp, **FD_TOL)
    X_np = rng.standard_normal((2, 2))
    j = jacobian(lambda u: xp.sum(u * u), backend.asarray(X_np))  # scalar by (2, 2)
    assert_close(j, 2 * X_np, xp=xp, **FD_TOL)


def test_batched_vjp(backend: Any, xp: Any) -> None:
    x_np = np.array([0.5, -1.0, 2.0])
    x = backend.asarray(x_np)
    d = 3 * x * x
    j = jacobian(lambda u: u * u * u, x, vjp=lambda G: G * d, batched=True)
    assert_close(j, np.diag(3 * x_np**2), xp=xp)
    with pytest.raises(ValueError, match="batched vjp"):
        jacobian(lambda u: u * u * u, x, vjp=lambda G: xp.sum(G, axis=0), batched=True)


# --- chain ------------------------------------------------------------------------------


def test_chain_orders_and_shapes(backend: Any, xp: Any) -> None:
    rng = _rng(3)
    row_np, M_np, K_np, col_np = (
        rng.standard_normal(4),
        rng.standard_normal((4, 3)),
        rng.standard_normal((3, 5)),
        rng.standard_normal(5),
    )
    row, M, K, col = (backend.asarray(a) for a in (row_np, M_np, K_np, col_np))
    # row . matrix . matrix . column: scalar by scalar
    out = chain(row, M, K, col)
    assert tuple(out.shape) == ()
    assert_close(out, np.asarray(row_np @ M_np @ K_np @ col_np), xp=xp)
    # row . matrix: a row (the gradient of a scalar)
    assert_close(chain(row, M), row_np @ M_np, xp=xp)
    # matrix . column: a column
    assert_close(chain(M, K, col), M_np @ K_np @ col_np, xp=xp)
    # matrix . matrix
    assert_close(chain(M, K), M_np @ K_np, xp=xp)
    # 0-d factors scale; a 1-D after a scalar-input product is a row
    s = backend.asarray(np.asarray(2.0))
    assert_close(chain(s, backend.asarray(col_np)), 2 * col_np, xp=xp)
    # an outer product through a scalar, with explicit 2-D factors
    out = chain(backend.asarray(row_np[:, None]), backend.asarray(col_np[None, :]))
    assert_close(out, np.outer(row_np, col_np), xp=xp)
    # one factor is itself
    assert_close(chain(M), M_np, xp=xp)


def test_chain_mismatch_names_the_pair(backend: Any) -> None:
    a = backend.asarray(np.ones(4))
    M = backend.asarray(np.ones((4, 3)))
    K = backend.asarray(np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Jacobians 2 and 3 do not fit") as info:
        chain(a, M, K)
    assert "(4, 3)" in str(info.value)
    assert "(2, 5)" in str(info.value)
    with pytest.raises(ValueError, match=r"Jacobians 1 and 2 do not fit"):
        chain(backend.asarray(np.ones(3)), M)
    with pytest.raises(ValueError, match=r"Jacobian 2 has shape \(2, 2, 2\)"):
        chain(a, backend.asarray(np.ones((2, 2, 2))))
    with pytest.raises(ValueError, match="at least one"):
        chain()


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 4),
    k=st.integers(1, 4),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_chain_of_jacobians_is_jacobian_of_composition(m: int, k: int, n: int, seed: int) -> None:
    rng = _rng(seed)
    A, B = rng.standard_normal((k, n)), rng.standard_normal((m, k))
    x = rng.standard_normal(n)

    def inner(u: np.ndarray) -> np.ndarray:
        return np.tanh(A @ u)

    def outer(z: np.ndarray) -> np.ndarray:
        return B @ (z * z)

    whole = jacobian(lambda u: outer(inner(u)), x)
    parts = chain(jacobian(outer, inner(x)), jacobian(inner, x))
    np.testing.assert_allclose(parts, whole, rtol=1e-6, atol=1e-8)


# --- refusals and argument errors ---------------------------------------------------------


def test_jacobian_refuses_oversize_without_working(backend: Any, xp: Any) -> None:
    calls = []

    def f(u: Any) -> Any:
        calls.append(1)
        return u

    x = backend.asarray(np.zeros(20_000))  # identity: 4e8 entries > 1e8
    with pytest.raises(ValueError, match=r"max_elements=100000000") as info:
        jacobian(f, x)
    assert "20000 x 20000" in str(info.value)
    assert len(calls) == 1  # only the one evaluation that tells the output shape
    small = backend.asarray(np.arange(10.0))
    with pytest.raises(ValueError, match="max_elements=99"):
        jacobian(f, small, max_elements=99)
    assert tuple(jacobian(f, small, max_elements=100).shape) == (10, 10)

    # a batched VJP also needs the (m, m) basis of cotangents: 20 x 10 fits, 20 x 20 not
    def twice(u: Any) -> Any:
        return xp.concat([u, u])

    assert tuple(jacobian(twice, small, max_elements=200).shape) == (20, 10)
    with pytest.raises(ValueError, match="batched basis 20 x 20"):
        jacobian(twice, small, vjp=lambda G: G[:, :10], batched=True, max_elements=300)
    assert gc.jacobian is jacobian


def test_empty_input_gives_empty_jacobian(backend: Any, xp: Any) -> None:
    x = backend.asarray(np.zeros((0,)))
    j = jacobian(lambda u: xp.stack([xp.sum(u), xp.sum(u)]), x)
    assert tuple(j.shape) == (2, 0)


def test_mean_jacobian_of_no_values_and_of_integer_values(backend: Any, xp: Any) -> None:
    j = mean_jacobian(backend.asarray(np.zeros((0,))))
    assert tuple(j.shape) == (0,)
    j = mean_jacobian(backend.asarray(np.arange(4)))
    assert_close(j, np.full(4, 0.25), xp=xp)


def test_masked_class_chain_equals_the_kernel(backend: Any, xp: Any) -> None:
    # A class with a -inf logit has probability 0 and (one-hot) target 0: its entry of
    # -y/ŷ is 0 (0 log 0 = 0), so the chain stays finite and matches the fused kernel.
    L_np = np.array([[0.3, -np.inf, 1.2], [-0.5, 0.7, 0.1]])
    labels = np.array([2, 0])
    P_np = np.exp(L_np - L_np.max(axis=1, keepdims=True))
    P_np /= P_np.sum(axis=1, keepdims=True)
    Y_np = np.eye(3)[labels]
    P, Y = backend.asarray(P_np), backend.asarray(Y_np)
    dJ0_dP = cross_entropy_jacobian(P, Y)
    assert_close(dJ0_dP[0, 1], np.asarray(0.0), xp=xp)
    dJ_dL = xp.reshape(
        chain(mean_jacobian(backend.asarray(np.zeros(2))), dJ0_dP, softmax_jacobian(P)), (2, 3)
    )
    assert_close(dJ_dL, -(Y_np - P_np) / 2, xp=xp, rtol=1e-12, atol=1e-15)
    _, grad = gc.softmax_cross_entropy(backend.asarray(L_np), backend.asarray(labels))
    assert_close(grad, dJ_dL, rtol=1e-12, atol=1e-15)


def test_argument_errors(backend: Any, xp: Any) -> None:
    x = backend.asarray(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="shaped like x"):
        jacobian(lambda u: u, x, vjp=lambda g: xp.sum(g))
    with pytest.raises(TypeError, match="tuple"):
        jacobian(lambda u: (u, u), x)
    with pytest.raises(TypeError, match="floating"):
        jacobian(lambda u: u, backend.asarray(np.array([1, 2])))
    with pytest.raises(ValueError, match="scalar function"):
        check_grad(lambda u: u, x, x)
    with pytest.raises(ValueError, match="shape of x"):
        check_grad(lambda u: xp.sum(u), x, backend.asarray(np.ones(3)))
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_jacobian(x, activation="softmax")
    with pytest.raises(ValueError, match="same shape"):
        squared_error_jacobian(x, backend.asarray(np.ones(3)))


def test_jacobian_stays_lazy_on_dask() -> None:
    pytest.importorskip("dask.array")
    b = gc.backend("dask")
    x = b.asarray(np.array([1.0, 2.0, 3.0]))
    with no_compute():
        j = jacobian(lambda u: u * u, x)
        j_vjp = jacobian(lambda u: u * u, x, vjp=lambda g: 2 * x * g)
        c = chain(gc.mean_jacobian(x), j)
    np.testing.assert_allclose(to_numpy(j), np.diag([2.0, 4.0, 6.0]), rtol=1e-9)
    np.testing.assert_allclose(to_numpy(j_vjp), np.diag([2.0, 4.0, 6.0]))
    np.testing.assert_allclose(to_numpy(c), [2 / 3, 4 / 3, 2.0], rtol=1e-9)


# --- the kernels: explicit chain == kernel gradient == NumPy formula ----------------------


def test_linear_regression_lecture(backend: Any, xp: Any) -> None:
    """ŷ = wx + b, J = mean (y - ŷ)²: the chain of four Jacobians is the lecture's formula."""
    rng = _rng(4)
    N = 6
    x_np, y_np = rng.standard_normal(N), rng.standard_normal(N)
    w_np, b_np = np.array([[0.7]]), np.array([-0.3])
    X, W, b, y = (backend.asarray(a) for a in (x_np[:, None], w_np, b_np, y_np[:, None]))
    yhat = gc.linear(X, W, b)
    _, dy_dW, dy_db = linear_jacobians(X, W)
    dJ_dJ0 = mean_jacobian(yhat)
    dJ0_dyhat = squared_error_jacobian(yhat, y)
    dJ_dw = chain(dJ_dJ0, dJ0_dyhat, dy_dW)
    dJ_db = chain(dJ_dJ0, dJ0_dyhat, dy_db)
    yhat_np = w_np[0, 0] * x_np + b_np[0]
    assert_close(dJ_dw, np.array([-(2 / N) * np.sum(x_np * (y_np - yhat_np))]), xp=xp)
    assert_close(dJ_db, np.array([-(2 / N) * np.sum(y_np - yhat_np)]), xp=xp)
    # the fused kernels give the same numbers without any N x N matrix
    _, g = gc.mse(yhat, y)
    _, gW, gb = gc.linear_vjp(g, X, W)
    assert_close(gW, xp.reshape(dJ_dw, (1, 1)), rtol=1e-12)
    assert_close(gb, dJ_db, rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 1), (2, 3)])
def test_mse_chain(backend: Any, xp: Any, shape: tuple[int, ...]) -> None:
    rng = _rng(5)
    p_np, t_np = rng.standard_normal(shape), rng.standard_normal(shape)
    p, t = backend.asarray(p_np), backend.asarray(t_np)
    explicit = chain(mean_jacobian(p), squared_error_jacobian(p, t))
    reference = -2.0 / p_np.size * (t_np - p_np)
    assert_close(explicit, reference.ravel(), xp=xp)
    _, grad = gc.mse(p, t)
    assert_close(grad, xp.reshape(explicit, shape), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft"])
def test_softmax_regression_lecture(backend: Any, xp: Any, soft: bool) -> None:
    """Chain through the softmax Jacobian: ∂J/∂L = -(1/N)(Y - Ŷ)."""
    rng = _rng(6)
    N, K = 2, 4  # the shapes of the other softmax tests (JAX compiles once per shape)
    L_np = rng.standard_normal((N, K))
    labels = np.array([3, 1])
    Y_np = _np_softmax(rng.standard_normal((N, K))) if soft else np.eye(K)[labels]
    P_np = _np_softmax(L_np)
    L, P, Y = backend.asarray(L_np), backend.asarray(P_np), backend.asarray(Y_np)
    dJ_dJ0 = mean_jacobian(backend.asarray(np.zeros(N)))  # (N,)
    dJ0_dP = cross_entropy_jacobian(P, Y)  # (N, N*K)
    dP_dL = softmax_jacobian(P)  # (N*K, N*K)
    assert tuple(dJ0_dP.shape) == (N, N * K)
    assert tuple(dP_dL.shape) == (N * K, N * K)
    dJ_dL = xp.reshape(chain(dJ_dJ0, dJ0_dP, dP_dL), (N, K))
    assert_close(dJ_dL, -(Y_np - P_np) / N, xp=xp, rtol=1e-12, atol=1e-15)
    target = Y if soft else backend.asarray(labels)
    loss, grad = gc.softmax_cross_entropy(L, target)
    assert_close(grad, dJ_dL, rtol=1e-12, atol=1e-15)
    assert_close(loss, np.asarray(-np.mean(np.sum(Y_np * np.log(P_np), axis=1))), rtol=1e-12)


def test_bce_with_logits_chain(backend: Any, xp: Any) -> None:
    rng = _rng(7)
    z_np, t_np = rng.standard_normal((2, 3)), rng.uniform(size=(2, 3))
    p_np = _np_sigmoid(z_np)
    z, t, p = backend.asarray(z_np), backend.asarray(t_np), backend.asarray(p_np)
    explicit = chain(
        mean_jacobian(z),
        binary_cross_entropy_jacobian(p, t),
        activation_jacobian(z, activation="sigmoid"),
    )
    assert_close(explicit, ((p_np - t_np) / 6).ravel(), xp=xp, rtol=1e-12, atol=1e-15)
    _, grad = gc.binary_cross_entropy_with_logits(z, t)
    assert_close(grad, xp.reshape(explicit, (2, 3)), rtol=1e-12, atol=1e-15)


def test_linear_chain(backend: Any, xp: Any) -> None:
    rng = _rng(8)
    x_np, W_np, g_np = (
        rng.standard_normal((2, 3)),
        rng.standard_normal((3, 2)),
        rng.standard_normal((2, 2)),
    )
    x, W, g = backend.asarray(x_np), backend.asarray(W_np), backend.asarray(g_np)
    dy_dx, dy_dW, dy_db = linear_jacobians(x, W)
    assert tuple(dy_dx.shape) == (4, 6)
    assert tuple(dy_dW.shape) == (4, 6)
    assert tuple(dy_db.shape) == (4, 2)
    gx = xp.reshape(chain(_flat(xp, g), dy_dx), (2, 3))
    gW = xp.reshape(chain(_flat(xp, g), dy_dW), (3, 2))
    gb = chain(_flat(xp, g), dy_db)
    assert_close(gx, g_np @ W_np.T, xp=xp)
    assert_close(gW, x_np.T @ g_np, xp=xp)
    assert_close(gb, g_np.sum(axis=0), xp=xp)
    kx, kW, kb = gc.linear_vjp(g, x, W)
    assert_close(kx, gx, rtol=1e-12)
    assert_close(kW, gW, rtol=1e-12)
    assert_close(kb, gb, rtol=1e-12)


ELEMENTWISE: dict[str, tuple[Callable[..., Any], Callable[..., Any], bool, Any]] = {
    # name: (forward, vjp, vjp takes the output?, NumPy derivative)
    "relu": (gc.relu, gc.relu_vjp, True, lambda a: (a > 0).astype(float)),
    "leaky_relu": (gc.leaky_relu, gc.leaky_relu_vjp, True, lambda a: np.where(a > 0, 1.0, 0.01)),
    "sigmoid": (
        gc.sigmoid,
        gc.sigmoid_vjp,
        True,
        lambda a: _np_sigmoid(a) * (1 - _np_sigmoid(a)),
    ),
    "tanh": (gc.tanh, gc.tanh_vjp, True, lambda a: 1 - np.tanh(a) ** 2),
    "gelu": (gc.gelu, gc.gelu_vjp, False, _np_gelu_derivative),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_activation_chain(backend: Any, xp: Any, name: str) -> None:
    forward, vjp, takes_output, derivative = ELEMENTWISE[name]
    rng = _rng(9)
    x_np = _away_from_zero(rng.standard_normal((2, 3)) * 2)
    g_np = rng.standard_normal((2, 3))
    x, g = backend.asarray(x_np), backend.asarray(g_np)
    J = activation_jacobian(x, activation=name)
    assert_close(J, np.diag(derivative(x_np).ravel()), xp=xp, rtol=1e-12, atol=1e-15)
    explicit = xp.reshape(chain(_flat(xp, g), J), (2, 3))
    kernel = vjp(g, forward(x) if takes_output else x)
    assert_close(kernel, explicit, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_activation_chain(backend: Any, xp: Any, name: str) -> None:
    rng = _rng(10)
    x_np, g_np = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    x, g = backend.asarray(x_np), backend.asarray(g_np)
    P_np = _np_softmax(x_np)
    if name == "softmax":
        y = gc.softmax(x)
        J = softmax_jacobian(backend.asarray(P_np))
        blocks = [np.diag(p) - np.outer(p, p) for p in P_np]
        kernel = gc.softmax_vjp(g, y)
    else:
        y = gc.log_softmax(x)
        J = log_softmax_jacobian(backend.asarray(np.log(P_np)))
        blocks = [np.eye(4) - np.outer(np.ones(4), p) for p in P_np]
        kernel = gc.log_softmax_vjp(g, y)
    reference = np.zeros((8, 8))
    reference[:4, :4], reference[4:, 4:] = blocks
    assert_close(J, reference, xp=xp, rtol=1e-12, atol=1e-15)
    explicit = xp.reshape(chain(_flat(xp, g), J), (2, 4))
    assert_close(kernel, explicit, rtol=1e-12, atol=1e-15)


# --- every kernel: jacobian by VJP == by finite differences == closed form ----------------


def _kernel_case(
    name: str, backend: Any
) -> tuple[Any, Callable[..., Any], Callable[..., Any], Any]:
    """(x, f, vjp, closed-form Jacobian or None) for one kernel, in float64."""
    rng = _rng(11)
    xp = backend.xp
    if name in ELEMENTWISE:
        forward, vjp, takes_output, _ = ELEMENTWISE[name]
        x = backend.asarray(_away_from_zero(rng.standard_normal((2, 3)) * 2))
        saved = forward(x) if takes_output else x
        closed = activation_jacobian(x, activation=name)
        return x, forward, lambda g: vjp(g, saved), closed
    if name in ("softmax", "log_softmax"):
        x = backend.asarray(rng.standard_normal((2, 4)))
        fwd = gc.softmax if name == "softmax" else gc.log_softmax
        bwd = gc.softmax_vjp if name == "softmax" else gc.log_softmax_vjp
        y = fwd(x)
        closed = softmax_jacobian(y) if name == "softmax" else log_softmax_jacobian(y)
        return x, fwd, lambda g: bwd(g, y), closed
    if name == "mse":
        p = backend.asarray(rng.standard_normal((2, 3)))
        t = backend.asarray(rng.standard_normal((2, 3)))
        _, grad = gc.mse(p, t)
        closed = chain(mean_jacobian(p), squared_error_jacobian(p, t))
        return p, lambda u: gc.mse(u, t)[0], lambda v: v * grad, closed
    if name == "softmax_cross_entropy":
        L = backend.asarray(rng.standard_normal((2, 4)))
        labels = backend.asarray(np.array([1, 3]))
        _, grad = gc.softmax_cross_entropy(L, labels)
        P = gc.softmax(L)
        Y = backend.asarray(np.eye(4)[[1, 3]])
        closed = xp.reshape(
            chain(mean_jacobian(labels), cross_entropy_jacobian(P, Y), softmax_jacobian(P)),
            (2, 4),
        )
        return L, lambda u: gc.softmax_cross_entropy(u, labels)[0], lambda v: v * grad, closed
    if name == "binary_cross_entropy_with_logits":
        z = backend.asarray(rng.standard_normal((2, 3)))
        t = backend.asarray(rng.uniform(size=(2, 3)))
        _, grad = gc.binary_cross_entropy_with_logits(z, t)
        closed = chain(
            mean_jacobian(z),
            binary_cross_entropy_jacobian(gc.sigmoid(z), t),
            activation_jacobian(z, activation="sigmoid"),
        )
        return (
            z,
            lambda u: gc.binary_cross_entropy_with_logits(u, t)[0],
            lambda v: v * grad,
            closed,
        )
    x = backend.asarray(rng.standard_normal((2, 3)))
    W = backend.asarray(rng.standard_normal((3, 2)))
    b = backend.asarray(rng.standard_normal(2))
    dy_dx, dy_dW, dy_db = linear_jacobians(x, W)
    if name == "linear_x":
        return x, lambda u: gc.linear(u, W, b), lambda g: gc.linear_vjp(g, x, W)[0], dy_dx
    if name == "linear_W":
        return W, lambda u: gc.linear(x, u, b), lambda g: gc.linear_vjp(g, x, W)[1], dy_dW
    assert name == "linear_b"
    return b, lambda u: gc.linear(x, W, u), lambda g: gc.linear_vjp(g, x, W)[2], dy_db


KERNELS = [
    "mse",
    "softmax_cross_entropy",
    "binary_cross_entropy_with_logits",
    "linear_x",
    "linear_W",
    "linear_b",
    *ELEMENTWISE,
    "softmax",
    "log_softmax",
]


@pytest.mark.parametrize("name", KERNELS)
def test_jacobian_by_vjp_equals_finite_differences(backend: Any, xp: Any, name: str) -> None:
    x, f, vjp, closed = _kernel_case(name, backend)
    by_vjp = jacobian(f, x, vjp=vjp)
    by_fd = jacobian(f, x)
    out_shape = tuple(f(x).shape)
    assert tuple(by_vjp.shape) == out_shape + tuple(x.shape)
    assert tuple(by_fd.shape) == out_shape + tuple(x.shape)
    fd_np = to_numpy(by_fd)
    assert_close(by_vjp, fd_np, xp=xp, **FD_TOL)
    # the closed form of the collapsed pieces agrees with finite differences too
    assert_close(closed, fd_np.reshape(tuple(closed.shape)), xp=xp, **FD_TOL)


def _loss_and_grad(name: str, backend: Any) -> tuple[Any, Callable[..., Any], Any]:
    """(x, scalar f, analytic gradient) for one kernel."""
    x, f, vjp, _ = _kernel_case(name, backend)
    xp = backend.xp
    y = f(x)
    if y.ndim == 0:
        return x, f, vjp(xp.ones_like(y))
    # A non-scalar kernel is checked through <v, f(x)> for a fixed random v.
    v = backend.asarray(_rng(12).standard_normal(tuple(y.shape)))
    return x, lambda u: xp.sum(v * f(u)), vjp(v)


@pytest.mark.parametrize("name", KERNELS)
def test_check_grad_passes_and_catches_a_wrong_gradient(backend: Any, name: str) -> None:
    x, f, grad = _loss_and_grad(name, backend)
    result = check_grad(f, x, grad)
    assert result.ok
    assert result.rel_error < 1e-6
    # Perturb one element of the gradient: check_grad must fail and say where.
    grad_np = to_numpy(grad).astype(np.float64)
    index = tuple(s - 1 for s in grad_np.shape)
    wrong_np = grad_np.copy()
    wrong_np[index] += 1e-3 * (1.0 + np.abs(grad_np).max())
    wrong = backend.asarray(wrong_np)
    with pytest.raises(AssertionError) as info:
        check_grad(f, x, wrong)
    message = str(info.value)
    assert f"index {index}" in message
    assert f"analytic {float(wrong_np[index])!r}" in message
    numeric = float(message.split("numeric ", 1)[1].split(",", 1)[0])
    np.testing.assert_allclose(numeric, grad_np[index], rtol=1e-6, atol=1e-9)
    assert "relative error" in message


def test_check_grad_result_without_raising() -> None:
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    wrong = 2 * x
    wrong[0, 1] += 0.01
    result = check_grad(lambda u: np.sum(u * u), x, wrong, raise_on_failure=False)
    assert not result.ok
    assert result.worst_index == (0, 1)
    assert result.analytic_value == -3.99
    np.testing.assert_allclose(result.numeric_value, -4.0, rtol=1e-8)
    np.testing.assert_allclose(result.rel_error, 0.01 / 4.0, rtol=1e-6)
    np.testing.assert_allclose(result.numeric, 2 * x, rtol=1e-8)
    assert "does not match" in result.message()


def test_check_grad_float32_defaults(backend: Any, xp: Any) -> None:
    rng = _rng(13)
    p = backend.asarray(rng.standard_normal((2, 3)), dtype="float32")
    t = backend.asarray(rng.standard_normal((2, 3)), dtype="float32")
    _, grad = gc.mse(p, t)
    result = check_grad(lambda u: gc.mse(u, xp.astype(t, u.dtype))[0], p, grad)
    assert result.ok
    assert result.rtol == 2e-3
    # closed forms keep the dtype of their input
    assert squared_error_jacobian(p, t).dtype == xp.float32
    assert softmax_jacobian(gc.softmax(p)).dtype == xp.float32


def test_check_grad_reports_nan() -> None:
    x = np.array([1.0, 2.0])
    with pytest.raises(AssertionError, match=r"index \(1,\): analytic nan"):
        check_grad(lambda u: np.sum(u * u), x, np.array([2.0, np.nan]))


# --- the example scripts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "script", ["linear_regression_jacobians.py", "softmax_regression_jacobians.py"]
)
def test_example_runs(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "agree" in proc.stdout
    assert "DISAGREE" not in proc.stdout


def test_docs_code_blocks_run() -> None:
    """The Python snippets of docs/backprop.md run and their assertions hold."""
    import re

    text = (ROOT / "docs" / "backprop.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        exec(compile(block, f"backprop.md block {i}", "exec"), {})


# --- non-array arguments are refused by name ----------------------------------------------


@pytest.mark.parametrize("bad", [None, 2.0, [1.0, 2.0]], ids=repr)
def test_non_array_arguments_name_the_argument(bad):
    x = np.full((2, 3), 1.0 / 3.0)
    cases = [
        ("values", lambda: gc.mean_jacobian(bad)),
        ("target", lambda: gc.squared_error_jacobian(x, bad)),
        ("W", lambda: gc.linear_jacobians(x, bad)),
        ("derivative", lambda: gc.diagonal_jacobian(bad)),
        ("x", lambda: gc.activation_jacobian(bad, activation="relu")),
        ("y", lambda: gc.softmax_jacobian(bad)),
        ("probs", lambda: gc.cross_entropy_jacobian(bad, x)),
        ("chain: Jacobian 2", lambda: gc.chain(x, bad)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"^{name} must be an array"):
            call()


def test_jacobian_and_check_grad_name_non_array_points():
    with pytest.raises(TypeError, match=r"^x must be an array"):
        gc.jacobian(gc.relu, None)
    with pytest.raises(TypeError, match=r"^x must be an array"):
        gc.check_grad(lambda v: v, [1.0], np.ones(1))
    with pytest.raises(TypeError, match=r"^grad must be an array"):
        gc.check_grad(lambda v: v, np.ones(1), None)
