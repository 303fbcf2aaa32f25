"""The NumPy fast paths: equal to PyTorch autograd and to the generic path, for every option.

References are PyTorch's own losses differentiated by autograd in float64 (plus the
z-loss term written out in PyTorch), never the code under test. A spy on the blocked
loop proves that each call really took the fast path.
"""

from __future__ import annotations

import itertools

import array_api_compat.numpy as np_compat
import numpy as np
import pytest

import gradcore
from gradcore._dispatch import fast_path_for

torch = pytest.importorskip("torch")
F = torch.nn.functional
fast = pytest.importorskip("gradcore.backends.numpy")

RTOL = {np.float64: 1e-12, np.float32: 1e-5}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the blocked loops run by the fast paths (one per fast-path call)."""
    calls: list[int] = []
    original = fast._parallel

    def counting(n_rows: int, *args: object) -> None:
        calls.append(n_rows)
        original(n_rows, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(fast, "_parallel", counting)
    return calls


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows, so that small inputs span many blocks and a ragged one."""
    monkeypatch.setattr(fast, "BLOCK_BYTES", 256)
    monkeypatch.setattr(fast, "TRANSPOSED_BLOCK_ROWS", 4)
    monkeypatch.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)


def close(actual: np.ndarray, desired: np.ndarray, rtol: float, scale: float = 0.0) -> None:
    """Relative closeness, scaled by the largest reference entry (or ``scale``) when tiny."""
    desired = np.asarray(desired, dtype=np.float64)
    scale = max(scale, float(np.max(np.abs(desired))) if desired.size else 0.0)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), desired, rtol=rtol, atol=rtol * scale
    )


def check_result(
    result: tuple[np.ndarray, np.ndarray],
    ref: tuple[np.ndarray, np.ndarray],
    dtype: type,
    scale: float = 0.0,
) -> None:
    loss, grad = result
    assert isinstance(loss, np.ndarray), type(loss)
    assert loss.dtype == dtype
    assert grad.dtype == dtype
    assert loss.shape == ref[0].shape
    assert grad.shape == ref[1].shape
    close(loss, ref[0], RTOL[dtype], scale)
    close(grad, ref[1], RTOL[dtype], min(scale, 1.0))


# --- references -------------------------------------------------------------------------


def torch_xent(x, labels, *, axis=-1, weight=None, ignore_index=-100, eps=0.0, reduction="mean",
               z=0.0):  # fmt: skip
    """F.cross_entropy (class axis moved to dim 1) plus z * lse**2, by float64 autograd."""
    if x.ndim == 1:  # unbatched: PyTorch takes (C,) with a 0-d label as it is
        axis = 0
    cls = min(1, x.ndim - 1)
    xt = torch.tensor(np.moveaxis(x.astype(np.float64), axis, cls), requires_grad=True)
    soft = np.issubdtype(labels.dtype, np.floating)
    yt = torch.tensor(np.moveaxis(labels.astype(np.float64), axis, cls) if soft else labels)
    wt = None if weight is None else torch.tensor(weight.astype(np.float64))
    opts = {"weight": wt, "ignore_index": ignore_index, "label_smoothing": eps}
    if z == 0.0:
        loss = F.cross_entropy(xt, yt, reduction=reduction, **opts)
    else:
        rows = F.cross_entropy(xt, yt, reduction="none", **opts)
        lse = torch.logsumexp(xt, dim=cls)
        if soft:
            active = torch.ones_like(lse)
            divisor = float(lse.numel())
        else:
            active = (yt != ignore_index).double()
            w_y = torch.ones_like(lse) if wt is None else wt[yt.clamp(min=0)]
            divisor = (w_y * active).sum()
        rows = rows + z * lse**2 * active
        loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / divisor}[reduction]
    loss.sum().backward()
    grad = np.moveaxis(xt.grad.numpy(), cls, axis)
    return loss.detach().numpy(), grad


def torch_mse(p, t, *, weight=None, reduction="mean"):
    pt = torch.tensor(p.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64))
    if weight is None:
        loss = F.mse_loss(pt, tt, reduction=reduction)
    else:
        e = torch.tensor(weight.astype(np.float64)) * (pt - tt) ** 2
        loss = {"none": e, "sum": e.sum(), "mean": e.mean()}[reduction]
    loss.sum().backward()
    return loss.detach().numpy(), pt.grad.numpy()


def torch_bce(x, y, *, weight=None, pos_weight=None, reduction="mean"):
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    opts = {
        "weight": None if weight is None else torch.tensor(weight.astype(np.float64)),
        "pos_weight": None if pos_weight is None else torch.tensor(pos_weight.astype(np.float64)),
    }
    loss = F.binary_cross_entropy_with_logits(
        xt, torch.tensor(y.astype(np.float64)), reduction=reduction, **opts
    )
    loss.sum().backward()
    return loss.detach().numpy(), xt.grad.numpy()


def generic(fn, *args, **kwargs):
    with gradcore.use_fast_paths(False):
        return fn(*args, **kwargs)


def readonly(*arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is not None:
            a.flags.writeable = False


# --- inputs -----------------------------------------------------------------------------


def xent_inputs(rng, shape, axis, dtype, soft, ignore_index=-100):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C = shape[axis]
    if soft:
        p = rng.random(shape) ** 3
        labels = (p / p.sum(axis=axis, keepdims=True)).astype(dtype)
    else:
        rows = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
        labels = rng.integers(0, C, size=rows)
        if labels.size > 1:
            labels.reshape(-1)[::5] = ignore_index
    return x, labels


# --- softmax cross-entropy --------------------------------------------------------------


def test_fast_paths_are_registered() -> None:
    assert fast_path_for("softmax_cross_entropy", np_compat) is fast.softmax_cross_entropy
    assert fast_path_for("mse", np_compat) is fast.mse
    assert fast_path_for("binary_cross_entropy_with_logits", np_compat) is (
        fast.binary_cross_entropy_with_logits
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
@pytest.mark.parametrize("weighted", [False, True], ids=["nowt", "wt"])
@pytest.mark.parametrize(("eps", "z"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_xent_matches_torch_and_generic(spy, small_blocks, dtype, soft, weighted, eps, z,
                                        reduction) -> None:  # fmt: skip
    rng = np.random.default_rng(7)
    x, labels = xent_inputs(rng, (23, 9), -1, dtype, soft)
    weight = rng.random(9).astype(dtype) + 0.1 if weighted else None
    readonly(x, labels, weight)
    opts = {"weight": weight, "label_smoothing": eps, "reduction": reduction, "z_loss": z}
    result = gradcore.softmax_cross_entropy(x, labels, **opts)
    assert spy, "the NumPy fast path did not run"
    ref = torch_xent(x, labels, weight=weight, eps=eps, reduction=reduction, z=z)
    check_result(result, ref, dtype)
    check_result(result, generic(gradcore.softmax_cross_entropy, x, labels, **opts), dtype)


@pytest.mark.parametrize(
    ("shape", "axis", "layout"),
    [
        ((11, 7), 0, "C"),
        ((11, 7), -1, "F"),
        ((11, 7), 0, "F"),
        ((11, 14), -1, "strided"),
        ((3, 7, 5), 1, "C"),
        ((3, 5, 7), -1, "F"),
        ((7,), 0, "C"),
    ],
)
@pytest.mark.parametrize("soft", [False, True], ids=["int", "soft"])
@pytest.mark.parametrize("mode", ["new", "out", "out_F", "inplace"])
def test_xent_layouts_and_memory_modes(spy, small_blocks, shape, axis, layout, soft, mode):
    rng = np.random.default_rng(3)
    x, labels = xent_inputs(rng, shape, axis, np.float64, soft)
    if layout == "F":
        x, labels = np.asfortranarray(x), np.asfortranarray(labels)
    elif layout == "strided":
        x = x[:, ::2]
        if soft:
            labels = labels[:, ::2] / labels[:, ::2].sum(axis=-1, keepdims=True)
        else:
            labels = np.where(labels >= 0, labels % x.shape[1], labels)
    ref = torch_xent(x, labels, axis=axis, eps=0.1, z=1e-3)
    kwargs = {"axis": axis, "label_smoothing": 0.1, "z_loss": 1e-3}
    before = x.copy()
    if mode == "inplace":
        loss, grad = gradcore.softmax_cross_entropy(x, labels, inplace=True, **kwargs)
        assert grad is x
    elif mode.startswith("out"):
        out = np.zeros_like(x, order="F" if mode == "out_F" else "C")
        loss, grad = gradcore.softmax_cross_entropy(x, labels, out=out, **kwargs)
        assert grad is out
        np.testing.assert_array_equal(x, before)
    else:
        readonly(x, labels)
        loss, grad = gradcore.softmax_cross_entropy(x, labels, **kwargs)
        assert not np.shares_memory(grad, x)
    assert spy
    check_result((loss, grad), ref, np.float64)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_xent_ignore_index(spy, small_blocks, ignore_index, weighted) -> None:
    rng = np.random.default_rng(5)
    x, labels = xent_inputs(rng, (19, 6), -1, np.float64, False, ignore_index)
    weight = rng.random(6) + 0.5 if weighted else None
    for eps, z in [(0.0, 0.0), (0.3, 0.01)]:
        result = gradcore.softmax_cross_entropy(
            x, labels, weight=weight, ignore_index=ignore_index, label_smoothing=eps, z_loss=z
        )
        ref = torch_xent(x, labels, weight=weight, ignore_index=ignore_index, eps=eps, z=z)
        check_result(result, ref, np.float64)
        ignored = labels == ignore_index
        assert np.all(result[1][ignored] == 0.0)
    assert spy


def test_xent_all_rows_ignored_is_nan_like_torch(spy) -> None:
    x = np.ones((3, 4))
    labels = np.full(3, -100)
    loss, grad = gradcore.softmax_cross_entropy(x, labels)
    ref_loss, _ = torch_xent(x, labels)
    assert np.isnan(loss)
    assert np.isnan(ref_loss)
    _g_loss, g_grad = generic(gradcore.softmax_cross_entropy, x, labels)
    np.testing.assert_array_equal(grad, g_grad)
    assert spy


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_xent_extreme_logits(spy, small_blocks, dtype) -> None:
    """Rows that overflow exp or sum to almost nothing take the max-shifted route."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 5)).astype(dtype)
    x[0] += 1000.0
    x[1] -= 1000.0
    x[2, 1] = 800.0
    x[3, :] = -60.0
    x[3, 2] = -30.0
    x[4, 3] = -np.inf  # a masked class: probability 0
    labels = np.array([0, 1, 1, 2, 0, 4, 3, 2])
    for soft, eps in itertools.product((False, True), (0.0, 0.1)):
        y = np.eye(5, dtype=dtype)[labels] if soft else labels
        # PyTorch gives NaN for a -inf logit with smoothing or soft targets (0 * -inf);
        # gradcore's masked-class rule is compared with the generic path instead.
        xs = np.where(np.isneginf(x), 0.0, x).astype(dtype) if eps or soft else x
        if soft and not eps:
            masked = gradcore.softmax_cross_entropy(x, y)
            check_result(masked, generic(gradcore.softmax_cross_entropy, x, y), dtype)
        ref = torch_xent(xs, y, eps=eps)
        check_result(gradcore.softmax_cross_entropy(xs, y, label_smoothing=eps), ref, dtype)
        check_result(
            gradcore.softmax_cross_entropy(xs.copy(), y, label_smoothing=eps, inplace=True),
            ref,
            dtype,
        )
    assert spy


def test_xent_bad_labels() -> None:
    x = np.zeros((4, 3))
    labels = np.array([0, 3, 1, -1])
    with pytest.raises(ValueError, match="out of range") as fast_err:
        gradcore.softmax_cross_entropy(x, labels)
    with pytest.raises(ValueError, match="out of range") as generic_err:
        generic(gradcore.softmax_cross_entropy, x, labels)
    assert str(fast_err.value) == str(generic_err.value)
    for reduction in ("mean", "none"):
        loss, grad = gradcore.softmax_cross_entropy(
            x, labels, check_labels=False, reduction=reduction
        )
        assert np.all(np.isnan(grad[[1, 3]]))
        assert np.all(np.isfinite(grad[[0, 2]]))
        g_loss, g_grad = generic(
            gradcore.softmax_cross_entropy, x, labels, check_labels=False, reduction=reduction
        )
        np.testing.assert_allclose(loss, g_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, g_grad, rtol=1e-12)


def test_xent_errors_match_generic() -> None:
    x = np.zeros((4, 3))
    labels = np.array([0, 1, 2, 0])
    bad_calls = [
        {"out": np.zeros((4, 4))},
        {"out": np.zeros((4, 3), dtype=np.float32)},
        {"weight": np.ones(4)},
        {"axis": 2},
        {"reduction": "avg"},
        {"label_smoothing": 1.5},
        {"out": np.zeros((4, 3)), "inplace": True},
    ]
    for kwargs in bad_calls:
        with pytest.raises((TypeError, ValueError)) as fast_err:
            gradcore.softmax_cross_entropy(x, labels, **kwargs)
        with pytest.raises(type(fast_err.value)) as generic_err:
            generic(gradcore.softmax_cross_entropy, x, labels, **kwargs)
        assert str(fast_err.value) == str(generic_err.value)


def test_inplace_on_read_only_raises() -> None:
    x = np.zeros((4, 3))
    readonly(x)
    with pytest.raises(ValueError, match="read-only"):
        gradcore.softmax_cross_entropy(x, np.array([0, 1, 2, 0]), inplace=True)
    with pytest.raises(ValueError, match="read-only"):
        gradcore.mse(x, np.ones((4, 3)), inplace=True)
    with pytest.raises(ValueError, match="read-only"):
        gradcore.binary_cross_entropy_with_logits(x, np.ones((4, 3)), inplace=True)
    out = np.zeros((4, 3))
    readonly(out)
    with pytest.raises(ValueError, match="read-only"):
        gradcore.mse(np.ones((4, 3)), x, out=out)


def test_out_aliasing_the_labels_is_safe(small_blocks) -> None:
    """out= that is the soft labels' own buffer still reads every label before writing."""
    rng = np.random.default_rng(2)
    x, labels = xent_inputs(rng, (9, 5), -1, np.float64, True)
    ref = torch_xent(x, labels)
    loss, grad = gradcore.softmax_cross_entropy(x, labels, out=labels)
    assert grad is labels
    check_result((loss, grad), ref, np.float64)


@pytest.mark.parametrize("soft", [False, True])
def test_threads_give_identical_results(small_blocks, soft) -> None:
    rng = np.random.default_rng(9)
    x, labels = xent_inputs(rng, (61, 13), -1, np.float32, soft)
    results = []
    try:
        for n in (1, 2, 3):
            gradcore.set_num_threads(n)
            results.append(gradcore.softmax_cross_entropy(x, labels, label_smoothing=0.1))
            results.append(gradcore.mse(x, x * 0.5))
            results.append(gradcore.binary_cross_entropy_with_logits(x, (x > 0) * 1.0))
    finally:
        gradcore.set_num_threads(None)
    for a, b in itertools.pairwise(results[::3]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for k in (1, 2):
        for a, b in itertools.pairwise(results[k::3]):
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_large_rows_span_blocks() -> None:
    """Default block size: a row longer than a block, and a ragged last block."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 70_001)).astype(np.float32)
    labels = rng.integers(0, 70_001, size=5)
    check_result(gradcore.softmax_cross_entropy(x, labels), torch_xent(x, labels), np.float32)
    x = rng.standard_normal((1001, 333))
    labels = rng.integers(0, 333, size=1001)
    check_result(gradcore.softmax_cross_entropy(x, labels), torch_xent(x, labels), np.float64)


def test_unsupported_dtype_falls_back(spy) -> None:
    x = np.zeros((4, 3), dtype=np.float16)
    loss, grad = gradcore.softmax_cross_entropy(x, np.array([0, 1, 2, 0]))
    assert not spy
    assert loss.dtype == np.float16
    assert grad.dtype == np.float16
    np.testing.assert_allclose(float(loss), np.log(3.0), rtol=1e-3)


# --- MSE and BCE ------------------------------------------------------------------------


def weights_for(kind: str, shape: tuple[int, ...], rng: np.random.Generator, dtype):
    if kind == "none":
        return None
    if kind == "full":
        return rng.random(shape).astype(dtype)
    return rng.random(shape[-1]).astype(dtype)  # broadcast along the last axis


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("wkind", ["none", "full", "row"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_mse_matches_torch(spy, small_blocks, dtype, wkind, reduction, layout) -> None:
    rng = np.random.default_rng(1)
    p = rng.standard_normal((17, 6)).astype(dtype)
    t = rng.standard_normal((17, 6)).astype(dtype)
    if layout == "F":
        p = np.asfortranarray(p)
    elif layout == "strided":
        p, t = p[::2], t[::2]
    w = weights_for(wkind, p.shape, rng, dtype)
    readonly(p, t, w)
    result = gradcore.mse(p, t, weight=w, reduction=reduction)
    assert spy
    check_result(result, torch_mse(p, t, weight=w, reduction=reduction), dtype)
    check_result(result, generic(gradcore.mse, p, t, weight=w, reduction=reduction), dtype)


def test_mse_memory_modes(small_blocks) -> None:
    rng = np.random.default_rng(8)
    p, t = rng.standard_normal((2, 50, 4))
    ref = torch_mse(p, t)
    out = np.empty_like(p)
    check_result(gradcore.mse(p, t, out=out), ref, np.float64)
    assert gradcore.mse(p, t, out=out)[1] is out
    q = p.copy()
    loss, grad = gradcore.mse(q, t, inplace=True)
    assert grad is q
    check_result((loss, grad), ref, np.float64)
    # out= the target's own buffer: still correct
    t2 = t.copy()
    check_result(gradcore.mse(p, t2, out=t2), ref, np.float64)
    with pytest.raises(ValueError, match="shape"):
        gradcore.mse(p, t, out=np.empty((5, 4)))
    with pytest.raises(TypeError, match="dtype"):
        gradcore.mse(p, t, out=np.empty_like(p, dtype=np.float32))
    # 0-d input and integer targets
    check_result(gradcore.mse(np.array(1.5), np.array(3)), torch_mse(np.array(1.5), np.array(3.0)),
                 np.float64)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("wkind", ["none", "full", "row"])
@pytest.mark.parametrize("pos", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_torch(spy, small_blocks, dtype, wkind, pos, reduction) -> None:
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((15, 4)) * 6).astype(dtype)
    x[0, 0], x[1, 1] = 40.0, -40.0
    y = rng.random((15, 4)).astype(dtype)
    y[:5] = np.round(y[:5])
    w = weights_for(wkind, x.shape, rng, dtype)
    q = rng.random(4).astype(dtype) * 3 if pos else None
    readonly(x, y, w, q)
    result = gradcore.binary_cross_entropy_with_logits(
        x, y, weight=w, pos_weight=q, reduction=reduction
    )
    assert spy
    check_result(result, torch_bce(x, y, weight=w, pos_weight=q, reduction=reduction), dtype)


def test_bce_memory_modes_and_layouts(small_blocks) -> None:
    rng = np.random.default_rng(12)
    x = np.asfortranarray(rng.standard_normal((20, 3)) * 4)
    y = (rng.random((20, 3)) > 0.5).astype(bool)
    ref = torch_bce(x, y.astype(np.float64))
    out = np.empty_like(x)
    loss, grad = gradcore.binary_cross_entropy_with_logits(x, y, out=out)
    assert grad is out
    check_result((loss, grad), ref, np.float64)
    z = x.copy()
    loss, grad = gradcore.binary_cross_entropy_with_logits(z, y, inplace=True)
    assert grad is z
    check_result((loss, grad), ref, np.float64)


@pytest.mark.parametrize("extreme", [False, True])
def test_inplace_column_major_takes_max_first(monkeypatch, extreme) -> None:
    """In place on wide column-major blocks: the row maxima are found before exp."""
    monkeypatch.setattr(fast, "BLOCK_BYTES", 64)
    monkeypatch.setattr(fast, "TRANSPOSED_BLOCK_ROWS", 4)
    monkeypatch.setattr(fast, "MIN_PARALLEL_ELEMENTS", 0)
    rng = np.random.default_rng(13)
    x = np.asfortranarray(rng.standard_normal((18, 7)))
    if extreme:
        x[2] += 900.0
        x[5] -= 900.0
        x[9, 3] = -np.inf
    labels = rng.integers(0, 7, size=18)
    ref = torch_xent(x, labels, z=1e-3)
    calls: list[int] = []
    original = fast._exp_rows_inplace
    monkeypatch.setattr(fast, "_exp_rows_inplace", lambda *a: calls.append(1) or original(*a))
    loss, grad = gradcore.softmax_cross_entropy(x, labels, z_loss=1e-3, inplace=True)
    assert calls
    assert grad is x
    check_result((loss, grad), ref, np.float64)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    data=st.data(),
)
def test_xent_random_options_match_generic(shape, data) -> None:
    """Random shapes, class axes, layouts and options: fast path == generic path."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    soft = data.draw(st.booleans())
    fortran = data.draw(st.booleans())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    x, labels = xent_inputs(rng, shape, axis, np.float64, soft)
    if fortran:
        x = np.asfortranarray(x)
    opts = {
        "axis": axis,
        "reduction": data.draw(st.sampled_from(["mean", "sum", "none"])),
        "label_smoothing": data.draw(st.sampled_from([0.0, 0.25])),
        "z_loss": data.draw(st.sampled_from([0.0, 0.01])),
        "weight": rng.random(shape[axis]) + 0.1 if data.draw(st.booleans()) else None,
    }
    expected = generic(gradcore.softmax_cross_entropy, x, labels, **opts)
    if not soft and np.all(labels == -100) and opts["reduction"] == "mean":
        return  # NaN loss: compared in test_xent_all_rows_ignored_is_nan_like_torch
    # A loss is a difference of log-sum-exp and a logit: its error scales with the logits;
    # a gradient entry's error with the O(1) probabilities (it is exactly 0 when C = 1).
    result = gradcore.softmax_cross_entropy(x, labels, **opts)
    check_result(result, expected, np.float64, scale=1.0 + float(np.max(np.abs(x))))
