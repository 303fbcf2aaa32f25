"""The NumPy fast paths never return silently wrong numbers.

Extreme finite logits (row factors that would round to subnormals), byte order and
extended precision, aliasing between the gradient's destination and the other inputs,
non-C-contiguous layouts, PyTorch's exact semantics at the edges (``+inf`` logits, a
zero divisor in the mean, huge MSE values), concurrent thread-count changes, and the
refusal of coerced option values.

References are float64 NumPy formulas written out here (with max subtraction, from the
same inputs) or PyTorch autograd in float64, never the code under test. Each test fails
on the code before its fix.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradcore

torch = pytest.importorskip("torch")
F = torch.nn.functional
fast = pytest.importorskip("gradcore.backends.numpy")

xent = gradcore.softmax_cross_entropy
bce = gradcore.binary_cross_entropy_with_logits
mse = gradcore.mse


def generic(fn, *args, **kwargs):
    with gradcore.use_fast_paths(False):
        return fn(*args, **kwargs)


@pytest.fixture
def blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, threads even for tiny inputs: many blocks, a ragged one."""
    monkeypatch.setattr(fast, "BLOCK_BYTES", 256)
    monkeypatch.setattr(fast, "TRANSPOSED_BLOCK_ROWS", 4)
    monkeypatch.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setattr(fast, "SMALL_BYTES", 0)


# --- a float64 reference with error bounds -------------------------------------------------


def ref_xent(x, labels, *, weight=None, eps=0.0, z=0.0, reduction="mean", ignore_index=-100):
    """Cross-entropy of (N, C) logits in float64, textbook (max subtracted), plus bounds.

    Returns (loss, grad, loss_bound, grad_bound): the bounds are the same expressions
    with every term taken in absolute value, so that ``k * eps * bound`` is the error
    any implementation rounding in the input's dtype may make (cancellation included).
    With a zero divisor for the mean: NaN loss, NaN rows for rows not ignored (PyTorch).
    """
    x = x.astype(np.float64)
    N, C = x.shape
    w = np.ones(C) if weight is None else weight.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    p = e / s
    lse = np.log(s)[:, 0] + m[:, 0]
    # exp(x - m) in the dtype: x - m rounds to eps * |x - m|, a relative error of p.
    pc = p * (1.0 + np.abs(x - m))
    if labels.dtype.kind == "f":
        t = labels.astype(np.float64) * (1.0 - eps) + eps / C
        tw = t * w
        counted = np.ones(N, dtype=bool)
        with np.errstate(invalid="ignore"):
            row = -np.where(tw == 0, 0.0, tw * (x - lse[:, None])).sum(axis=1)
        row = row + (z * lse) * lse
        grad = (tw.sum(axis=1) + 2 * z * lse)[:, None] * p - tw
        a_abs = np.abs(tw).sum(axis=1) + 2 * z * np.abs(lse)
        gb = a_abs[:, None] * pc + np.abs(tw)
        lb = (np.abs(tw) * (np.abs(x) + np.abs(lse)[:, None])).sum(axis=1) + (z * lse) * lse
        lb = lb + a_abs  # the row sum's rounding: an absolute error of eps in lse
        divisor = float(N)
    else:
        counted = labels != ignore_index
        y = np.where(counted, labels, 0)
        onehot = np.zeros((N, C))
        onehot[np.arange(N), y] = 1.0
        wy = np.where(counted, w[y], 0.0)
        a = (1 - eps) * wy + eps / C * w.sum() + 2 * z * lse
        picked = x[np.arange(N), y]
        row = (1 - eps) * wy * (lse - picked) + (z * lse) * lse
        if eps > 0.0:  # (without the guard, 0 * an overflowed sum would be NaN)
            row = row + eps / C * (w * (lse[:, None] - x)).sum(axis=1)
        grad = a[:, None] * p - (1 - eps) * wy[:, None] * onehot - eps / C * w
        a_abs = (1 - eps) * wy + eps / C * np.abs(w).sum() + 2 * z * np.abs(lse)
        gb = a_abs[:, None] * pc + (1 - eps) * wy[:, None] * onehot + eps / C * np.abs(w)
        lb = (1 - eps) * wy * (np.abs(lse) + np.abs(picked)) + (z * lse) * lse
        if eps > 0.0:
            lb = lb + eps / C * (np.abs(w) * (np.abs(lse)[:, None] + np.abs(x))).sum(axis=1)
        lb = lb + a_abs  # the row sum's rounding: an absolute error of eps in lse
        row = np.where(counted, row, 0.0)
        grad = np.where(counted[:, None], grad, 0.0)
        gb = np.where(counted[:, None], gb, 0.0)
        lb = np.where(counted, lb, 0.0)
        divisor = float(wy.sum())
    if reduction == "none":
        return row, grad, lb, gb
    if reduction == "sum":
        return row.sum(), grad, lb.sum(), gb
    if divisor == 0.0:
        nan_rows = np.where(counted[:, None], np.nan, 0.0) * np.ones((1, C))
        return np.nan, nan_rows, 0.0, np.zeros_like(gb)
    return row.sum() / divisor, grad / divisor, lb.sum() / divisor, gb / divisor


def assert_within(actual, ref, bound, dtype, *, k: float, atol: float = 0.0, what="") -> None:
    """|actual - ref| <= k * eps * bound + atol, elementwise; NaN and inf where ref has them."""
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), ref.shape)
    with np.errstate(over="ignore"):
        ref_d = ref.astype(dtype).astype(np.float64)  # overflow to inf in the dtype
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(ref_d))
    special = ~np.isfinite(ref_d)
    np.testing.assert_array_equal(actual[special], ref_d[special])
    ok = ~special
    eps = float(np.finfo(dtype).eps)
    err = np.abs(actual[ok] - ref[ok])
    tol = k * eps * bound[ok] + atol + 2 * float(np.finfo(dtype).tiny)
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {bad.sum()} entries off, worst {np.max(err - tol)}: "
        f"actual {actual[ok][bad][:5]}, reference {ref[ok][bad][:5]}"
    )


def check_xent_both_paths(x, labels, dtype, *, k: float = 16.0, **opts) -> None:
    """Fast and generic paths both within float rounding of the float64 reference."""
    loss_ref, grad_ref, lb, gb = ref_xent(x, labels, **opts)
    kw = {"weight": opts.get("weight"), "label_smoothing": opts.get("eps", 0.0)}
    kw.update(z_loss=opts.get("z", 0.0), reduction=opts.get("reduction", "mean"))
    C = x.shape[1]
    w = opts.get("weight")
    wmax = 1.0 if w is None else max(1.0, float(np.max(np.abs(w))))
    atol = 4 * float(np.finfo(dtype).tiny) * wmax * C
    # A finite mean of row losses whose sum overflows the dtype: the generic body sums
    # in the dtype (inf, as PyTorch does), the fast path in float64 (the exact mean).
    rows_ref = ref_xent(x, labels, **{**opts, "reduction": "none"})[0]
    with np.errstate(over="ignore", invalid="ignore"):
        overflows = not abs(float(np.sum(rows_ref))) <= float(np.finfo(dtype).max)
    skip_loss = kw["reduction"] == "mean" and overflows and np.isfinite(rows_ref).all()
    for path in ("fast", "generic"):
        if path == "fast":
            loss, grad = xent(x, labels, **kw)
        else:
            loss, grad = generic(xent, x, labels, **kw)
        assert loss.dtype == dtype, path
        assert grad.dtype == dtype, path
        assert_within(grad, grad_ref, gb, dtype, k=k, atol=atol, what=f"{path} grad")
        if not skip_loss:
            assert_within(loss, loss_ref, lb, dtype, k=k * (C + 4), what=f"{path} loss")


# --- item 1: large (and tiny) finite logits ------------------------------------------------


@pytest.mark.parametrize("n", [10**6, 10**7])
def test_xent_float32_large_logits_many_rows(n):
    x = np.zeros((n, 2), np.float32)
    x[:, 0] = 88
    labels = np.ones(n, np.int64)
    loss, grad = xent(x, labels)
    p1 = np.exp(-88.0) / (1 + np.exp(-88.0))
    np.testing.assert_allclose(float(loss), 88.0, rtol=1e-6)
    want = np.array([(1 - p1) / n, (p1 - 1) / n])
    np.testing.assert_allclose(grad, np.broadcast_to(want, grad.shape), rtol=4e-7)
    if n <= 10**6:
        _, g_grad = generic(xent, x, labels)
        np.testing.assert_allclose(grad, g_grad, rtol=4e-7, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"weight": True},
        {"eps": 0.1},
        {"z": 1e-4},
        {"weight": True, "eps": 0.2, "z": 1e-3},
        {"soft": True},
        {"soft": True, "weight": True, "eps": 0.1, "z": 1e-4},
    ],
    ids=lambda o: "-".join(sorted(o)) or "plain",
)
@pytest.mark.parametrize("layout", ["small", "blocked"])
def test_xent_extreme_rows_match_float64(dtype, reduction, opts, layout, monkeypatch):
    """Rows near the overflow edge, far below zero, and ordinary ones, many rows."""
    if layout == "blocked":
        monkeypatch.setattr(fast, "BLOCK_BYTES", 256)
        monkeypatch.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)
    rng = np.random.default_rng(1)
    C, N = 3, 400
    top = 88.0 if dtype == np.float32 else 709.0
    low = -100.0 if dtype == np.float32 else -740.0
    offsets = np.concatenate(
        [np.full(N // 4, top), np.full(N // 4, top - 15), np.full(N // 4, low), np.zeros(N // 4)]
    )
    x = (offsets[:, None] - rng.random((N, C)) * np.array([0.0, 3.0, 60.0])).astype(dtype)
    labels = rng.integers(0, C, N)
    if opts.get("soft"):
        p = rng.random((N, C))
        labels = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    weight = rng.random(C).astype(dtype) + 0.5 if opts.get("weight") else None
    check_xent_both_paths(
        x, labels, dtype, weight=weight, eps=opts.get("eps", 0.0), z=opts.get("z", 0.0),
        reduction=reduction,
    )  # fmt: skip


def test_xent_float64_near_709_is_exact():
    n = 100_000
    x = np.zeros((n, 2))
    x[:, 0] = 709.0
    _, grad = xent(x, np.ones(n, np.int64))
    p1 = np.exp(-709.0)
    np.testing.assert_allclose(grad[0], [(1 - p1) / n, (p1 - 1) / n], rtol=1e-15)


def test_xent_small_row_sums_keep_relative_precision():
    """A row whose exp entries fall into the subnormal range, but whose probabilities don't."""
    x = np.array([[-40.0, -100.0, -45.0]], np.float32)
    check_xent_both_paths(x, np.array([0]), np.float32, reduction="sum", k=8)
    _, grad = xent(x, np.array([0]), reduction="sum")
    want = np.exp(-60.0) / (1 + np.exp(-5.0) + np.exp(-60.0))
    np.testing.assert_allclose(grad[0, 1], want, rtol=1e-6)


_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_edge = st.one_of(
    st.floats(-5, 5, width=32),
    st.floats(80, 88.75, width=32),
    st.floats(-110, -40, width=32),
    _f32,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=_edge),
    repeat=st.sampled_from([1, 1000]),
    eps=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-4]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    data=st.data(),
)
def test_xent_any_finite_float32_input(x, repeat, eps, z, weighted, reduction, data):
    N, C = x.shape
    x = np.tile(x, (repeat, 1))  # many rows: a small mean factor 1/N
    picks = data.draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N))
    labels = np.tile(np.asarray(picks), repeat)
    weight = np.linspace(0.5, 2.0, C).astype(np.float32) if weighted else None
    check_xent_both_paths(
        x, labels, np.float32, weight=weight, eps=eps, z=z, reduction=reduction, k=32
    )


# --- siblings: BCE and MSE with extreme values --------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_and_mse_extreme_values_match_torch(dtype):
    big = float(np.finfo(dtype).max) / 4
    x = np.array([-big, -1e30, -100.0, -1e-30, 0.0, 1e-30, 100.0, 1e30, big], dtype)
    y = np.array([0.0, 1.0, 0.3, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0], dtype)
    for fn, tfn in ((bce, F.binary_cross_entropy_with_logits), (mse, F.mse_loss)):
        xt = torch.tensor(x, requires_grad=True)
        want = tfn(xt, torch.tensor(y))
        want.backward()
        for path in ("fast", "generic"):
            loss, grad = fn(x, y) if path == "fast" else generic(fn, x, y)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=4 * np.finfo(dtype).eps)
            np.testing.assert_allclose(loss, want.detach().numpy(), rtol=4 * np.finfo(dtype).eps)


# --- item 2: byte order, extended and narrow precision ---------------------------------------


def _losses(x, y):
    labels = np.array([0, 2, 1])
    return {
        "xent": lambda a: xent(a, labels),
        "xent-soft": lambda a: xent(a, np.abs(y) / np.abs(y).sum(axis=1, keepdims=True)),
        "mse": lambda a: mse(a, y),
        "bce": lambda a: bce(a, (y > 0).astype(a.dtype)),
    }


@pytest.mark.parametrize("kernel", ["xent", "xent-soft", "mse", "bce"])
@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype", [">f8", ">f4", np.longdouble, np.float16])
def test_losses_compute_by_dtype_width(kernel, path, dtype):
    """'>f8' and longdouble agree with float64 to 1e-15, not float32's 1e-7."""
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((3, 3)) * 3
    y64 = rng.standard_normal((3, 3))
    x, y = x64.astype(dtype), y64.astype(dtype)
    dt = np.dtype(dtype)
    run = _losses(x, y)[kernel]
    want_loss, want_grad = _losses(x64, y64)[kernel](x.astype(np.float64))
    if path == "fast":
        loss, grad = run(x)
    else:
        with gradcore.use_fast_paths(False):
            loss, grad = run(x)
    assert loss.dtype == dt
    assert grad.dtype == dt
    rtol = {8: 1e-14, 4: 1e-6, 2: 2e-3}[min(dt.itemsize, 8)]
    if dt.itemsize > 8:  # at least float64: the float64 reference's own rounding
        rtol = 1e-14
    np.testing.assert_allclose(grad.astype(np.float64), want_grad, rtol=rtol, atol=rtol * 1e-3)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=rtol)


@pytest.mark.parametrize("dtype", [">f8", np.longdouble])
@pytest.mark.parametrize(
    "fn",
    ["relu", "sigmoid", "tanh", "gelu", "softmax", "log_softmax", "leaky_relu"],
)
def test_activations_compute_by_dtype_width(fn, dtype):
    x64 = np.linspace(-3, 3, 12).reshape(3, 4) + 1e-9
    x = x64.astype(dtype)
    f = getattr(gradcore, fn)
    got, want = f(x), f(x64)
    assert got.dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("=")  # same precision
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-13, atol=1e-300)
    g64 = np.cos(np.arange(12.0)).reshape(3, 4)
    vjp = getattr(gradcore, fn + "_vjp")
    arg = x if fn == "gelu" else got
    arg64 = x64 if fn == "gelu" else want
    got_dx = vjp(g64.astype(dtype), arg).astype(np.float64)
    np.testing.assert_allclose(got_dx, vjp(g64, arg64), rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("dtype", [">f8", np.longdouble])
def test_linear_computes_by_dtype_width(dtype):
    rng = np.random.default_rng(0)
    x64, W64, b64 = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    got = gradcore.linear(x64.astype(dtype), W64.astype(dtype), b64.astype(dtype))
    assert got.dtype.newbyteorder("=") == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_allclose(got.astype(np.float64), x64 @ W64 + b64, rtol=1e-14)
    g = np.ones((4, 2))
    dx, dW, _db = gradcore.linear_vjp(g.astype(dtype), x64.astype(dtype), W64.astype(dtype))
    np.testing.assert_allclose(dx.astype(np.float64), g @ W64.T, rtol=1e-14)
    np.testing.assert_allclose(dW.astype(np.float64), x64.T @ g, rtol=1e-14)


# --- item 3: the gradient's destination overlapping another input ----------------------------


def _copies(*arrays):
    return [a.copy() for a in arrays]


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("mode", ["inplace", "out"])
def test_bce_targets_are_the_logits(path, mode, blocked):
    x = np.array([[0.2, 0.9], [-1.5, 3.0]], np.float32)
    want = bce(*_copies(x, x))
    kw = {"inplace": True} if mode == "inplace" else {"out": x}
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = bce(x, x, **kw)
    assert grad is x
    np.testing.assert_allclose(grad, want[1], rtol=1e-6)
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("n", [5, 300_001])
def test_mse_shifted_views_inplace(path, n, blocked):
    a = np.arange(n + 1, dtype=np.float32) ** 0.5
    want = mse(a[1:].copy(), a[:-1].copy())
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = mse(a[1:], a[:-1], inplace=True)
    np.testing.assert_allclose(grad, want[1], rtol=1e-6)
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    b = np.arange(n + 1, dtype=np.float32) ** 0.5
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = mse(b[:-1], b[1:], inplace=True)  # the other direction
    np.testing.assert_allclose(grad, -want[1], rtol=1e-6)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("mode", ["inplace", "out"])
@pytest.mark.parametrize("softcap", [None, 0.5])
def test_soft_xent_labels_are_the_logits(path, mode, softcap, blocked):
    rng = np.random.default_rng(0)
    x = rng.random((7, 5)).astype(np.float32)
    want = xent(*_copies(x, x), label_smoothing=0.1, softcap=softcap)
    kw = {"inplace": True} if mode == "inplace" else {"out": x}
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = xent(x, x, label_smoothing=0.1, softcap=softcap, **kw)
    np.testing.assert_allclose(grad, want[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss, want[0], rtol=1e-6)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_out_overlapping_targets_and_weights(path, blocked):
    rng = np.random.default_rng(1)
    buf = rng.random((3, 40, 6)).astype(np.float32)
    p, t, w = buf[0], buf[1], buf[2]
    with gradcore.use_fast_paths(path == "fast"):
        want = mse(*_copies(p, t), weight=w.copy())
        got = mse(p.copy(), t, weight=w, out=t)  # gradient over the targets
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        buf = rng.random((3, 40, 6)).astype(np.float32)
        x, y, q = buf[0], (buf[1] > 0.5).astype(np.float32), buf[2]
        want = bce(*_copies(x, y), weight=q.copy(), pos_weight=q.copy())
        got = bce(x.copy(), y, weight=q, pos_weight=q, out=q)  # over the weights
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        # class weights inside the logits, overwritten in place
        x = rng.standard_normal((6, 6)).astype(np.float32) ** 2
        labels = np.arange(6)
        want = xent(x.copy(), labels, weight=x[0].copy(), label_smoothing=0.1)
        got = xent(x, labels, weight=x[0], label_smoothing=0.1, inplace=True)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        x = rng.standard_normal((6, 6)).astype(np.float32) ** 2
        for softcap in (None, 2.0):
            want = xent(x.copy(), labels, weight=x[0].copy(), softcap=softcap)
            y = x.copy()
            got = xent(y, labels, weight=y[0], softcap=softcap, inplace=True)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


# --- item 6: column-major layouts keep float64 accumulation ----------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("soft", [False, True])
def test_xent_wide_rows_accumulate_in_float64(order, soft):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.standard_normal((4, 2**20)) * 3, dtype=np.float32, order=order)
    if soft:
        labels = np.asarray(rng.random(x.shape), np.float32, order=order)
        labels /= labels.sum(axis=1, keepdims=True)
    else:
        labels = rng.integers(0, x.shape[1], 4)
    loss, grad = xent(x, labels, label_smoothing=0.1)
    want_loss, want_grad, _, _ = ref_xent(x, labels, eps=0.1)
    # float32 rounding of the result (a float32 row sum in BLAS or element by element
    # was off by 1e-5 to 1.5e-4 here)
    assert abs(float(loss) - want_loss) <= 4e-7 * abs(want_loss)
    np.testing.assert_allclose(grad, want_grad, rtol=0, atol=5e-7 * np.abs(want_grad).max())


# --- item 7: PyTorch's exact semantics at the edges -------------------------------------------


def torch_xent(x, labels, **kw):
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    w = kw.pop("weight", None)
    if w is not None:
        kw["weight"] = torch.tensor(w.astype(np.float64))
    loss = F.cross_entropy(xt, torch.tensor(labels), **kw)
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


def same(actual, want):
    np.testing.assert_allclose(np.asarray(actual, np.float64), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_xent_plus_inf_logit_is_a_nan_row(path, reduction, label, smoothing, blocked):
    inf = np.inf
    x = np.array([[inf, 0.0, 1.0], [1.0, 2.0, 0.5], [3.0, -inf, 0.0]], np.float32)
    labels = np.array([label, 1, 0])
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    want = torch_xent(x, labels, **kw)
    with gradcore.use_fast_paths(path == "fast"):
        got = xent(x, labels, **kw)
    same(got[0], want[0])
    same(got[1], want[1])


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize(
    "case", ["all-ignored", "all-weights-zero", "zero-weights-some-ignored", "partial"]
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_xent_zero_divisor_like_torch(path, smoothing, case, reduction, blocked):
    x = np.array([[1.0, 0.0, -1.0], [1.0, 2.0, 0.5], [0.3, 0.1, 0.2], [2.0, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 2])
    weight = np.array([0.0, 0.0, 2.0])
    if case == "all-ignored":
        labels[:] = -100
        weight = np.array([1.0, 2.0, 3.0])
    elif case == "all-weights-zero":
        labels = np.array([0, 1, 0, 1])
    elif case == "zero-weights-some-ignored":
        labels = np.array([0, -100, 1, -100])
    kw = {"weight": weight, "label_smoothing": smoothing, "reduction": reduction}
    want = torch_xent(x, labels, **kw)
    with gradcore.use_fast_paths(path == "fast"):
        got = xent(x, labels, **kw)
        same(got[0], want[0])
        same(got[1], want[1])
        # z-loss (not in PyTorch) follows the same rule: a zero divisor gives NaN rows
        zl, zg = xent(x, labels, z_loss=1e-2, **kw)
    if reduction == "mean" and case != "partial":
        assert np.isnan(zl)
        np.testing.assert_array_equal(np.isnan(zg), np.isnan(want[1]))
        np.testing.assert_array_equal(zg[~np.isnan(want[1])], 0.0)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_huge_values_like_torch(path, weighted):
    p = np.full((4, 4), 3e38, np.float32)
    t = np.zeros_like(p)
    pt = torch.tensor(p, requires_grad=True)
    want = F.mse_loss(pt, torch.tensor(t))
    want.backward()
    w = np.ones_like(p) if weighted else None
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = mse(p, t, weight=w)
    np.testing.assert_allclose(grad, pt.grad.numpy(), rtol=1e-6)  # 3.75e37, not inf
    assert np.isinf(loss)
    assert np.isinf(want.item())


# --- item 8: gradient destinations that are not C-contiguous ---------------------------------


def _dests(shape, dtype):
    big = np.zeros((shape[0] * 2, shape[1] * 3), dtype)
    return {
        "F": np.zeros(shape, dtype, order="F"),
        "transposed": np.zeros(shape[::-1], dtype).T,
        "strided": big[::2, ::3],
        "reversed": np.zeros(shape, dtype)[::-1, ::-1],
    }


@pytest.mark.parametrize("dest", ["F", "transposed", "strided", "reversed"])
@pytest.mark.parametrize("kernel", ["mse", "bce", "xent", "mse-weight"])
@pytest.mark.parametrize("mode", ["out", "inplace"])
@pytest.mark.parametrize("size", ["small", "big"])
def test_any_gradient_layout(dest, kernel, mode, size):
    rng = np.random.default_rng(0)
    shape = (3, 5) if size == "small" else (600, 700)
    p = rng.standard_normal(shape).astype(np.float32)
    t = rng.random(shape).astype(np.float32)
    fn = {
        "mse": lambda a, **kw: mse(a, t, **kw),
        "mse-weight": lambda a, **kw: mse(a, t, weight=t, **kw),
        "bce": lambda a, **kw: bce(a, t, **kw),
        "xent": lambda a, **kw: xent(a, rng_labels, **kw),
    }[kernel]
    rng_labels = np.arange(shape[0]) % shape[1]
    want_loss, want_grad = fn(p.copy())
    d = _dests(shape, np.float32)[dest]
    if mode == "out":
        loss, grad = fn(p, out=d)
    else:
        d[...] = p
        loss, grad = fn(d, inplace=True)
    assert grad is d
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)


# --- item 9: changing the thread count while kernels run --------------------------------------


def test_set_num_threads_while_kernels_run(monkeypatch):
    monkeypatch.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setattr(fast, "BLOCK_BYTES", 4096)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype(np.float32)
    labels = rng.integers(0, 16, 512)
    want = xent(x, labels)
    want_mse = mse(x, x * 0.5)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run_kernels() -> None:
        try:
            while not stop.is_set():
                _loss, grad = xent(x, labels)
                np.testing.assert_array_equal(grad, want[1])
                np.testing.assert_array_equal(mse(x, x * 0.5)[1], want_mse[1])
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def toggle() -> None:
        try:
            k = 0
            while not stop.is_set():
                gradcore.set_num_threads(1 + k % 4)
                k += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    workers = [threading.Thread(target=run_kernels) for _ in range(3)]
    workers.append(threading.Thread(target=toggle))
    try:
        for t in workers:
            t.start()
        stop.wait(3.0)
        stop.set()
        for t in workers:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in workers), "a kernel hung"
    finally:
        stop.set()
        gradcore.set_num_threads(None)
    assert not errors, errors[0]


# --- item 12 (options of the losses): refused, not coerced ------------------------------------


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize(
    "kw",
    [
        {"label_smoothing": "0.1"},
        {"label_smoothing": True},
        {"z_loss": "0.1"},
        {"z_loss": False},
        {"check_labels": 1},
        {"check_labels": "yes"},
    ],
)
def test_xent_options_are_not_coerced(path, kw):
    x, labels = np.zeros((2, 3)), np.array([0, 1])
    name = next(iter(kw))
    with gradcore.use_fast_paths(path == "fast"), pytest.raises(TypeError, match=name):
        xent(x, labels, **kw)


@pytest.mark.parametrize("bad", ["no", 0, 1, None])
def test_use_fast_paths_wants_a_bool(bad):
    with pytest.raises(TypeError, match="use_fast_paths"), gradcore.use_fast_paths(bad):
        pass


@pytest.mark.parametrize("kernel", ["xent", "mse", "bce"])
def test_bad_thread_environment_fails_on_first_small_call(kernel, monkeypatch):
    monkeypatch.setenv("GRADCORE_NUM_THREADS", "two")
    gradcore.set_num_threads(None)
    x = np.zeros((2, 3), np.float32)
    call = {
        "xent": lambda: xent(x, np.array([0, 1])),
        "mse": lambda: mse(x, x),
        "bce": lambda: bce(x, x),
    }[kernel]
    with pytest.raises(ValueError, match="GRADCORE_NUM_THREADS"):
        call()
    monkeypatch.setenv("GRADCORE_NUM_THREADS", "2")
    call()


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_xent_other_non_finite_rows_like_torch(path, reduction, blocked):
    inf, nan = np.inf, np.nan
    x = np.array([[-inf, 0.0, 1.0], [-inf, -inf, -inf], [nan, 0.0, 1.0], [1.0, 2.0, 0.5]])
    labels = np.array([0, 1, 2, 1])
    want = torch_xent(x, labels, reduction=reduction)
    with gradcore.use_fast_paths(path == "fast"):
        got = xent(x, labels, reduction=reduction)
    same(got[0], want[0])
    same(got[1], want[1])


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_xent_ignored_rows_never_get_a_gradient(path, blocked):
    """The documented difference: PyTorch gives NaN rows here; an ignored row is inert."""
    x = np.array([[np.inf, 0.0], [np.nan, 1.0], [1.0, 2.0]])
    labels = np.array([-100, -100, 1])
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = xent(x, labels, label_smoothing=0.1, z_loss=1e-3)
    want_loss, want_grad, _, _ = ref_xent(x[2:], labels[2:], eps=0.1, z=1e-3)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_array_equal(grad[:2], 0.0)
    np.testing.assert_allclose(grad[2:], want_grad, rtol=1e-12)


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_z_loss_of_a_huge_lse_does_not_overflow_early(path):
    """z * lse**2 = 1e-4 * (1.8e19)**2 = 3.4e34 fits float32; lse**2 alone does not."""
    x = np.array([[1.8446744e19, 0.0]], np.float32)
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = xent(x, np.array([0]), z_loss=1e-4)
    lse = float(x[0, 0])
    np.testing.assert_allclose(float(loss), 1e-4 * lse * lse, rtol=1e-6)
    np.testing.assert_allclose(grad, [[2e-4 * lse, 0.0]], rtol=1e-6)


_edge64 = st.one_of(
    st.floats(-5, 5),
    st.floats(690, 709.78),
    st.floats(-760, -700),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    repeat=st.sampled_from([1, 1000]),
    eps=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-4]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    data=st.data(),
)
def test_xent_soft_labels_any_finite_input(dtype, shape, repeat, eps, z, weighted, reduction, data):
    elements = _edge if dtype == np.float32 else _edge64
    x = data.draw(hnp.arrays(dtype, shape, elements=elements))
    mass = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0, 1)))
    mass[:, 0] += 1e-3  # some target mass in every row
    labels = (mass / mass.sum(axis=1, keepdims=True)).astype(dtype)
    x, labels = np.tile(x, (repeat, 1)), np.tile(labels, (repeat, 1))
    weight = np.linspace(0.5, 2.0, shape[1]).astype(dtype) if weighted else None
    check_xent_both_paths(x, labels, dtype, weight=weight, eps=eps, z=z, reduction=reduction, k=32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=_edge64),
    repeat=st.sampled_from([1, 1000]),
    eps=st.sampled_from([0.0, 0.1]),
    z=st.sampled_from([0.0, 1e-4]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    data=st.data(),
)
def test_xent_any_finite_float64_input(x, repeat, eps, z, reduction, data):
    N, C = x.shape
    picks = data.draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N))
    x, labels = np.tile(x, (repeat, 1)), np.tile(np.asarray(picks), repeat)
    check_xent_both_paths(x, labels, np.float64, eps=eps, z=z, reduction=reduction, k=32)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("soft", [False, True])
def test_xent_logits_near_the_float64_maximum(path, soft, blocked):
    """W * lse and sum_c w_c x_c overflow separately; their difference does not."""
    x = np.array([[0.0, 8.99e307], [-8.99e307, 0.0], [1.0, 2.0]])
    labels = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]) if soft else np.array([1, 1, 0])
    weight = np.array([0.5, 2.0])
    eps = 0.0 if soft else 0.1  # the overflowing sum: the targets' or the smoothing's
    kw = {"weight": weight, "label_smoothing": eps, "reduction": "none"}
    want_loss, want_grad, _, _ = ref_xent(x, labels, weight=weight, eps=eps, reduction="none")
    with gradcore.use_fast_paths(path == "fast"):
        loss, grad = xent(x, labels, **kw)
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-300)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([np.float32, np.float64]),
    n=st.integers(1, 40),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    weighted=st.booleans(),
    blocked_=st.booleans(),
    data=st.data(),
)
def test_bce_and_mse_any_finite_input(dtype, n, reduction, weighted, blocked_, data):
    width = 32 if dtype == np.float32 else 64
    # up to max/4: a difference x - y that overflows the dtype is inf (and inf * 0 NaN)
    # on every path and in PyTorch
    big = float(np.finfo(dtype).max) / 4
    x = data.draw(hnp.arrays(dtype, n, elements=st.floats(-big, big, width=width)))
    y = data.draw(hnp.arrays(dtype, n, elements=st.floats(0, 1, width=width)))
    w = data.draw(hnp.arrays(dtype, n, elements=st.floats(0, 4, width=width))) if weighted else None
    tiny = float(np.finfo(dtype).tiny)
    scale = 1.0 / n if reduction == "mean" else 1.0
    w64 = np.ones(n) if w is None else w.astype(np.float64)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    # float64 references (BCE: softplus written out; MSE: the difference), with bounds
    sp_pos = np.maximum(x64, 0) + np.log1p(np.exp(-np.abs(x64)))
    sp_neg = np.maximum(-x64, 0) + np.log1p(np.exp(-np.abs(x64)))
    sig = np.where(
        x64 >= 0, 1 / (1 + np.exp(-np.abs(x64))), np.exp(-np.abs(x64)) / (1 + np.exp(-np.abs(x64)))
    )
    ax = np.abs(x64) + 1
    refs = {
        "bce": (w64 * (y64 * sp_neg + (1 - y64) * sp_pos), w64 * (sig - y64) * scale,
                w64 * (y64 * sp_neg + (1 - y64) * sp_pos + 1), w64 * (sig + y64) * scale),
        "mse": ((w64 * (x64 - y64)) * (x64 - y64), (x64 - y64) * (2 * scale) * w64,
                (w64 * ax) * ax, ax * (2 * scale) * w64),
    }  # fmt: skip
    for name, fn in (("bce", bce), ("mse", mse)):
        el, g, el_b, g_b = refs[name]
        with np.errstate(over="ignore"):
            total = el.sum()
        if reduction == "mean" and not total <= np.finfo(dtype).max and np.isfinite(el).all():
            continue  # a finite mean of a sum that overflows: PyTorch's inf, or exact, both fine
        loss_ref = {"none": el, "sum": total, "mean": total / n}[reduction]
        loss_b = {"none": el_b, "sum": el_b.sum(), "mean": el_b.mean()}[reduction]
        for path in ("fast", "generic"):
            with pytest.MonkeyPatch.context() as mp:
                if blocked_:
                    mp.setattr(fast, "BLOCK_BYTES", 64)
                    mp.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)
                    mp.setattr(fast, "SMALL_BYTES", 0)
                with gradcore.use_fast_paths(path == "fast"), np.errstate(over="ignore"):
                    loss, grad = fn(x, y, weight=w, reduction=reduction)
            assert_within(grad, g, g_b, dtype, k=16, atol=4 * tiny, what=f"{path} {name} grad")
            assert_within(loss, loss_ref, loss_b, dtype, k=16 + 2 * n, what=f"{path} {name} loss")


@pytest.mark.parametrize("kernel", ["bce", "mse"])
def test_loss_sums_beyond_float64_do_not_crash(kernel, blocked):
    """Finite block partials whose exact sum overflows: inf, as in PyTorch (not an error)."""
    x, y = np.zeros(64), np.ones(64)
    if kernel == "bce":  # one term of 1e308 in each block of 8
        x[::8] = -1e308
    else:  # one square of 1.69e308 in each block of 32
        x[::32], y[:] = 1.3e154, 0.0
    fn = bce if kernel == "bce" else mse
    with np.errstate(over="ignore"):
        loss, grad = fn(x, y, reduction="sum")
    assert np.isinf(loss)
    assert np.isfinite(grad).all()


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("n", [1000, 600_000])
def test_mse_overflowing_total_is_inf_without_a_warning(n, small_blocks, request):
    # PyTorch gives inf for a float32 mean whose sum of squares overflows, quietly.
    if small_blocks:
        request.getfixturevalue("blocked")
    p = np.full(n, 1e19, np.float32)
    torch = pytest.importorskip("torch")
    t = torch.tensor(p, requires_grad=True)
    want = torch.nn.functional.mse_loss(t, torch.zeros(n))
    want.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = mse(p, np.zeros(n, np.float32))
    assert np.isinf(want.item())
    assert np.isinf(loss)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-6)
