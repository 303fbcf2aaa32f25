"""Layers and models: forward maps and backprop against float64 NumPy formulas and
PyTorch autograd, parameters by name, moving between backends, initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradcore
from gradcore import nn
from gradcore.testing import assert_close

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny matrices: thread start-up would dominate, and the CI machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rng(seed=0):
    return np.random.default_rng(seed)


# --- single layers ---------------------------------------------------------------------


def test_linear_forward_backward_formulas(backend):
    rng = _rng(1)
    layer = nn.Linear(5, 3, seed=3, dtype="float64", backend=backend)
    W = gradcore.to_numpy(layer.state_dict()["W"]).copy()
    b = rng.standard_normal(3)
    layer.load_state_dict({"W": W, "b": b})
    x_np = rng.standard_normal((4, 5))
    g_np = rng.standard_normal((4, 3))
    x = backend.asarray(x_np)
    y = layer.forward(x)
    assert_close(y, x_np @ W + b, xp=backend.xp)
    dx = layer.backward(backend.asarray(g_np))
    assert_close(dx, g_np @ W.T, xp=backend.xp)
    grads = layer.grads()
    assert sorted(grads) == ["W", "b"]
    assert_close(grads["W"], x_np.T @ g_np, xp=backend.xp)
    assert_close(grads["b"], g_np.sum(axis=0), xp=backend.xp)


def test_linear_without_bias_has_only_W():
    layer = nn.Linear(3, 2, bias=False, dtype="float64")
    x = _rng().standard_normal((6, 3))
    W = layer.state_dict()["W"]
    np.testing.assert_allclose(layer.forward(x), x @ W, rtol=1e-14)
    layer.backward(np.ones((6, 2)))
    assert sorted(layer.grads()) == ["W"]


_ACTIVATION_FORMULAS = {
    "relu": (lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "leaky_relu": (
        lambda x: np.where(x > 0, x, 0.01 * x),
        lambda x: np.where(x > 0, 1.0, 0.01),
    ),
    "sigmoid": (
        lambda x: 1 / (1 + np.exp(-x)),
        lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2,
    ),
    "tanh": (np.tanh, lambda x: 1 / np.cosh(x) ** 2),
    "gelu": (
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(_ACTIVATION_FORMULAS))
def test_activation_layers_match_formulas(name):
    # The kernels are tested on every backend in their own files; this checks the
    # layers' wiring (forward map, saved value, VJP) once.
    backend = gradcore.backend("numpy")
    f, df = _ACTIVATION_FORMULAS[name]
    rng = _rng(2)
    x_np = rng.standard_normal((4, 7))
    x_np[x_np == 0] = 0.5
    g_np = rng.standard_normal((4, 7))
    layer = nn.activation(name)
    y = layer.forward(backend.asarray(x_np))
    assert_close(y, f(x_np), xp=backend.xp, rtol=1e-12, atol=1e-15)
    dx = layer.backward(backend.asarray(g_np))
    if df is None:  # GELU: PyTorch's tanh approximation as the reference
        xt = torch.tensor(x_np, requires_grad=True)
        torch.nn.functional.gelu(xt, approximate="tanh").backward(torch.tensor(g_np))
        expected = xt.grad.numpy()
    else:
        expected = g_np * df(x_np)
    assert_close(dx, expected, xp=backend.xp, rtol=1e-10, atol=1e-14)


def test_layers_keep_only_what_their_vjp_needs():
    x = _rng().standard_normal((3, 4))
    for name in ("relu", "leaky_relu", "sigmoid", "tanh"):
        layer = nn.activation(name)
        y = layer.forward(x)
        assert layer._saved is y, name  # the output, not the input
    gelu = nn.GELU()
    gelu.forward(x)
    assert gelu._saved is x
    lin = nn.Linear(4, 2)
    x32 = x.astype(np.float32)
    lin.forward(x32)
    assert lin._x is x32
    lin.backward(np.ones((3, 2), dtype=np.float32))
    assert lin._x is None  # released after the backward pass


def test_backward_without_forward_raises():
    model = nn.MLP([3, 4, 2])
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.ones((1, 2), dtype=np.float32))
    model.forward(np.ones((1, 3), dtype=np.float32))
    model.backward(np.ones((1, 2), dtype=np.float32))
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(np.ones((1, 2), dtype=np.float32))


# --- whole models against PyTorch autograd ----------------------------------------------


def _torch_copy(model: nn.Sequential):
    layers = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            params = layer.state_dict()
            t = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
            t = t.double()
            with torch.no_grad():
                t.weight.copy_(torch.tensor(gradcore.to_numpy(params["W"]).T))
                if layer.bias:
                    t.bias.copy_(torch.tensor(gradcore.to_numpy(params["b"])))
            layers.append(t)
        elif isinstance(layer, nn.LeakyReLU):
            layers.append(torch.nn.LeakyReLU(layer.negative_slope))
        else:
            layers.append(
                {
                    "ReLU": torch.nn.ReLU(),
                    "Sigmoid": torch.nn.Sigmoid(),
                    "Tanh": torch.nn.Tanh(),
                    "GELU": torch.nn.GELU(approximate="tanh"),
                }[type(layer).__name__]
            )
    return torch.nn.Sequential(*layers)


def test_mlp_gradients_match_torch_autograd(backend):
    _check_mlp_against_torch(backend, "relu")


@pytest.mark.parametrize("activation", ["tanh", "gelu", "sigmoid", "leaky_relu"])
def test_mlp_gradients_match_torch_autograd_other_activations(activation):
    _check_mlp_against_torch(gradcore.backend("numpy"), activation)


def _check_mlp_against_torch(backend, activation):
    rng = _rng(5)
    model = nn.MLP([6, 8, 7, 4], activation, seed=11, dtype="float64", backend=backend)
    ref = _torch_copy(model)
    x_np = rng.standard_normal((9, 6))
    labels = rng.integers(0, 4, size=9)

    logits = model.forward(backend.asarray(x_np))
    loss, g = gradcore.softmax_cross_entropy(logits, backend.asarray(labels))
    dx = model.backward(g)

    xt = torch.tensor(x_np, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(ref(xt), torch.tensor(labels))
    loss_t.backward()
    assert_close(loss, np.asarray(loss_t.item()), xp=backend.xp, rtol=1e-12)
    assert_close(dx, xt.grad.numpy(), xp=backend.xp, rtol=1e-10, atol=1e-14)
    grads = model.grads()
    assert sorted(grads) == ["0.W", "0.b", "2.W", "2.b", "4.W", "4.b"]
    torch_linears = [m for m in ref if isinstance(m, torch.nn.Linear)]
    for i, t in zip((0, 2, 4), torch_linears, strict=True):
        assert_close(
            grads[f"{i}.W"], t.weight.grad.numpy().T, xp=backend.xp, rtol=1e-10, atol=1e-14
        )
        assert_close(grads[f"{i}.b"], t.bias.grad.numpy(), xp=backend.xp, rtol=1e-10, atol=1e-14)


def test_backward_without_input_grad_keeps_parameter_grads():
    rng = _rng(12)
    model = nn.MLP([5, 6, 3], "tanh", seed=3, dtype="float64")
    ref = _torch_copy(model)
    x_np = rng.standard_normal((4, 5))
    labels = rng.integers(0, 3, size=4)
    _, g = gradcore.softmax_cross_entropy(model.forward(x_np), labels)
    assert model.backward(g, need_input_grad=False) is None
    torch.nn.functional.cross_entropy(ref(torch.tensor(x_np)), torch.tensor(labels)).backward()
    grads = model.grads()
    for i, t in zip((0, 2), [m for m in ref if isinstance(m, torch.nn.Linear)], strict=True):
        np.testing.assert_allclose(grads[f"{i}.W"], t.weight.grad.numpy().T, rtol=1e-12)
        np.testing.assert_allclose(grads[f"{i}.b"], t.bias.grad.numpy(), rtol=1e-12)


def test_sequential_of_hand_built_layers_matches_torch():
    rng = _rng(6)
    model = nn.Sequential(
        nn.Linear(3, 5, init="xavier", seed=1, dtype="float64"),
        nn.Tanh(),
        nn.Linear(5, 2, seed=2, dtype="float64"),
        nn.Sigmoid(),
    )
    ref = _torch_copy(model)
    x = rng.standard_normal((4, 3))
    target = rng.standard_normal((4, 2))
    _loss, g = gradcore.mse(model.forward(x), target)
    dx = model.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.mse_loss(ref(xt), torch.tensor(target)).backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(model.grads()["2.W"], ref[2].weight.grad.numpy().T, rtol=1e-10)


# --- initialisation ------------------------------------------------------------------------


def test_he_and_xavier_statistics():
    he = gradcore.to_numpy(nn.Linear(2000, 500, seed=0, dtype="float64").state_dict()["W"])
    assert he.std() == pytest.approx(math.sqrt(2 / 2000), rel=0.01)
    assert abs(he.mean()) < 3 * math.sqrt(2 / 2000) / 1000
    xav = nn.Linear(300, 200, init="xavier", seed=0, dtype="float64").state_dict()["W"]
    limit = math.sqrt(6 / 500)
    assert np.abs(xav).max() <= limit
    assert np.abs(xav).max() > 0.99 * limit
    assert xav.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    b = nn.Linear(4, 3).state_dict()["b"]
    assert np.all(b == 0)


def test_mlp_picks_init_for_activation():
    relu = nn.MLP([400, 300, 2], "relu", seed=0, dtype="float64")
    tanh = nn.MLP([400, 300, 2], "tanh", seed=0, dtype="float64")
    assert relu.state_dict()["0.W"].std() == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    assert np.abs(tanh.state_dict()["0.W"]).max() <= math.sqrt(6 / 700)


def test_one_seed_gives_the_same_model_on_every_backend(backend):
    reference = nn.MLP([4, 6, 3], seed=42, dtype="float64").state_dict()
    moved = nn.MLP([4, 6, 3], seed=42, dtype="float64", backend=backend).state_dict()
    assert sorted(moved) == sorted(reference)
    for name, value in reference.items():
        assert_close(moved[name], value, xp=backend.xp, rtol=0)
    other = nn.MLP([4, 6, 3], seed=43, dtype="float64").state_dict()
    assert not np.allclose(other["0.W"], reference["0.W"])


# --- parameters by name, moving, config -------------------------------------------------


def test_state_dict_round_trip_and_copy():
    a = nn.MLP([3, 4, 2], seed=0)
    b = nn.MLP([3, 4, 2], seed=1)
    state = a.state_dict()
    b.load_state_dict(state)
    for name, value in state.items():
        np.testing.assert_array_equal(b.state_dict()[name], value)
        assert b.state_dict()[name] is not value  # copied, not shared
    assert a.num_parameters() == 3 * 4 + 4 + 4 * 2 + 2


def test_load_state_dict_mismatches_are_named():
    model = nn.MLP([3, 4, 2])
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing 2\.b"):
        model.load_state_dict({k: v for k, v in state.items() if k != "2.b"})
    with pytest.raises(ValueError, match=r"unexpected 9\.W"):
        model.load_state_dict({**state, "9.W": np.zeros(1)})
    with pytest.raises(ValueError, match=r"0\.W has shape \(4, 3\), expected \(3, 4\)"):
        model.load_state_dict({**state, "0.W": np.zeros((4, 3))})
    bad = {**state, "0.b": np.full(4, np.nan)}
    with pytest.raises(ValueError, match="NaN"):
        model.load_state_dict(bad)


def test_to_moves_parameters_and_keeps_values(backend):
    model = nn.MLP([3, 5, 2], seed=3, dtype="float64")
    before = {k: v.copy() for k, v in model.state_dict().items()}
    x = _rng().standard_normal((4, 3))
    expected = model.forward(x)
    assert model.to(backend) is model
    assert model.backend == backend
    for name, value in model.state_dict().items():
        assert_close(value, before[name], xp=backend.xp, rtol=0)
    assert_close(model.forward(backend.asarray(x)), expected, xp=backend.xp, rtol=1e-12)


def test_to_accepts_a_name_and_a_dtype():
    model = nn.MLP([3, 2], seed=0, dtype="float64").to("torch", dtype="float32")
    w = model.state_dict()["0.W"]
    assert isinstance(w, torch.Tensor)
    assert w.dtype == torch.float32
    model.to(gradcore.backend("numpy"))
    assert model.state_dict()["0.W"].dtype == np.float32


def test_input_of_another_library_is_refused_clearly():
    model = nn.MLP([3, 2]).to("torch")
    # NumPy input is moved for convenience; another library's array is an error.
    assert isinstance(model.forward(np.ones((1, 3))), torch.Tensor)
    numpy_model = nn.MLP([3, 2])
    with pytest.raises(TypeError, match="model is on backend 'numpy'"):
        numpy_model.forward(torch.ones((1, 3)))


def test_predict_keeps_nothing_and_chunks():
    model = nn.MLP([3, 8, 2], seed=0, dtype="float64")
    x = _rng().standard_normal((10, 3))
    full = model.forward(x)
    model.backward(np.ones_like(full))
    chunked = model.predict(x, batch_size=3)
    np.testing.assert_allclose(chunked, full, rtol=1e-14)
    assert model[0]._x is None
    assert model[1]._saved is None


def test_from_config_rebuilds_the_architecture():
    model = nn.MLP([3, 7, 2], "tanh", dtype="float64")
    again = nn.from_config(model.config())
    assert again.config() == model.config()
    seq = nn.Sequential(nn.Linear(2, 3, dtype="float64"), nn.LeakyReLU(0.2))
    assert nn.from_config(seq.config()).config() == seq.config()
    with pytest.raises(ValueError, match="unknown model type"):
        nn.from_config({"type": "Conv"})
    with pytest.raises(ValueError, match="malformed"):
        nn.from_config({"type": "MLP"})


def test_constructor_errors():
    with pytest.raises(ValueError, match="activation"):
        nn.MLP([2, 3], "swish")
    with pytest.raises(ValueError, match="sizes"):
        nn.MLP([2])
    with pytest.raises(ValueError, match="in_features"):
        nn.Linear(0, 3)
    with pytest.raises(ValueError, match="init"):
        nn.Linear(2, 3, init="orthogonal")
    with pytest.raises(ValueError, match="dtype"):
        nn.Linear(2, 3, dtype="int32")
    with pytest.raises(ValueError, match="unknown backend"):
        nn.MLP([2, 3], backend="tensorflow")


# --- arguments that used to be coerced or crash -------------------------------------------


def test_model_arguments_are_refused_not_coerced():
    with pytest.raises(ValueError, match=r"positive integer widths, got \[2\.7, 3\]"):
        nn.MLP([2.7, 3])
    with pytest.raises(ValueError, match="positive integer widths"):
        nn.MLP([True, 3])
    with pytest.raises(TypeError, match="sizes must be a sequence"):
        nn.MLP("23")
    with pytest.raises(TypeError, match="activation must be a name"):
        nn.MLP([2, 3, 1], activation=None)
    with pytest.raises(TypeError, match="activation must be a name"):
        nn.activation(3)
    with pytest.raises(TypeError, match="backend name must be a str"):
        gradcore.backend(None)
    assert nn.MLP([np.int64(2), 3]).sizes == [2, 3]


def test_load_state_dict_refuses_non_real_and_overflowing_values():
    model = nn.MLP([2, 3])  # float32
    state = {k: np.asarray(v, dtype=np.float64) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'0\.W' must hold real numbers"):
        model.load_state_dict({**state, "0.W": state["0.W"].astype(complex)})
    with pytest.raises(ValueError, match=r"'0\.W' overflows the model's dtype float32"):
        model.load_state_dict({**state, "0.W": np.full((2, 3), -1e300)})
    nn.MLP([2, 3], dtype="float64").load_state_dict({**state, "0.W": np.full((2, 3), 1e300)})


def test_bad_seed_names_the_argument():
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        nn.MLP([2, 3], seed=-1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        nn.Linear(2, 3, seed=1.5)


def test_model_inputs_name_the_argument():
    model = nn.MLP([2, 3])
    for bad in (None, 3.0, "ab"):
        with pytest.raises(TypeError, match=r"^x must be an array"):
            model.forward(bad)
        with pytest.raises(TypeError, match=r"^x must be an array"):
            model.predict(bad)
    with pytest.raises(TypeError, match="state must be a dict"):
        model.load_state_dict(None)


def test_repr_of_a_one_layer_mlp_names_no_activation():
    assert repr(nn.MLP([2, 1])) == "MLP([2, 1], dtype='float32')"
    assert "activation='tanh'" in repr(nn.MLP([2, 4, 1], activation="tanh"))


def test_backward_names_a_non_array_gradient():
    model = nn.MLP([2, 3, 1])
    model.forward(np.ones((4, 2), np.float32))
    for bad in (None, 1.0, [1.0]):
        with pytest.raises(TypeError, match=r"^g must be an array"):
            model.backward(bad)
