"""Activations and their VJPs against float64 NumPy formulas, PyTorch autograd and
finite differences, on every backend of the gradcore pytest plugin."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcore
from gradcore.testing import assert_close, check_vjp, no_compute

torch = pytest.importorskip("torch")
F = torch.nn.functional

SLOPE = 0.2
GELU_C = math.sqrt(2.0 / math.pi)

# --- independent float64 references ----------------------------------------------------


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    return np.log(np_softmax(x, axis))


NP_REF = {
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "leaky_relu": lambda x: np.where(x > 0, x, SLOPE * x),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x**3))),
    "softmax": lambda x: np_softmax(x, -1),
    "log_softmax": lambda x: np_log_softmax(x, -1),
}

TORCH_REF = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, SLOPE),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": lambda t: F.gelu(t, approximate="tanh"),
    "softmax": lambda t: F.softmax(t, dim=-1),
    "log_softmax": lambda t: F.log_softmax(t, dim=-1),
}


def forward(name: str):
    f = getattr(gradcore, name)
    if name == "leaky_relu":
        return lambda x: f(x, negative_slope=SLOPE)
    return f


def vjp(name: str):
    """The VJP as a function of (g, x, y): each kernel takes the value it documents."""
    f = getattr(gradcore, name + "_vjp")
    if name == "leaky_relu":
        return lambda g, x, y: f(g, y, negative_slope=SLOPE)
    if name == "gelu":
        return lambda g, x, y: f(g, x)
    return lambda g, x, y: f(g, y)


NAMES = list(NP_REF)
TOL = {"float64": (1e-12, 1e-14), "float32": (1e-5, 1e-6), "float16": (2e-3, 2e-3)}


def inputs(shape=(4, 6), seed=0) -> np.ndarray:
    x = 3.0 * np.random.default_rng(seed).standard_normal(shape)
    x[0, :3] = [0.0, -0.0, 1e-3]  # the kink and its neighbourhood
    return x


def torch_vjp(name: str, x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = TORCH_REF[name](xt)
    yt.backward(torch.tensor(g, dtype=torch.float64))
    return yt.detach().numpy(), xt.grad.numpy()


# --- values, dtype, library and device on every backend --------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_numpy_reference(backend, xp, name, dtype):
    x_np = inputs().astype(dtype)
    x = backend.asarray(x_np)
    with no_compute():
        y = forward(name)(x)
    rtol, atol = TOL[dtype]
    desired = backend.asarray(NP_REF[name](x_np.astype(np.float64)).astype(dtype))
    assert_close(y, desired, rtol=rtol, atol=atol, xp=xp)
    np.testing.assert_array_equal(backend.to_numpy(x), x_np)  # input untouched


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_vjp_matches_torch_autograd(backend, xp, name, dtype):
    x_np = inputs()
    g_np = np.random.default_rng(1).standard_normal(x_np.shape)
    y_ref, dx_ref = torch_vjp(name, x_np, g_np)
    x = backend.asarray(x_np.astype(dtype))
    y = backend.asarray(y_ref.astype(dtype))
    g = backend.asarray(g_np.astype(dtype))
    with no_compute():
        dx = vjp(name)(g, x, y)
    rtol, atol = TOL[dtype]
    assert_close(dx, backend.asarray(dx_ref.astype(dtype)), rtol=rtol, atol=atol, xp=xp)


@pytest.mark.parametrize("name", NAMES)
def test_float16_kept_and_accurate(backend, xp, name):
    x_np = inputs().astype(np.float16)
    g_np = np.random.default_rng(2).standard_normal(x_np.shape).astype(np.float16)
    try:
        x, g = backend.asarray(x_np), backend.asarray(g_np)
    except (TypeError, ValueError):
        pytest.skip(f"{backend.name} has no float16")
    y_ref, dx_ref = torch_vjp(name, x_np.astype(np.float64), g_np.astype(np.float64))
    with no_compute():
        y = forward(name)(x)
        dx = vjp(name)(g, x, backend.asarray(y_ref.astype(np.float16)))
    rtol, atol = TOL["float16"]
    assert_close(y, backend.asarray(y_ref.astype(np.float16)), rtol=rtol, atol=atol, xp=xp)
    # The float16 rounding of the saved output moves the derivative by about one ulp.
    assert_close(dx, backend.asarray(dx_ref.astype(np.float16)), rtol=1e-2, atol=1e-2, xp=xp)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [0, 1, -3])
def test_softmax_other_axes_match_torch(backend, xp, name, axis):
    x_np = 2.0 * np.random.default_rng(3).standard_normal((3, 4, 5))
    g_np = np.random.default_rng(4).standard_normal(x_np.shape)
    xt = torch.tensor(x_np, requires_grad=True)
    yt = getattr(F, name)(xt, dim=axis)
    yt.backward(torch.tensor(g_np))
    x, g = backend.asarray(x_np), backend.asarray(g_np)
    with no_compute():
        y = getattr(gradcore, name)(x, axis=axis)
        dx = getattr(gradcore, name + "_vjp")(g, backend.asarray(yt.detach().numpy()), axis=axis)
    assert_close(y, backend.asarray(yt.detach().numpy()), atol=1e-14, xp=xp)
    assert_close(dx, backend.asarray(xt.grad.numpy()), atol=1e-14, xp=xp)


# --- finite differences ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_vjp_finite_differences(name):
    x = inputs((3, 5), seed=5)
    x[0, :3] = [0.5, -0.5, 1.0]  # finite differences need distance from the kink
    f = forward(name)
    g = vjp(name)
    check_vjp(f, lambda v, x: g(v, x, f(x)), x)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_vjp_finite_differences_axis0(name):
    x = np.random.default_rng(6).standard_normal((4, 3, 2))
    f = getattr(gradcore, name)
    f_vjp = getattr(gradcore, name + "_vjp")
    check_vjp(lambda x: f(x, axis=0), lambda v, x: f_vjp(v, f(x, axis=0), axis=0), x)


def test_check_vjp_would_catch_a_wrong_vjp():
    x = inputs((3, 5), seed=7)
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(gradcore.sigmoid, lambda v, x: gradcore.tanh_vjp(v, gradcore.sigmoid(x)), x)


# --- kinks -------------------------------------------------------------------------------


def test_relu_subgradient_at_zero_is_zero_like_torch():
    x = np.array([-1.0, -0.0, 0.0, 2.0])
    g = np.array([3.0, 5.0, 7.0, 11.0])
    dx = gradcore.relu_vjp(g, gradcore.relu(x))
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0, 11.0])
    np.testing.assert_array_equal(dx, torch_vjp("relu", x, g)[1])


def test_leaky_relu_subgradient_at_zero_is_the_slope_like_torch():
    x = np.array([-1.0, -0.0, 0.0, 2.0])
    g = np.array([3.0, 5.0, 7.0, 11.0])
    dx = gradcore.leaky_relu_vjp(
        g, gradcore.leaky_relu(x, negative_slope=SLOPE), negative_slope=SLOPE
    )
    np.testing.assert_allclose(dx, [0.6, 1.0, 1.4, 11.0], rtol=1e-15)
    np.testing.assert_allclose(dx, torch_vjp("leaky_relu", x, g)[1], rtol=1e-15)


def test_leaky_relu_with_zero_slope_is_relu():
    x = np.array([-2.0, -0.0, 0.0, 3.0])
    g = np.ones(4)
    y = gradcore.leaky_relu(x, negative_slope=0.0)
    np.testing.assert_array_equal(y, [0.0, 0.0, 0.0, 3.0])
    np.testing.assert_array_equal(gradcore.leaky_relu_vjp(g, y, negative_slope=0.0), [0, 0, 0, 1])


def test_relu_propagates_nan_like_torch():
    y = gradcore.relu(np.array([np.nan, -1.0]))
    assert np.isnan(y[0])
    assert y[1] == 0.0


# --- numerical stability -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_sigmoid_large_inputs_do_not_overflow(dtype):
    x = np.array([-1e4, -200.0, -60.0, 60.0, 200.0, 1e4, -np.inf, np.inf]).astype(dtype)
    with np.errstate(over="raise", invalid="raise"):
        y = gradcore.sigmoid(x)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y[[0, 6]], 0.0)
    np.testing.assert_array_equal(y[[5, 7]], 1.0)
    if dtype == "float64":
        # The left tail keeps full relative accuracy: sigma(-60) = e^-60 / (1 + e^-60).
        np.testing.assert_allclose(y[2], math.exp(-60.0) / (1 + math.exp(-60.0)), rtol=1e-14)
        np.testing.assert_allclose(y[1], math.exp(-200.0), rtol=1e-14)


def test_sigmoid_large_inputs_on_every_backend(backend, xp):
    x_np = np.array([-1e4, -700.0, -30.0, 0.0, 30.0, 700.0, 1e4])
    y = gradcore.sigmoid(backend.asarray(x_np))
    ref = np.array([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    ref[1:3] = [math.exp(t) / (1.0 + math.exp(t)) for t in x_np[1:3]]
    ref[4] = 1.0 / (1.0 + math.exp(-30.0))
    assert_close(y, backend.asarray(ref), rtol=1e-14, xp=xp)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_gelu_and_vjp_stay_finite_for_large_inputs(dtype):
    big = {"float16": 6e4, "float32": 1e30, "float64": 1e300}[dtype]
    x = np.array([-big, -1e4, -50.0, 50.0, 1e4, big]).astype(dtype)
    y = gradcore.gelu(x)
    dx = gradcore.gelu_vjp(np.ones_like(x), x)
    assert y.dtype == dx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, np.where(x > 0, x, 0.0).astype(dtype))
    np.testing.assert_array_equal(dx, np.where(x > 0, 1.0, 0.0).astype(dtype))


def test_gelu_left_tail_is_relatively_accurate():
    # Forming 1 + tanh(u) would cancel to 0 here; x sigma(2u) keeps every digit.
    x = np.array([-4.0, -6.0, -8.0])
    u = GELU_C * (x + 0.044715 * x**3)
    ref = x * np.exp(2 * u) / (1 + np.exp(2 * u))
    np.testing.assert_allclose(gradcore.gelu(x), ref, rtol=1e-13)
    assert np.all(gradcore.gelu(x.astype(np.float32)) < 0)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_softmax_huge_logits(dtype):
    big = float(np.finfo(dtype).max) / 2
    x = np.array([[big, big, -big], [0.0, 1.0, 2.0]]).astype(dtype)
    y = gradcore.softmax(x)
    ly = gradcore.log_softmax(x)
    assert y.dtype == ly.dtype == np.dtype(dtype)
    rtol = TOL[dtype][0]
    np.testing.assert_allclose(y[0], [0.5, 0.5, 0.0], rtol=rtol)
    np.testing.assert_allclose(ly[0, :2], [-math.log(2)] * 2, rtol=rtol)
    assert np.isneginf(ly[0, 2]) or ly[0, 2] < -1e3


def test_masked_classes_on_every_backend(backend, xp):
    x_np = np.array([[1.0, -np.inf, 2.0, -np.inf], [0.5, 0.25, -np.inf, 3.0]])
    g_np = np.array([[0.3, 0.7, -1.0, 2.0], [1.0, -2.0, 0.5, 0.25]])
    x, g = backend.asarray(x_np), backend.asarray(g_np)
    with no_compute():
        p = gradcore.softmax(x)
        lp = gradcore.log_softmax(x)
        dp = gradcore.softmax_vjp(g, p)
        dlp = gradcore.log_softmax_vjp(g, lp)
    xt = torch.tensor(x_np, requires_grad=True)
    pt = F.softmax(xt, dim=-1)
    pt.backward(torch.tensor(g_np))
    assert_close(p, backend.asarray(pt.detach().numpy()), atol=1e-15, xp=xp)
    assert_close(dp, backend.asarray(xt.grad.numpy()), atol=1e-15, xp=xp)
    xt.grad = None
    lpt = F.log_softmax(xt, dim=-1)
    lpt.backward(torch.tensor(g_np))
    assert_close(lp, backend.asarray(lpt.detach().numpy()), xp=xp)
    assert_close(dlp, backend.asarray(xt.grad.numpy()), atol=1e-15, xp=xp)
    finite = np.isfinite(x_np)
    assert np.all(np.isfinite(backend.to_numpy(lp)[finite]))
    assert np.all(np.isneginf(backend.to_numpy(lp)[~finite]))


def test_all_masked_row_is_nan_and_leaves_other_rows_alone():
    x = np.array([[-np.inf, -np.inf], [0.0, 0.0]])
    with np.errstate(invalid="ignore"):
        p = gradcore.softmax(x)
        lp = gradcore.log_softmax(x)
    assert np.all(np.isnan(p[0]))
    assert np.all(np.isnan(lp[0]))
    np.testing.assert_allclose(p[1], [0.5, 0.5])
    np.testing.assert_allclose(lp[1], [-math.log(2)] * 2)


# --- laziness and tracing ----------------------------------------------------------------


def test_dask_stays_lazy_with_chunks_across_the_axis():
    da = pytest.importorskip("dask.array")
    x_np = inputs((6, 8), seed=8)
    g_np = np.random.default_rng(9).standard_normal(x_np.shape)
    x = da.from_array(x_np, chunks=(3, 3))
    g = da.from_array(g_np, chunks=(3, 3))
    results = {}
    with no_compute():
        for name in NAMES:
            y = forward(name)(x)
            results[name] = (y, vjp(name)(g, x, y))
    for name, (y, dx) in results.items():
        y_ref, dx_ref = torch_vjp(name, x_np, g_np)
        np.testing.assert_allclose(y.compute(), y_ref, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(dx.compute(), dx_ref, rtol=1e-12, atol=1e-14, err_msg=name)


def test_jax_jit():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    x_np = inputs((3, 4), seed=10)
    g_np = np.random.default_rng(11).standard_normal(x_np.shape)

    @jax.jit
    def all_vjps(x, g):
        return [vjp(name)(g, x, forward(name)(x)) for name in NAMES]

    got = all_vjps(jnp.asarray(x_np), jnp.asarray(g_np))
    for name, dx in zip(NAMES, got, strict=True):
        assert isinstance(dx, jax.Array)
        np.testing.assert_allclose(
            np.asarray(dx), torch_vjp(name, x_np, g_np)[1], rtol=1e-12, atol=1e-14, err_msg=name
        )


# --- property tests over shapes ----------------------------------------------------------


@st.composite
def shape_and_axis(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, axis


@settings(max_examples=15, deadline=None)
@given(shape_and_axis(), st.integers(0, 2**32 - 1))
def test_softmax_any_shape_and_axis(shape_axis, seed):
    shape, axis = shape_axis
    rng = np.random.default_rng(seed)
    x = 4.0 * rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    p = gradcore.softmax(x, axis=axis)
    lp = gradcore.log_softmax(x, axis=axis)
    assert p.shape == lp.shape == shape
    np.testing.assert_allclose(p, np_softmax(x, axis), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lp, np_log_softmax(x, axis), rtol=1e-12, atol=1e-14)
    # Explicit Jacobian per slice: J = diag(p) - p p^T, and for log-softmax I - 1 p^T.
    pm, gm = np.moveaxis(p, axis, -1), np.moveaxis(g, axis, -1)
    jac = (
        np.einsum("...i,ij->...ij", pm, np.eye(pm.shape[-1])) - pm[..., :, None] * pm[..., None, :]
    )
    ref = np.moveaxis(np.einsum("...ij,...i->...j", jac, gm), -1, axis)
    np.testing.assert_allclose(gradcore.softmax_vjp(g, p, axis=axis), ref, atol=1e-14)
    ref_log = np.moveaxis(gm - pm * gm.sum(-1, keepdims=True), -1, axis)
    np.testing.assert_allclose(gradcore.log_softmax_vjp(g, lp, axis=axis), ref_log, atol=1e-14)


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_integer_input_is_a_type_error_naming_x(backend, name):
    x = backend.asarray(np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match=r"\bx\b.*floating"):
        forward(name)(x)


@pytest.mark.parametrize("name", NAMES)
def test_vjp_argument_errors(name):
    y = np.zeros((2, 3))
    saved = "x" if name == "gelu" else "y"
    with pytest.raises(ValueError, match=rf"\bg\b.*shape.*\b{saved}\b"):
        vjp(name)(np.zeros((2, 4)), y, y)
    with pytest.raises(TypeError, match=r"\bg\b.*floating"):
        vjp(name)(np.zeros((2, 3), dtype=np.int64), y, y)
    with pytest.raises(TypeError, match=rf"\b{saved}\b.*floating"):
        vjp(name)(y, np.zeros((2, 3), dtype=bool), np.zeros((2, 3), dtype=bool))


def test_mixed_libraries_are_refused():
    with pytest.raises(TypeError, match="two different libraries"):
        gradcore.sigmoid_vjp(np.zeros(3), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_axis_errors(name):
    f = getattr(gradcore, name)
    f_vjp = getattr(gradcore, name + "_vjp")
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        f(x, axis=2)
    with pytest.raises(ValueError, match="axis -3 is out of range"):
        f_vjp(x, x, axis=-3)
    with pytest.raises(TypeError, match="axis must be an int"):
        f(x, axis=1.0)
    with pytest.raises(ValueError, match="at least one dimension"):
        f(np.asarray(1.0))


def test_leaky_relu_slope_errors():
    x = np.ones(3)
    with pytest.raises(TypeError, match="negative_slope"):
        gradcore.leaky_relu(x, negative_slope="0.1")
    with pytest.raises(ValueError, match="negative_slope"):
        gradcore.leaky_relu(x, negative_slope=math.nan)
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        gradcore.leaky_relu_vjp(x, x, negative_slope=-0.5)
    # A negative slope is fine going forward (PyTorch allows it too).
    np.testing.assert_allclose(gradcore.leaky_relu(-x, negative_slope=-0.5), 0.5 * x)


def test_public_names():
    for name in NAMES:
        assert name in gradcore.activations.__all__
        assert name + "_vjp" in gradcore.activations.__all__
        assert getattr(gradcore, name) is getattr(gradcore.activations, name)


def test_numpy_integer_axis_is_accepted():
    x = np.random.default_rng(3).standard_normal((3, 4))
    for name in ("softmax", "log_softmax"):
        y = getattr(gradcore, name)(x, axis=np.int64(0))
        ref = F.softmax if name == "softmax" else F.log_softmax
        want = ref(torch.tensor(x), dim=0).numpy()
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-15)
        g = getattr(gradcore, name + "_vjp")(np.ones_like(x), y, axis=np.int64(0))
        assert g.shape == x.shape


# --- non-array arguments are refused by name ----------------------------------------------

_FORWARDS = ["relu", "leaky_relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax"]
_VJP_ARGS = {name: ("g", "x" if name == "gelu" else "y") for name in _FORWARDS}


@pytest.mark.parametrize("bad", [None, 2.0, 3, True, [1.0, 2.0], "ab"], ids=repr)
@pytest.mark.parametrize("name", _FORWARDS)
def test_non_array_arguments_name_the_argument(name, bad):
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    forward = getattr(gradcore, name)
    vjp = getattr(gradcore, f"{name}_vjp")
    with pytest.raises(TypeError, match=r"^x must be an array"):
        forward(bad)
    first, second = _VJP_ARGS[name]
    with pytest.raises(TypeError, match=rf"^{first} must be an array"):
        vjp(bad, x)
    with pytest.raises(TypeError, match=rf"^{second} must be an array"):
        vjp(x, bad)
