"""The loss kernels against PyTorch autograd, float64 NumPy formulas and finite differences.

Every backend of the plugin runs the same checks; references are computed on the host
in float64 by code that shares nothing with gradcore.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcore
from gradcore.testing import assert_close, check_vjp, no_compute

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_xent(x, labels, *, axis=-1, **kwargs):
    """PyTorch's loss and gradient, computed in float64 on the host."""
    xt = torch.tensor(np.moveaxis(x, axis, 1) if x.ndim > 1 else x, requires_grad=True)
    if labels.dtype.kind == "f" and x.ndim > 1:
        lt = torch.tensor(np.moveaxis(labels, axis, 1))
    else:
        lt = torch.tensor(labels)
    kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    z = kw.pop("z_loss", 0.0)
    reduction = kw.pop("reduction", "mean")
    loss = F.cross_entropy(xt, lt, reduction=reduction, **kw)
    if z:
        lse = torch.logsumexp(xt, dim=1 if x.ndim > 1 else 0)
        zterm = z * lse**2
        if labels.dtype.kind != "f":
            active = lt != kw.get("ignore_index", -100)
            zterm = torch.where(active, zterm, torch.zeros_like(zterm))
            if reduction == "mean":
                w = kw.get("weight")
                divisor = active.sum() if w is None else w[lt[active]].sum()
        elif reduction == "mean":
            divisor = zterm.numel()
        if reduction == "mean":
            loss = loss + zterm.sum() / divisor
        elif reduction == "sum":
            loss = loss + zterm.sum()
        else:
            loss = loss + zterm
    loss.sum().backward()
    grad = xt.grad.numpy()
    if x.ndim > 1:
        grad = np.moveaxis(grad, 1, axis)
    return loss.detach().numpy(), grad


def _hard_labels(rng, shape, num_classes, ignore_frac=0.0, ignore_index=-100):
    labels = rng.integers(0, num_classes, size=shape)
    if ignore_frac:
        labels = np.where(rng.random(shape) < ignore_frac, ignore_index, labels)
    return labels


XENT_OPTIONS = [
    dict(weight=w, label_smoothing=ls, reduction=r, z_loss=z)
    for w, ls, r, z in itertools.product(
        [False, True], [0.0, 0.15], ["mean", "sum", "none"], [0.0, 1e-3]
    )
]


@pytest.mark.parametrize(
    "opts", XENT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_softmax_cross_entropy_matches_torch(backend, opts, soft):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)) * 3
    if soft:
        labels = rng.random((7, 5))
        labels /= labels.sum(axis=1, keepdims=True)
    else:
        labels = _hard_labels(rng, (7,), 5, ignore_frac=0.3)
    kwargs = dict(opts)
    weight = rng.random(5) + 0.5 if kwargs.pop("weight") else None
    if weight is not None:
        kwargs["weight"] = weight
    want_loss, want_grad = _torch_xent(x, labels, **kwargs)
    if weight is not None:
        kwargs["weight"] = backend.asarray(weight)
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), **kwargs
    )
    assert_close(loss, want_loss, xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_cross_entropy_class_axis(backend, axis):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5))
    C = x.shape[axis]
    label_shape = tuple(s for i, s in enumerate(x.shape) if i != axis % 3)
    labels = _hard_labels(rng, label_shape, C, ignore_frac=0.2)
    want_loss, want_grad = _torch_xent(x, labels, axis=axis, label_smoothing=0.1)
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), axis=axis, label_smoothing=0.1
    )
    assert_close(loss, want_loss, xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)


def test_softmax_cross_entropy_soft_axis(backend):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 3))
    t = rng.random((2, 5, 3))
    t /= t.sum(axis=1, keepdims=True)
    want_loss, want_grad = _torch_xent(x, t, axis=1, reduction="none")
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(t), axis=1, reduction="none"
    )
    assert_close(loss, want_loss, xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)


def test_lecture_gradient_is_minus_one_over_n_y_minus_yhat(backend):
    """Without options the gradient is -(1/N)(Y - Ŷ), Ŷ the softmax (the lecture's form)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 4))
    labels = rng.integers(0, 4, 10)
    Y = np.eye(4)[labels]
    Yhat = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    loss, grad = gradcore.softmax_cross_entropy(backend.asarray(x), backend.asarray(labels))
    assert_close(grad, -(Y - Yhat) / 10, xp=backend.xp, atol=1e-16)
    assert_close(loss, np.asarray(-np.log(Yhat[np.arange(10), labels]).mean()), xp=backend.xp)


def test_float32_and_float16_keep_dtype(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 9))
    labels = rng.integers(0, 9, 6)
    want_loss, want_grad = _torch_xent(x, labels, label_smoothing=0.1)
    for dtype, rtol, atol in [("float32", 1e-5, 1e-7), ("float16", 5e-3, 1e-4)]:
        if not hasattr(backend.xp, dtype):
            continue  # array-api-strict has no float16
        xb = backend.asarray(x.astype(dtype))
        loss, grad = gradcore.softmax_cross_entropy(
            xb, backend.asarray(labels), label_smoothing=0.1
        )
        assert_close(loss, want_loss.astype(dtype), xp=backend.xp, rtol=rtol)
        assert_close(grad, want_grad.astype(dtype), xp=backend.xp, rtol=rtol, atol=atol)


def test_extreme_and_masked_logits_stay_finite(backend):
    x = np.array([[1e4, -1e4, 0.0], [-np.inf, 2.0, 1.0], [3.0, -np.inf, -np.inf]])
    labels = np.array([0, 1, 0])
    loss, grad = gradcore.softmax_cross_entropy(backend.asarray(x), backend.asarray(labels))
    want_loss, want_grad = _torch_xent(x, labels)
    assert np.isfinite(backend.to_numpy(loss))
    assert np.all(np.isfinite(backend.to_numpy(grad)))
    assert_close(loss, want_loss, xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)
    # Soft targets with no mass on a masked class also stay finite.
    t = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    loss, grad = gradcore.softmax_cross_entropy(backend.asarray(x), backend.asarray(t))
    assert np.isfinite(backend.to_numpy(loss))
    assert np.all(np.isfinite(backend.to_numpy(grad)))


def test_all_ignored_batch_gives_nan_mean_and_zero_grad(backend):
    x = np.random.default_rng(5).standard_normal((4, 3))
    labels = np.full(4, -100)
    loss, grad = gradcore.softmax_cross_entropy(backend.asarray(x), backend.asarray(labels))
    assert np.isnan(backend.to_numpy(loss))
    assert_close(grad, np.zeros_like(x), xp=backend.xp)
    loss, _ = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), reduction="sum"
    )
    assert_close(loss, np.asarray(0.0), xp=backend.xp)


def test_ignore_index_inside_class_range(backend):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 4))
    labels = rng.integers(0, 4, 8)
    want = _torch_xent(x, labels, ignore_index=2, weight=np.arange(1.0, 5.0))
    got = gradcore.softmax_cross_entropy(
        backend.asarray(x),
        backend.asarray(labels),
        ignore_index=2,
        weight=backend.asarray(np.arange(1.0, 5.0)),
    )
    assert_close(got[0], want[0], xp=backend.xp)
    assert_close(got[1], want[1], xp=backend.xp, atol=1e-15)


def test_finite_differences_softmax_cross_entropy(backend):
    if backend.name in ("dask",):
        pytest.skip("finite differences need many small eager evaluations")
    rng = np.random.default_rng(7)
    x = backend.asarray(rng.standard_normal((5, 4)))
    labels = backend.asarray(rng.integers(0, 4, 5))
    weight = backend.asarray(rng.random(4) + 0.1)

    def f(x):
        return gradcore.softmax_cross_entropy(
            x, labels, weight=weight, label_smoothing=0.2, z_loss=0.01, reduction="none"
        )[0]

    def f_vjp(v, x):
        # The gradient of sum_i v_i * loss_i: the per-row losses are independent.
        _, g = gradcore.softmax_cross_entropy(
            x, labels, weight=weight, label_smoothing=0.2, z_loss=0.01, reduction="none"
        )
        return g * v[:, None]

    check_vjp(f, f_vjp, x)


# --- labels out of range ----------------------------------------------------------------


def test_out_of_range_labels_raise_where_checked(backend):
    x = backend.asarray(np.zeros((3, 4)))
    labels = backend.asarray(np.array([0, 4, -1]))
    if backend.name in ("numpy", "torch", "array_api_strict"):
        with pytest.raises(ValueError, match=r"class index 4 at position \(1,\)"):
            gradcore.softmax_cross_entropy(x, labels)
    with pytest.raises(ValueError, match="out of range"):
        gradcore.softmax_cross_entropy(x, labels, check_labels=True)


def test_unchecked_out_of_range_labels_give_nan_rows(backend):
    x = np.random.default_rng(8).standard_normal((3, 4))
    labels = np.array([0, 7, 2])
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), reduction="none", check_labels=False
    )
    loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
    assert np.isnan(loss[1])
    assert np.all(np.isnan(grad[1]))
    want_loss, want_grad = _torch_xent(x[[0, 2]], labels[[0, 2]], reduction="none")
    np.testing.assert_allclose(loss[[0, 2]], want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad[[0, 2]], want_grad, rtol=1e-12, atol=1e-15)
    mean, _ = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), check_labels=False
    )
    assert np.isnan(backend.to_numpy(mean))


def test_jax_jit_runs_without_label_check():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 6))
    labels = rng.integers(0, 6, 4)
    fn = jax.jit(lambda a, b: gradcore.softmax_cross_entropy(a, b, label_smoothing=0.1))
    loss, grad = fn(jnp.asarray(x), jnp.asarray(labels))
    want_loss, want_grad = _torch_xent(x, labels, label_smoothing=0.1)
    np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-12, atol=1e-15)


def test_kernels_stay_lazy_on_dask():
    pytest.importorskip("dask")
    b = gradcore.backend("dask")
    rng = np.random.default_rng(10)
    x = b.asarray(rng.standard_normal((6, 4)))
    labels = b.asarray(rng.integers(0, 4, 6))
    with no_compute():
        xent = gradcore.softmax_cross_entropy(x, labels, label_smoothing=0.1, z_loss=0.1)
        sq = gradcore.mse(x, x * 0.5)
        bce = gradcore.binary_cross_entropy_with_logits(x, (x > 0) * 1.0)
    for loss, grad in (xent, sq, bce):
        assert np.all(np.isfinite(b.to_numpy(grad)))
        assert np.isfinite(b.to_numpy(loss))


# --- MSE --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_matches_formula_and_torch(backend, reduction, weighted):
    rng = np.random.default_rng(11)
    pred, target = rng.standard_normal((2, 6, 3))
    w = rng.random((1, 3)) if weighted else None
    elementwise = (w if weighted else 1.0) * (pred - target) ** 2
    want_loss = {"mean": elementwise.mean(), "sum": elementwise.sum(), "none": elementwise}[
        reduction
    ]
    scale = 1 / pred.size if reduction == "mean" else 1.0
    want_grad = -2 * scale * (w if weighted else 1.0) * (target - pred)
    if not weighted:
        pt = torch.tensor(pred, requires_grad=True)
        tl = F.mse_loss(pt, torch.tensor(target), reduction=reduction)
        tl.sum().backward()
        np.testing.assert_allclose(want_loss, tl.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(want_grad, pt.grad.numpy(), rtol=1e-12)
    kwargs = {} if w is None else {"weight": backend.asarray(w)}
    loss, grad = gradcore.mse(
        backend.asarray(pred), backend.asarray(target), reduction=reduction, **kwargs
    )
    assert_close(loss, np.asarray(want_loss), xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)


def test_mse_lecture_linear_regression(backend):
    """∂J/∂w = -(2/N) Σ x(y - ŷ) and ∂J/∂b = -(2/N) Σ (y - ŷ) via the prediction's gradient."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal(50)
    y = 3 * x - 1 + 0.1 * rng.standard_normal(50)
    w, b = 0.5, 0.2
    yhat = w * x + b
    _, g = gradcore.mse(backend.asarray(yhat), backend.asarray(y))
    g = backend.to_numpy(g)
    np.testing.assert_allclose(np.sum(g * x), -2 / 50 * np.sum(x * (y - yhat)), rtol=1e-12)
    np.testing.assert_allclose(np.sum(g), -2 / 50 * np.sum(y - yhat), rtol=1e-12)


# --- BCE with logits --------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_with_logits_matches_torch(backend, reduction, weighted, pos_weighted):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, 4)) * 4
    y = rng.random((5, 4))
    y[0] = np.round(y[0])
    w = rng.random((5, 1)) if weighted else None
    q = rng.random(4) * 3 if pos_weighted else None
    xt = torch.tensor(x, requires_grad=True)
    tl = F.binary_cross_entropy_with_logits(
        xt,
        torch.tensor(y),
        weight=None if w is None else torch.tensor(w),
        pos_weight=None if q is None else torch.tensor(q),
        reduction=reduction,
    )
    tl.sum().backward()
    kwargs = {}
    if w is not None:
        kwargs["weight"] = backend.asarray(w)
    if q is not None:
        kwargs["pos_weight"] = backend.asarray(q)
    loss, grad = gradcore.binary_cross_entropy_with_logits(
        backend.asarray(x), backend.asarray(y), reduction=reduction, **kwargs
    )
    assert_close(loss, tl.detach().numpy(), xp=backend.xp)
    assert_close(grad, xt.grad.numpy(), xp=backend.xp, atol=1e-15)


def test_bce_large_logits_do_not_overflow(backend):
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4])
    y = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    loss, grad = gradcore.binary_cross_entropy_with_logits(
        backend.asarray(x), backend.asarray(y), reduction="none"
    )
    # PyTorch's own formula rounds the tiny losses at ±50 to 0; the exact values are
    # log(1 + e^-50) ≈ 1.93e-22, so the reference is the float64 formula itself.
    want_loss = y * np.logaddexp(0.0, -x) + (1 - y) * np.logaddexp(0.0, x)
    want_grad = np.exp(-np.logaddexp(0.0, -x)) - y  # sigmoid(x), overflow-free
    assert_close(loss, want_loss, xp=backend.xp)
    assert_close(grad, want_grad, xp=backend.xp, atol=1e-300)


def test_finite_differences_bce_and_mse():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 3))
    y = rng.random((4, 3))
    q = rng.random(3) + 0.5

    def bce(x):
        return gradcore.binary_cross_entropy_with_logits(x, y, pos_weight=q, reduction="none")[0]

    def bce_vjp(v, x):
        return (
            v * gradcore.binary_cross_entropy_with_logits(x, y, pos_weight=q, reduction="none")[1]
        )

    check_vjp(bce, bce_vjp, x)

    def sq(x):
        return gradcore.mse(x, y, reduction="none")[0]

    def sq_vjp(v, x):
        return v * gradcore.mse(x, y, reduction="none")[1]

    check_vjp(sq, sq_vjp, x)


# --- hypothesis: shapes, class counts, ignore patterns, smoothing -----------------------


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    classes=st.integers(1, 12),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    smoothing=st.floats(0.0, 1.0),
    soft=st.booleans(),
    weighted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softmax_cross_entropy_property(
    rows, classes, ignore_frac, smoothing, soft, weighted, seed
):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, classes)) * 5
    if soft:
        labels = rng.random((rows, classes))
        labels /= labels.sum(axis=1, keepdims=True)
    else:
        labels = _hard_labels(rng, (rows,), classes, ignore_frac)
    kwargs = {"label_smoothing": smoothing}
    if weighted:
        kwargs["weight"] = rng.random(classes) + 0.1
    want_loss, want_grad = _torch_xent(x, labels, **kwargs)
    loss, grad = gradcore.softmax_cross_entropy(x, labels, **kwargs)
    # One class gives a loss of exactly 0 up to rounding (±3e-17): hence the atol.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-14, equal_nan=True)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)


# --- out= and inplace= on the generic path ----------------------------------------------


def test_out_and_inplace(backend):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4, 5))
    labels = rng.integers(0, 5, 4)
    want_loss, want_grad = _torch_xent(x, labels)
    if backend.name == "jax":
        with pytest.raises(ValueError, match="immutable"):
            gradcore.softmax_cross_entropy(
                backend.asarray(x), backend.asarray(labels), inplace=True
            )
        return
    out = backend.asarray(np.full_like(x, np.nan))
    if backend.name == "numpy" and isinstance(out, np.ndarray) and not out.flags.writeable:
        with pytest.raises(ValueError, match="read-only"):
            gradcore.softmax_cross_entropy(backend.asarray(x), backend.asarray(labels), out=out)
        with pytest.raises(ValueError, match="read-only"):
            gradcore.softmax_cross_entropy(
                backend.asarray(x), backend.asarray(labels), inplace=True
            )
        return
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), out=out
    )
    assert grad is out
    assert_close(out, want_grad, xp=backend.xp, atol=1e-15)
    xb = backend.asarray(x)
    loss, grad = gradcore.softmax_cross_entropy(xb, backend.asarray(labels), inplace=True)
    assert grad is xb
    assert_close(xb, want_grad, xp=backend.xp, atol=1e-15)
    assert_close(loss, want_loss, xp=backend.xp)


# --- bad input --------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    x = np.zeros((3, 4))
    labels = np.array([0, 1, 2])
    cases = [
        (lambda: gradcore.softmax_cross_entropy(x.astype(int), labels), TypeError, "logits"),
        (lambda: gradcore.softmax_cross_entropy(x, labels[:2]), ValueError, "labels"),
        (lambda: gradcore.softmax_cross_entropy(x, labels.astype(bool)), TypeError, "labels"),
        (lambda: gradcore.softmax_cross_entropy(x, np.zeros((3, 5))), ValueError, "probabilities"),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, reduction="avg"),
            ValueError,
            "reduction",
        ),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, label_smoothing=1.5),
            ValueError,
            "label_smoothing",
        ),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, weight=np.ones(3)),
            ValueError,
            "weight",
        ),
        (
            lambda: gradcore.softmax_cross_entropy(x, np.full((3, 4), 0.25), ignore_index=1),
            ValueError,
            "ignore_index",
        ),
        (lambda: gradcore.softmax_cross_entropy(x, labels, axis=2), ValueError, "axis"),
        (lambda: gradcore.softmax_cross_entropy(x, labels, z_loss=-1.0), ValueError, "z_loss"),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, out=np.zeros((4, 3))),
            ValueError,
            "out",
        ),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, out=np.zeros((3, 4), np.float32)),
            TypeError,
            "out",
        ),
        (
            lambda: gradcore.softmax_cross_entropy(x, labels, out=np.zeros((3, 4)), inplace=True),
            ValueError,
            "out=",
        ),
        (lambda: gradcore.mse(x, np.zeros((4, 3))), ValueError, "target"),
        (lambda: gradcore.mse(labels, labels), TypeError, "pred"),
        (lambda: gradcore.mse(x, x, weight=np.ones(3)), ValueError, "weight"),
        (lambda: gradcore.mse(x, x, reduction=None), ValueError, "reduction"),
        (lambda: gradcore.binary_cross_entropy_with_logits(x, x[:2]), ValueError, "targets"),
        (
            lambda: gradcore.binary_cross_entropy_with_logits(x, x, pos_weight=np.ones(5)),
            ValueError,
            "pos_weight",
        ),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()


def test_mixed_libraries_and_devices_are_rejected():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match=r"numpy.*torch"):
        gradcore.softmax_cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="two different libraries"):
        gradcore.mse(x, x, weight=torch.ones(3))
    xps = pytest.importorskip("array_api_strict")
    a = xps.asarray([[0.0, 1.0]])
    b = xps.asarray([0], device=xps.Device("device1"))
    with pytest.raises(ValueError, match="two different devices"):
        gradcore.softmax_cross_entropy(a, b)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((4, 3))
    labels = rng.integers(0, 3, 4)
    x0, l0 = x.copy(), labels.copy()
    gradcore.softmax_cross_entropy(x, labels, label_smoothing=0.1)
    gradcore.mse(x, x[::-1].copy())
    gradcore.binary_cross_entropy_with_logits(x, (x > 0) * 1.0)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(labels, l0)


# --- label dtypes, jit with closed-over arrays, scalars where arrays belong -------------


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32"])
def test_narrow_integer_labels_pick_the_right_class(backend, dtype):
    # More classes than the label dtype can count (int8/uint8 with 300 classes): the
    # one-hot comparison and the range check must not wrap around in the label dtype,
    # and an unsigned dtype must not choke on the negative default ignore_index.
    if not hasattr(backend.xp, dtype):
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(17)
    C = 300
    x = rng.standard_normal((4, C))
    top = min(np.iinfo(dtype).max, C - 1)
    labels = np.array([5, top, 0, 44]).astype(dtype)
    want_loss, want_grad = _torch_xent(x, labels.astype(np.int64), reduction="none")
    for check in (None, True, False):
        loss, grad = gradcore.softmax_cross_entropy(
            backend.asarray(x), backend.asarray(labels), reduction="none", check_labels=check
        )
        assert_close(loss, want_loss, xp=backend.xp)
        assert_close(grad, want_grad, xp=backend.xp, atol=1e-15)


def test_narrow_labels_out_of_range_are_caught(backend):
    if not hasattr(backend.xp, "uint8"):
        pytest.skip("no uint8")
    x = np.zeros((3, 4))
    labels = np.array([0, 200, 3], dtype=np.uint8)  # 200 >= 4 classes
    with pytest.raises(ValueError, match=r"class index 200 at position \(1,\)"):
        gradcore.softmax_cross_entropy(
            backend.asarray(x), backend.asarray(labels), check_labels=True
        )
    loss, grad = gradcore.softmax_cross_entropy(
        backend.asarray(x), backend.asarray(labels), reduction="none", check_labels=False
    )
    loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
    assert np.isnan(loss[1])
    assert np.all(np.isnan(grad[1]))
    assert np.all(np.isfinite(loss[[0, 2]]))


def test_jax_jit_with_closed_over_weight_and_every_option():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    rng = np.random.default_rng(18)
    x = rng.standard_normal((6, 5))
    labels = np.array([0, 4, -100, 2, 1, 3])
    w = rng.random(5) + 0.2
    opts = dict(label_smoothing=0.2, z_loss=1e-2)
    for reduction in ("mean", "sum", "none"):
        weight = jnp.asarray(w)  # concrete, closed over by the traced function
        fn = jax.jit(
            lambda a, b, r=reduction, wt=weight: gradcore.softmax_cross_entropy(
                a, b, weight=wt, reduction=r, **opts
            )
        )
        loss, grad = fn(jnp.asarray(x), jnp.asarray(labels))
        want_loss, want_grad = _torch_xent(x, labels, weight=w, reduction=reduction, **opts)
        np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-12, atol=1e-15)
    y = rng.random((6, 5))
    q = jnp.asarray(rng.random(5) + 0.5)
    bce = jax.jit(lambda a, b: gradcore.binary_cross_entropy_with_logits(a, b, pos_weight=q))
    loss, grad = bce(jnp.asarray(x), jnp.asarray(y))
    xt = torch.tensor(x, requires_grad=True)
    tl = F.binary_cross_entropy_with_logits(
        xt, torch.tensor(y), pos_weight=torch.tensor(np.asarray(q))
    )
    tl.backward()
    np.testing.assert_allclose(np.asarray(loss), tl.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-12, atol=1e-15)
    msq = jax.jit(lambda a, b: gradcore.mse(a, b, weight=q))
    loss, grad = msq(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(loss), np.mean(np.asarray(q) * (x - y) ** 2))
    np.testing.assert_allclose(np.asarray(grad), 2 * np.asarray(q) * (x - y) / x.size)


def test_check_labels_true_under_jax_jit_says_why():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    fn = jax.jit(lambda a, b: gradcore.softmax_cross_entropy(a, b, check_labels=True))
    with pytest.raises(TypeError, match=r"check_labels=True.*jit"):
        fn(jnp.zeros((2, 3)), jnp.asarray([0, 1]))


def test_scalars_where_arrays_belong_are_type_errors_naming_the_argument():
    x = np.zeros((2, 3))
    labels = np.array([0, 1])
    for call, word in [
        (lambda: gradcore.softmax_cross_entropy(x, labels, weight=2.0), "weight"),
        (lambda: gradcore.mse(x, x, weight=0.5), "weight"),
        (lambda: gradcore.binary_cross_entropy_with_logits(x, x, weight=0.5), "weight"),
        (lambda: gradcore.binary_cross_entropy_with_logits(x, x, pos_weight=3.0), "pos_weight"),
        (lambda: gradcore.mse(x, x, out=[[0.0] * 3] * 2), "out"),
        (lambda: gradcore.mse(x, 0.0), "target"),
        (lambda: gradcore.mse(1.0, x), "pred"),
        (lambda: gradcore.binary_cross_entropy_with_logits(x, 1.0), "targets"),
        (lambda: gradcore.softmax_cross_entropy(x, 1), "labels"),
    ]:
        with pytest.raises(TypeError, match=f"{word} must be an array"):
            call()


def test_no_classes_is_a_value_error(backend):
    with pytest.raises(ValueError, match="at least one class"):
        gradcore.softmax_cross_entropy(
            backend.asarray(np.zeros((2, 0))), backend.asarray(np.array([-100, -100]))
        )


def test_all_ignored_mean_is_nan_without_a_warning(backend):
    # PyTorch returns NaN quietly; a 0/0 inside the kernel would warn on NumPy-based
    # libraries.
    import warnings

    x = backend.asarray(np.zeros((2, 3)))
    labels = backend.asarray(np.array([-100, -100]))
    for fast in (True, False):
        with warnings.catch_warnings(), gradcore.use_fast_paths(fast):
            warnings.simplefilter("error")
            loss, _ = gradcore.softmax_cross_entropy(x, labels)
            assert np.isnan(backend.to_numpy(loss))
            empty = backend.asarray(np.zeros((0, 3)))
            for kernel in (gradcore.mse, gradcore.binary_cross_entropy_with_logits):
                loss, grad = kernel(empty, empty)
                assert np.isnan(backend.to_numpy(loss))
                assert tuple(grad.shape) == (0, 3)


def test_numpy_integers_as_axis_and_ignore_index():
    rng = np.random.default_rng(19)
    x = rng.standard_normal((3, 4))
    labels = np.array([1, 2, 0])
    want_loss, want_grad = _torch_xent(x.T, labels, axis=0, ignore_index=2)
    for fast in (True, False):
        with gradcore.use_fast_paths(fast):
            loss, grad = gradcore.softmax_cross_entropy(
                x.T.copy(), labels, axis=np.int64(0), ignore_index=np.int32(2)
            )
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(TypeError, match="axis must be an int"):
        gradcore.softmax_cross_entropy(x, labels, axis=True)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        gradcore.softmax_cross_entropy(x, labels, ignore_index=1.0)
