"""linear and linear_vjp against float64 NumPy, PyTorch autograd and finite differences,
on every backend of the gradcore pytest plugin."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcore
from gradcore.testing import assert_close, check_vjp, no_compute

torch = pytest.importorskip("torch")

N_IN, N_OUT = 5, 3
TOL = {"float64": (1e-12, 1e-13), "float32": (1e-5, 1e-5), "float16": (2e-3, 5e-3)}


def make(lead: tuple[int, ...], seed: int = 0, n_in: int = N_IN, n_out: int = N_OUT):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_in))
    W = rng.standard_normal((n_in, n_out))
    b = rng.standard_normal(n_out)
    g = rng.standard_normal((*lead, n_out))
    return x, W, b, g


def torch_reference(x, W, b, g):
    """y, dx, dW, db by PyTorch autograd in float64."""
    xt, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, W, b))
    yt = xt @ Wt + bt
    yt.backward(torch.tensor(g))
    return yt.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), bt.grad.numpy()


LEADS = [(), (4,), (2, 3), (2, 1, 3)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_forward_matches_numpy(backend, xp, lead, dtype):
    x_np, W_np, b_np, _ = make(lead)
    x, W, b = (backend.asarray(a.astype(dtype)) for a in (x_np, W_np, b_np))
    with no_compute():
        y = gradcore.linear(x, W, b)
        y0 = gradcore.linear(x, W)
    rtol, atol = TOL[dtype]
    assert_close(
        y, backend.asarray((x_np @ W_np + b_np).astype(dtype)), rtol=rtol, atol=atol, xp=xp
    )
    assert_close(y0, backend.asarray((x_np @ W_np).astype(dtype)), rtol=rtol, atol=atol, xp=xp)
    np.testing.assert_array_equal(backend.to_numpy(x), x_np.astype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_vjp_matches_torch_autograd(backend, xp, lead, dtype):
    x_np, W_np, b_np, g_np = make(lead, seed=1)
    _, dx_ref, dW_ref, db_ref = torch_reference(x_np, W_np, b_np, g_np)
    g, x, W = (backend.asarray(a.astype(dtype)) for a in (g_np, x_np, W_np))
    with no_compute():
        dx, dW, db = gradcore.linear_vjp(g, x, W)
    rtol, atol = TOL[dtype]
    for got, ref in ((dx, dx_ref), (dW, dW_ref), (db, db_ref)):
        assert_close(got, backend.asarray(ref.astype(dtype)), rtol=rtol, atol=atol, xp=xp)


def test_float16_kept_and_accumulated_in_float32(backend, xp):
    # 5000 ones sum to 5000, exact in float16, but a float16 running sum stalls at
    # 2048: the kernel must accumulate wider whatever the backend's own matmul does.
    n = 5000
    ones = np.ones((1, n), dtype=np.float16)
    try:
        x = backend.asarray(ones)
    except (TypeError, ValueError):
        pytest.skip(f"{backend.name} has no float16")
    W = backend.asarray(np.ones((n, 2), dtype=np.float16))
    b = backend.asarray(np.full(2, 0.5, dtype=np.float16))
    g = backend.asarray(np.ones((n, 1), dtype=np.float16))
    xc = backend.asarray(np.ones((n, 1), dtype=np.float16))
    Wc = backend.asarray(np.ones((1, 1), dtype=np.float16))
    with no_compute():
        y = gradcore.linear(x, W, b)
        dx, dW, db = gradcore.linear_vjp(g, xc, Wc)
    assert_close(y, backend.asarray(np.full((1, 2), n + 0.5, dtype=np.float16)), xp=xp)
    assert_close(dx, backend.asarray(np.ones((n, 1), dtype=np.float16)), xp=xp)
    assert_close(dW, backend.asarray(np.full((1, 1), n, dtype=np.float16)), xp=xp)
    assert_close(db, backend.asarray(np.full(1, n, dtype=np.float16)), xp=xp)


def test_float16_random_values(backend, xp):
    x_np, W_np, b_np, g_np = make((6,), seed=2)
    x_np, W_np, b_np, g_np = (a.astype(np.float16) for a in (x_np, W_np, b_np, g_np))
    try:
        x, W, b, g = (backend.asarray(a) for a in (x_np, W_np, b_np, g_np))
    except (TypeError, ValueError):
        pytest.skip(f"{backend.name} has no float16")
    refs = torch_reference(*(a.astype(np.float64) for a in (x_np, W_np, b_np, g_np)))
    with no_compute():
        y = gradcore.linear(x, W, b)
        grads = gradcore.linear_vjp(g, x, W)
    rtol, atol = TOL["float16"]
    for got, ref in zip((y, *grads), refs, strict=True):
        assert_close(got, backend.asarray(ref.astype(np.float16)), rtol=rtol, atol=atol, xp=xp)


def test_empty_batch(backend, xp):
    x_np, W_np, b_np, g_np = make((0,))
    x, W, b, g = (backend.asarray(a) for a in (x_np, W_np, b_np, g_np))
    y = gradcore.linear(x, W, b)
    dx, dW, db = gradcore.linear_vjp(g, x, W)
    assert_close(y, backend.asarray(np.zeros((0, N_OUT))), xp=xp)
    assert_close(dx, backend.asarray(np.zeros((0, N_IN))), xp=xp)
    assert_close(dW, backend.asarray(np.zeros((N_IN, N_OUT))), xp=xp)
    assert_close(db, backend.asarray(np.zeros(N_OUT)), xp=xp)


def test_mixed_float_dtypes_promote():
    x_np, W_np, b_np, g_np = make((3,))
    y = gradcore.linear(x_np.astype(np.float32), W_np, b_np.astype(np.float32))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, x_np.astype(np.float32) @ W_np + b_np.astype(np.float32))
    dx, dW, db = gradcore.linear_vjp(g_np.astype(np.float32), x_np.astype(np.float32), W_np)
    assert dx.dtype == dW.dtype == db.dtype == np.float64


@pytest.mark.parametrize("argnum", [0, 1, 2])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)], ids=str)
def test_vjp_finite_differences(lead, argnum):
    x, W, b, _ = make(lead, seed=3)
    check_vjp(
        lambda x, W, b: gradcore.linear(x, W, b),
        lambda v, x, W, b: gradcore.linear_vjp(v, x, W),
        x,
        W,
        b,
        argnum=argnum,
    )


def test_check_vjp_would_catch_an_unsummed_bias_gradient():
    x, W, b, _ = make((4,), seed=4)
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(
            lambda x, W, b: gradcore.linear(x, W, b),
            lambda v, x, W, b: (None, None, v[0]),
            x,
            W,
            b,
            argnum=2,
        )


def test_bias_accepted_by_keyword():
    x, W, b, _ = make((2,))
    np.testing.assert_allclose(gradcore.linear(x, W, b=b), x @ W + b, rtol=1e-14)


# --- laziness and tracing ----------------------------------------------------------------


def test_dask_stays_lazy_with_chunked_batch_and_features():
    da = pytest.importorskip("dask.array")
    x_np, W_np, b_np, g_np = make((6, 4), seed=5, n_in=8, n_out=6)
    x = da.from_array(x_np, chunks=(2, 2, 3))
    W = da.from_array(W_np, chunks=(3, 4))
    b = da.from_array(b_np, chunks=4)
    g = da.from_array(g_np, chunks=(3, 4, 2))
    with no_compute():
        y = gradcore.linear(x, W, b)
        dx, dW, db = gradcore.linear_vjp(g, x, W)
    refs = torch_reference(x_np, W_np, b_np, g_np)
    for got, ref in zip((y, dx, dW, db), refs, strict=True):
        assert isinstance(got, da.Array)
        np.testing.assert_allclose(got.compute(), ref, rtol=1e-12, atol=1e-13)


def test_jax_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x_np, W_np, b_np, g_np = make((2, 3), seed=6)

    @jax.jit
    def step(x, W, b, g):
        return (gradcore.linear(x, W, b), *gradcore.linear_vjp(g, x, W))

    got = step(*(jnp.asarray(a) for a in (x_np, W_np, b_np, g_np)))
    for out, ref in zip(got, torch_reference(x_np, W_np, b_np, g_np), strict=True):
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-13)


# --- property test over batch shapes -----------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple),
    n_in=st.integers(1, 4),
    n_out=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_batch_shape(lead, n_in, n_out, seed):
    x, W, b, g = make(lead, seed=seed, n_in=n_in, n_out=n_out)
    y = gradcore.linear(x, W, b)
    assert y.shape == (*lead, n_out)
    np.testing.assert_allclose(y, np.einsum("...i,ij->...j", x, W) + b, rtol=1e-12, atol=1e-13)
    dx, dW, db = gradcore.linear_vjp(g, x, W)
    batch = tuple(range(len(lead)))
    np.testing.assert_allclose(dx, np.einsum("...j,ij->...i", g, W), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        dW, np.tensordot(x, g, axes=(batch, batch)).reshape(n_in, n_out), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(db, g.sum(axis=batch), rtol=1e-12, atol=1e-13)


# --- bad inputs --------------------------------------------------------------------------


def test_forward_errors(backend):
    x_np, W_np, b_np, _ = make((4,))
    x, W = backend.asarray(x_np), backend.asarray(W_np)
    with pytest.raises(ValueError, match=r"W must be 2-D"):
        gradcore.linear(x, backend.asarray(W_np[:, 0]))
    with pytest.raises(ValueError, match=r"x's last dimension \(5\) must match W's first \(4\)"):
        gradcore.linear(x, backend.asarray(W_np[:4]))
    with pytest.raises(ValueError, match=r"b must have shape \(out,\) = \(3,\)"):
        gradcore.linear(x, W, backend.asarray(b_np[:2]))
    with pytest.raises(ValueError, match=r"b must have shape"):
        gradcore.linear(x, W, backend.asarray(b_np[None, :]))
    with pytest.raises(TypeError, match=r"\bx\b.*floating"):
        gradcore.linear(backend.asarray(np.ones((4, N_IN), dtype=np.int64)), W)
    with pytest.raises(TypeError, match=r"\bW\b.*floating"):
        gradcore.linear(x, backend.asarray(np.ones((N_IN, N_OUT), dtype=np.int32)))
    with pytest.raises(TypeError, match=r"\bb\b.*floating"):
        gradcore.linear(x, W, backend.asarray(np.ones(N_OUT, dtype=bool)))


def test_vjp_errors():
    x, W, _, g = make((4,))
    with pytest.raises(ValueError, match=r"g must have shape x.shape\[:-1\] \+ \(out,\)"):
        gradcore.linear_vjp(g[:3], x, W)
    with pytest.raises(ValueError, match=r"g must have shape"):
        gradcore.linear_vjp(g[:, :2], x, W)
    with pytest.raises(ValueError, match=r"W must be 2-D"):
        gradcore.linear_vjp(g, x, W[None])
    with pytest.raises(ValueError, match=r"x's last dimension"):
        gradcore.linear_vjp(g, x[:, :4], W)
    with pytest.raises(TypeError, match=r"\bg\b.*floating"):
        gradcore.linear_vjp(g.astype(np.int64), x, W)
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
        gradcore.linear_vjp(g[0, :1], np.asarray(1.0), W[:1, :1])


def test_public_names():
    # gradcore.linear is the function; the module is reached through importlib.
    module = importlib.import_module("gradcore.linear")
    assert sorted(module.__all__) == ["linear", "linear_vjp"]
    assert gradcore.linear is module.linear
    assert gradcore.linear_vjp is module.linear_vjp


def test_linear_vjp_can_skip_the_input_gradient(backend):
    rng = np.random.default_rng(42)
    x = rng.standard_normal((2, 3, 4))
    W = rng.standard_normal((4, 5))
    g = rng.standard_normal((2, 3, 5))
    dx, dW, db = gradcore.linear_vjp(
        backend.asarray(g), backend.asarray(x), backend.asarray(W), need_dx=False
    )
    assert dx is None
    assert_close(dW, backend.asarray(x.reshape(6, 4).T @ g.reshape(6, 5)))
    assert_close(db, backend.asarray(g.reshape(6, 5).sum(axis=0)))


# --- non-array arguments are refused by name ----------------------------------------------


@pytest.mark.parametrize("bad", [None, 2.0, 3, [1.0, 2.0], "ab"], ids=repr)
def test_non_array_arguments_name_the_argument(bad):
    x, W, b = np.ones((4, 3)), np.ones((3, 2)), np.ones(2)
    g = np.ones((4, 2))
    cases = [
        ("x", lambda: gradcore.linear(bad, W, b)),
        ("W", lambda: gradcore.linear(x, bad, b)),
        ("g", lambda: gradcore.linear_vjp(bad, x, W)),
        ("x", lambda: gradcore.linear_vjp(g, bad, W)),
        ("W", lambda: gradcore.linear_vjp(g, x, bad)),
    ]
    if bad is not None:  # b=None means "no bias"
        cases += [
            ("b", lambda: gradcore.linear(x, W, bad)),
            ("b", lambda: gradcore.linear(x, W, b=bad)),
        ]
    for name, call in cases:
        with pytest.raises(TypeError, match=rf"^{name} must be an array"):
            call()
