"""gradcore.jax: custom_vjp losses against JAX autodiff through textbook formulas."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import gradcore.jax as gj  # noqa: E402

TOL = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _x64():
    jax.config.update("jax_enable_x64", True)


def _close(actual, expected, dtype):
    tol = TOL[dtype]
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


def _reference_xent(logits, labels, axis, weight, ignore_index, eps, reduction, z):
    """Autodiff target: log-softmax written out, PyTorch's semantics."""
    x = jnp.moveaxis(logits, axis, -1)
    C = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1)
    lse = jax.scipy.special.logsumexp(x, axis=-1)
    w = jnp.ones(C, x.dtype) if weight is None else weight.astype(x.dtype)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        t = jnp.moveaxis(labels, axis, -1) * (1 - eps) + eps / C
        rows = -jnp.sum(w * t * logp, axis=-1) + z * lse**2
        divisor = rows.size
    else:
        active = labels != ignore_index
        safe = jnp.where(active, labels, 0)
        onehot = jax.nn.one_hot(safe, C, dtype=x.dtype)
        w_y = jnp.where(active, w[safe], 0)
        nll = -jnp.sum(onehot * logp, axis=-1)
        smooth = -jnp.sum(w * logp, axis=-1) / C
        rows = jnp.where(active, (1 - eps) * w_y * nll + eps * smooth + z * lse**2, 0)
        divisor = jnp.sum(w_y)
    if reduction == "none":
        return rows
    return jnp.sum(rows) / divisor if reduction == "mean" else jnp.sum(rows)


def _upstream(loss, seed):
    if loss.ndim == 0:
        return 3.0 * loss
    r = jnp.asarray(np.random.default_rng(seed).random(loss.shape) + 0.5, loss.dtype)
    return jnp.sum(loss * r)


def _case(dtype, target_kind, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((4, 6, 3)) * 2, dtype)  # class axis 1
    if target_kind == "soft":
        y = jax.nn.softmax(jnp.asarray(rng.standard_normal((4, 6, 3)), dtype), axis=1)
    else:
        y = rng.integers(0, 6, (4, 3))
        if target_kind == "ignored":
            y[::2, 0] = 2
        y = jnp.asarray(y)
    w = jnp.asarray(rng.random(6) + 0.5, dtype)
    return x, y, w


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("z_loss", [0.0, 0.01])
@pytest.mark.parametrize("target_kind", ["hard", "ignored", "soft"])
def test_softmax_cross_entropy_grad_matches_autodiff(
    dtype, reduction, weighted, smoothing, z_loss, target_kind
):
    x, y, w = _case(dtype, target_kind)
    kw = {
        "axis": 1,
        "weight": w if weighted else None,
        "ignore_index": 2 if target_kind == "ignored" else -100,
        "label_smoothing": smoothing,
        "reduction": reduction,
        "z_loss": z_loss,
    }

    def ours(a):
        return _upstream(gj.softmax_cross_entropy(a, y, **kw), 1)

    def ref(a):
        return _upstream(_reference_xent(a, y, 1, kw["weight"], kw["ignore_index"],
                                         smoothing, reduction, z_loss), 1)  # fmt: skip

    v, g = jax.value_and_grad(ours)(x)
    rv, rg = jax.value_and_grad(ref)(x)
    _close(v, rv, dtype)
    _close(g, rg, dtype)
    if weighted and smoothing and z_loss:  # the same under jit (compiling costs ~0.3 s)
        _close(jax.jit(jax.grad(ours))(x), rg, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_labels_get_their_cotangent(reduction):
    x, y, w = _case("float64", "soft", seed=2)
    kw = {"axis": 1, "weight": w, "label_smoothing": 0.1, "reduction": reduction}

    def ours(t):
        return _upstream(gj.softmax_cross_entropy(x, t, **kw), 3)

    def ref(t):
        return _upstream(_reference_xent(x, t, 1, w, -100, 0.1, reduction, 0.0), 3)

    _close(jax.grad(ours)(y), jax.grad(ref)(y), "float64")


def test_vmap_of_grad_matches_per_example_autodiff():
    x, y, _ = _case("float64", "hard", seed=4)
    x2, y2 = x[:, :, 0], y[:, 0]  # (4, 6) logits, (4,) labels

    def one(a, b):
        return gj.softmax_cross_entropy(a, b, label_smoothing=0.1)

    def one_ref(a, b):
        return _reference_xent(a, b, 0, None, -100, 0.1, "mean", 0.0)

    both = jax.jit(lambda a, b: (jax.vmap(one)(a, b), jax.vmap(jax.grad(one))(a, b)))
    both_ref = jax.jit(lambda a, b: (jax.vmap(one_ref)(a, b), jax.vmap(jax.grad(one_ref))(a, b)))
    for ours, ref in zip(both(x2, y2), both_ref(x2, y2), strict=True):
        _close(ours, ref, "float64")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_grad_matches_autodiff(dtype, reduction, weighted):
    rng = np.random.default_rng(5)
    p = jnp.asarray(rng.standard_normal((5, 4)), dtype)
    t = jnp.asarray(rng.standard_normal((5, 4)), dtype)
    w = jnp.asarray(rng.random((5, 4)) + 0.5, dtype) if weighted else None

    def ref(a, b):
        e = (a - b) ** 2 * (1.0 if w is None else w)
        return e if reduction == "none" else (jnp.mean(e) if reduction == "mean" else jnp.sum(e))

    def wrap(f):
        return lambda a, b: _upstream(f(a, b), 6)

    ours = jax.grad(wrap(lambda a, b: gj.mse(a, b, weight=w, reduction=reduction)), (0, 1))(p, t)
    refs = jax.grad(wrap(ref), (0, 1))(p, t)
    for a, b in zip(ours, refs, strict=True):
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_grad_matches_autodiff(dtype, reduction, weighted, pos_weighted):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((5, 4)) * 4, dtype)
    y = jnp.asarray(rng.random((5, 4)), dtype)
    w = jnp.asarray(rng.random((5, 4)) + 0.5, dtype) if weighted else None
    q = jnp.asarray(rng.random(4) * 3, dtype) if pos_weighted else None

    def ref(a, b):
        qq = 1.0 if q is None else q
        e = qq * b * -jax.nn.log_sigmoid(a) + (1 - b) * -jax.nn.log_sigmoid(-a)
        e = e * (1.0 if w is None else w)
        return e if reduction == "none" else (jnp.mean(e) if reduction == "mean" else jnp.sum(e))

    def wrap(f):
        return lambda a, b: _upstream(f(a, b), 8)

    def ours_fn(a, b):
        return gj.binary_cross_entropy_with_logits(
            a, b, weight=w, pos_weight=q, reduction=reduction
        )

    ours = jax.grad(wrap(ours_fn), (0, 1))(x, y)
    refs = jax.grad(wrap(ref), (0, 1))(x, y)
    for a, b in zip(ours, refs, strict=True):
        _close(a, b, dtype)


def test_weights_are_constants():
    x, y, w = _case("float64", "hard")
    g = jax.grad(lambda ww: gj.softmax_cross_entropy(x, y, axis=1, weight=ww))(w)
    assert not np.any(np.asarray(g))


def test_bad_arguments_raise():
    x, y, _ = _case("float64", "hard")
    with pytest.raises(ValueError, match="reduction"):
        gj.softmax_cross_entropy(x, y, axis=1, reduction="avg")
    with pytest.raises(ValueError, match="axis"):
        gj.softmax_cross_entropy(x, y, axis=3)


def test_second_derivatives_match_autodiff():
    x, y, _ = _case("float64", "hard", seed=9)
    x2, y2 = x[:, :, 0], y[:, 0]

    def ours(a):
        return gj.softmax_cross_entropy(a, y2, label_smoothing=0.1, z_loss=0.01)

    def ref(a):
        return _reference_xent(a, y2, 1, None, -100, 0.1, "mean", 0.01)

    _close(jax.hessian(ours)(x2), jax.hessian(ref)(x2), "float64")
    t = jnp.asarray(np.random.default_rng(10).random(x2.shape))

    def bce(a):
        return gj.binary_cross_entropy_with_logits(a, t, reduction="sum")

    def bce_ref(a):
        return jnp.sum(-t * jax.nn.log_sigmoid(a) - (1 - t) * jax.nn.log_sigmoid(-a))

    gg = jax.grad(lambda a: jnp.sum(jax.grad(bce)(a) ** 2))(x2)
    _close(gg, jax.grad(lambda a: jnp.sum(jax.grad(bce_ref)(a) ** 2))(x2), "float64")


# --- softcap and linear + cross-entropy -------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["ignored", "soft"])
def test_softmax_cross_entropy_softcap_matches_autodiff_through_tanh(reduction, target_kind):
    x, y, w = _case("float64", target_kind, seed=6)
    x = 3.0 * x
    cap = 2.5
    kw = {"weight": w, "label_smoothing": 0.1, "reduction": reduction, "z_loss": 0.01}
    ignore = 2 if target_kind == "ignored" else -100

    def ours(a):
        return _upstream(gj.softmax_cross_entropy(a, y, axis=1, ignore_index=ignore,
                                                  softcap=cap, **kw), 3)  # fmt: skip

    def ref(a):
        u = cap * jnp.tanh(a / cap)
        return _upstream(_reference_xent(u, y, 1, w, ignore, 0.1, reduction, 0.01), 3)

    v, g = jax.value_and_grad(ours)(x)
    rv, rg = jax.value_and_grad(ref)(x)
    _close(v, rv, "float64")
    _close(g, rg, "float64")


def _lxent_case(dtype, target_kind, seed=0, n=9, h=4, v=6):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h)) * 2, dtype)
    w = jnp.asarray(rng.standard_normal((h, v)), dtype)  # (H, V): x @ w
    b = jnp.asarray(rng.standard_normal(v), dtype)
    if target_kind == "soft":
        y = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, v)), dtype), axis=-1)
    else:
        y = rng.integers(0, v, n)
        if target_kind == "ignored":
            y[::3] = 2
        elif target_kind == "all_ignored":
            y[:] = 2
        y = jnp.asarray(y)
    cw = jnp.asarray(rng.random(v) + 0.5, dtype)
    return x, w, b, y, cw


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("affine", ["plain", "bias_and_class_weights"])
@pytest.mark.parametrize("target_kind", ["hard", "ignored", "all_ignored", "soft"])
@pytest.mark.parametrize("extras", ["none", "smoothing_z_loss_softcap"])
@pytest.mark.parametrize("chunk_size", [1, None])
def test_linear_cross_entropy_grad_matches_autodiff(
    dtype, reduction, affine, target_kind, extras, chunk_size
):
    x, w, b, y, cw = _lxent_case(dtype, target_kind, seed=9)
    if affine == "plain":
        b = cw = None
    ignore = 2 if "ignored" in target_kind else -100
    eps, z, cap = (0.2, 0.01, 2.5) if extras != "none" else (0.0, 0.0, None)
    kw = {"weight": cw, "ignore_index": ignore, "label_smoothing": eps, "reduction": reduction}

    def ours(xx, ww, bb):
        loss = gj.linear_cross_entropy(xx, ww, y, bias=bb, z_loss=z, softcap=cap,
                                       chunk_size=chunk_size, **kw)  # fmt: skip
        return _upstream(loss, 4)

    def ref(xx, ww, bb):  # autodiff through the materialised logits and a log-softmax
        logits = xx @ ww if bb is None else xx @ ww + bb
        if cap is not None:
            logits = cap * jnp.tanh(logits / cap)
        return _upstream(_reference_xent(logits, y, -1, cw, ignore, eps, reduction, z), 4)

    argnums = (0, 1) if b is None else (0, 1, 2)
    v, g = jax.value_and_grad(ours, argnums)(x, w, b)
    rv, rg = jax.value_and_grad(ref, argnums)(x, w, b)
    if target_kind == "all_ignored" and reduction == "mean":
        assert bool(jnp.isnan(v))
        assert bool(jnp.isnan(rv))
        assert all(bool(jnp.all(a == 0)) for a in g), "all-ignored: zero gradients"
    else:
        _close(v, rv, dtype)
        for a, e in zip(g, rg, strict=True):
            _close(a, e, dtype)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_under_jit(reduction):
    x, w, b, y, cw = _lxent_case("float64", "ignored", seed=12)

    def loss(xx, ww, bb, mod):
        if mod == "ours":
            out = gj.linear_cross_entropy(xx, ww, y, bias=bb, weight=cw, ignore_index=2,
                                          reduction=reduction, chunk_size=4)  # fmt: skip
        else:
            out = _reference_xent(xx @ ww + bb, y, -1, cw, 2, 0.0, reduction, 0.0)
        return _upstream(out, 8)

    ours = jax.jit(jax.grad(lambda *a: loss(*a, "ours"), (0, 1, 2)))(x, w, b)
    ref = jax.grad(lambda *a: loss(*a, "ref"), (0, 1, 2))(x, w, b)
    for a, e in zip(ours, ref, strict=True):
        _close(a, e, "float64")


def test_linear_cross_entropy_labels_and_weights_are_constants():
    x, w, _b, y, cw = _lxent_case("float64", "soft", seed=1)
    g = jax.grad(lambda t, c: gj.linear_cross_entropy(x, w, t, weight=c), (0, 1))(y, cw)
    assert all(bool(jnp.all(a == 0)) for a in g)
    with pytest.raises(ValueError, match="reduction"):
        gj.linear_cross_entropy(x, w, y, reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_vmap_of_grad_matches_per_example_autodiff(reduction):
    rng = np.random.default_rng(14)
    xs = jnp.asarray(rng.standard_normal((3, 5, 4)))
    w = jnp.asarray(rng.standard_normal((4, 6)))
    ys = jnp.asarray(rng.integers(0, 6, (3, 5)))

    def ours(x, y):
        return _upstream(gj.linear_cross_entropy(x, w, y, reduction=reduction, chunk_size=2), 2)

    def ref(x, y):
        return _upstream(_reference_xent(x @ w, y, -1, None, -100, 0.0, reduction, 0.0), 2)

    _close(jax.vmap(jax.grad(ours))(xs, ys), jax.vmap(jax.grad(ref))(xs, ys), "float64")
