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
        row = row + z * lse**2
        grad = (tw.sum(axis=1) + 2 * z * lse)[:, None] * p - tw
        a_abs = np.abs(tw).sum(axis=1) + 2 * z * np.abs(lse)
        gb = a_abs[:, None] * pc + np.abs(tw)
        lb = (np.abs(tw) * (np.abs(x) + np.abs(lse)[:, None])).sum(axis=1) + z * lse**2
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
        row = (1 - eps) * wy * (lse - picked) + eps / C * (w * (lse[:, None] - x)).sum(axis=1)
        row = row + z * lse**2
        grad = a[:, None] * p - (1 - eps) * wy[:, None] * onehot - eps / C * w
        a_abs = (1 - eps) * wy + eps / C * np.abs(w).sum() + 2 * z * np.abs(lse)
        gb = a_abs[:, None] * pc + (1 - eps) * wy[:, None] * onehot + eps / C * np.abs(w)
        lb = (1 - eps) * wy * (np.abs(lse) + np.abs(picked)) + z * lse**2
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
    for path in ("fast", "generic"):
        if path == "fast":
            loss, grad = xent(x, labels, **kw)
        else:
            loss, grad = generic(xent, x, labels, **kw)
        assert loss.dtype == dtype, path
        assert grad.dtype == dtype, path
        assert_within(grad, grad_ref, gb, dtype, k=k, atol=atol, what=f"{path} grad")
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
