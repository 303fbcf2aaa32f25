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


# --- activations, linear and the small-input loss paths -----------------------------------
#
# Fast activations must equal the generic bodies bit for bit (NaN positions, infinities,
# signed zeros), and PyTorch's float64 kernels within rounding. VJP references are
# PyTorch's own backward kernels of the output (threshold_backward, sigmoid_backward,
# ...), evaluated in float64 on the same arrays.

UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
ACT_TOL = {np.float32: (2e-7, 1e-44), np.float64: (1e-15, 1e-320)}


def special_values(dtype, n: int = 300, seed: int = 0) -> np.ndarray:
    """Random values of every sign and scale, with NaN, infinities and both zeros."""
    info = np.finfo(dtype)
    fixed = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny, -info.tiny,
             info.smallest_subnormal, -info.smallest_subnormal, info.max, -info.max,
             1.0, -1.0, 1e-3, -1e-3, 20.0, -20.0, 100.0, -100.0, 800.0, -800.0]  # fmt: skip
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal(n) * np.exp(rng.uniform(-6, 6, n))
    with np.errstate(over="ignore"):
        return np.concatenate([np.array(fixed, dtype=dtype), rand.astype(dtype)])


def layouts(a: np.ndarray) -> list[np.ndarray]:
    """C order, Fortran order, a strided view, 1-D and 0-d versions of ``a``'s values."""
    a = a[: 2 * 3 * 40]
    m = a.reshape(6, 40)
    return [m, np.asfortranarray(m), m[::2, 1::3], a, a[4:5].reshape(())]


def assert_same_bits(actual: np.ndarray, desired: np.ndarray) -> None:
    """Same type, dtype, shape, NaN positions; identical bits everywhere else."""
    assert type(actual) is np.ndarray, type(actual)
    assert actual.dtype == desired.dtype
    assert actual.shape == desired.shape
    nan = np.isnan(desired)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    u = UINT[desired.dtype]
    np.testing.assert_array_equal(actual[~nan].view(u), desired[~nan].view(u))


def assert_near(actual: np.ndarray, desired: np.ndarray, dtype, bound=None) -> None:
    """Close to a float64 reference rounded to ``dtype`` (overflow there is inf).

    ``bound`` (per element) scales the absolute tolerance where the formula itself
    cancels, e.g. ``1 - y*y`` for ``y`` near 1, whose rounding error is that of ``y*y``.
    """
    rtol, atol = ACT_TOL[dtype]
    with np.errstate(over="ignore"):
        desired = np.asarray(desired).astype(dtype).astype(np.float64)
    actual = np.asarray(actual, np.float64)
    if bound is None:
        np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, equal_nan=True)
        return
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(desired))
    finite = np.isfinite(desired)
    np.testing.assert_array_equal(actual[~finite], desired[~finite])
    with np.errstate(all="ignore"):
        tol = atol + rtol * np.abs(desired) + 4 * rtol * np.asarray(bound, np.float64)
    err = np.abs(actual - desired)
    assert np.all(err[finite] <= tol[finite]), (actual[finite], desired[finite])


def t64(a: np.ndarray):
    return torch.tensor(np.asarray(a, dtype=np.float64))


FORWARD = {
    "relu": (torch.relu, {}),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.2), {"negative_slope": 0.2}),
    "leaky_relu_steep": (lambda t: F.leaky_relu(t, 3.0), {"negative_slope": 3.0}),
    "sigmoid": (torch.sigmoid, {}),
    "tanh": (torch.tanh, {}),
}
BACKWARD = {
    "relu": (lambda g, y: torch.ops.aten.threshold_backward(g, y, 0), {}),
    "leaky_relu": (
        lambda g, y: torch.ops.aten.leaky_relu_backward(g, y, 0.2, True),
        {"negative_slope": 0.2},
    ),
    "leaky_relu_zero": (
        lambda g, y: torch.ops.aten.leaky_relu_backward(g, y, 0.0, True),
        {"negative_slope": 0.0},
    ),
    "sigmoid": (torch.ops.aten.sigmoid_backward, {}),
    "tanh": (torch.ops.aten.tanh_backward, {}),
}


def _op(name: str) -> str:
    return name.split("_steep")[0].split("_zero")[0]


FAST_KERNELS = ["relu", "relu_vjp", "leaky_relu", "leaky_relu_vjp", "sigmoid", "sigmoid_vjp",
                "tanh", "tanh_vjp", "linear", "linear_vjp"]  # fmt: skip


@pytest.mark.parametrize("name", FAST_KERNELS)
def test_activation_fast_paths_are_registered(name) -> None:
    assert fast_path_for(name, np_compat) is getattr(fast, name)


# inf * 0 and overflow in the special values warn on both paths alike.
quiet = pytest.mark.filterwarnings("ignore:(invalid value|overflow):RuntimeWarning")


@quiet
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(FORWARD))
def test_activation_forward_fast_path(name, dtype) -> None:
    ref_fn, opts = FORWARD[name]
    op = _op(name)
    kernel, fast_fn = getattr(gradcore, op), getattr(fast, op)
    for x in layouts(special_values(dtype)):
        readonly(x)
        direct = fast_fn(x, **opts)
        assert direct is not NotImplemented, "the fast path declined"
        result = kernel(x, **opts)
        assert_same_bits(result, direct)
        assert_same_bits(result, generic(kernel, x, **opts))
        assert_near(result, ref_fn(t64(x)).numpy(), dtype)


@quiet
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(BACKWARD))
def test_activation_vjp_fast_path(name, dtype) -> None:
    ref_fn, opts = BACKWARD[name]
    op = _op(name) + "_vjp"
    kernel, fast_fn = getattr(gradcore, op), getattr(fast, op)
    values = special_values(dtype)
    forward = getattr(gradcore, _op(name))
    with gradcore.use_fast_paths(False):
        outputs = forward(values, **{k: v for k, v in opts.items() if v > 0})
    # Gradients with NaN, infinities and zeros; outputs of the forward (for the PyTorch
    # reference), and raw values of every sign and size (the VJP formula must match the
    # generic one for any y).
    gs = layouts(np.roll(values, 7))
    for ys, reference in ((layouts(outputs), True), (layouts(values), False)):
        for y, g in zip(ys, gs, strict=True):
            readonly(g, y)
            direct = fast_fn(g, y, **opts)
            assert direct is not NotImplemented, "the fast path declined"
            result = kernel(g, y, **opts)
            assert_same_bits(result, direct)
            assert_same_bits(result, generic(kernel, g, y, **opts))
            if not reference:
                continue
            want = ref_fn(t64(g), t64(y)).numpy()
            if name == "relu":
                # PyTorch passes g through where y is NaN; gradcore documents
                # ``g where y > 0, else 0``.
                want = np.where(np.isnan(y), 0.0, want)
            g64, y64 = g.astype(np.float64), y.astype(np.float64)
            bound = {"sigmoid": np.abs(g64 * y64) * (1 + np.abs(y64)),
                     "tanh": np.abs(g64) * (1 + y64 * y64)}.get(name)  # fmt: skip
            assert_near(result, want, dtype, bound)


def test_activation_signed_zeros_and_nan() -> None:
    """The documented values at the kinks: relu keeps -0.0 and NaN, relu_vjp gives +0."""
    x = np.array([-0.0, 0.0, np.nan, -2.0, np.inf, -np.inf], dtype=np.float32)
    y = gradcore.relu(x)
    np.testing.assert_array_equal(np.signbit(y), [True, False, False, False, False, False])
    np.testing.assert_array_equal(y, [0.0, 0.0, np.nan, 0.0, np.inf, 0.0])
    g = np.array([-1.0, np.nan, np.inf, -0.0, np.nan, -np.inf], dtype=np.float32)
    dx = gradcore.relu_vjp(g, y)
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0, 0.0, np.nan, 0.0])
    assert not np.signbit(dx[:4]).any()  # zeros, not -0.0 from g * 0
    dl = gradcore.leaky_relu_vjp(g, y, negative_slope=0.5)
    np.testing.assert_array_equal(dl, [-0.5, np.nan, np.inf, -0.0, np.nan, -np.inf * 0.5])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activation_random_shapes_match_generic(op, dtype) -> None:
    rng = np.random.default_rng(5)
    kernel, vjp = getattr(gradcore, op), getattr(gradcore, op + "_vjp")
    for shape in [(0,), (1,), (3, 0, 2), (7, 1, 5), (2, 3, 4, 5), (64, 129)]:
        x = (rng.standard_normal(shape) * 4).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        readonly(x, g)
        y = kernel(x)
        assert_same_bits(y, generic(kernel, x))
        assert_same_bits(vjp(g, y), generic(vjp, g, y))


def test_activation_errors_match_generic() -> None:
    g = np.zeros((2, 3), dtype=np.float32)
    cases = [
        (gradcore.relu_vjp, (g, np.zeros((3, 2), np.float32)), {}),
        (gradcore.sigmoid_vjp, (g, np.zeros(3, np.float32)), {}),
        (gradcore.tanh_vjp, (g, np.zeros((2, 3, 1), np.float32)), {}),
        (gradcore.leaky_relu_vjp, (g, np.zeros((3,), np.float32)), {}),
        (gradcore.leaky_relu_vjp, (g, g), {"negative_slope": -0.1}),
        (gradcore.leaky_relu_vjp, (g, g), {"negative_slope": float("nan")}),
        (gradcore.leaky_relu, (g,), {"negative_slope": "0.1"}),
        (gradcore.leaky_relu, (g,), {"negative_slope": float("inf")}),
        (gradcore.relu, (np.zeros(3, dtype=np.int32),), {}),
        (gradcore.relu_vjp, (g, np.zeros((2, 3), dtype=np.int64)), {}),
    ]
    for fn, args, opts in cases:
        with pytest.raises((TypeError, ValueError)) as on:
            fn(*args, **opts)
        with gradcore.use_fast_paths(False), pytest.raises(on.type) as off:
            fn(*args, **opts)
        assert str(on.value) == str(off.value)


def test_activation_fallbacks() -> None:
    """float16, mixed dtypes, subclasses and slopes <= 0 go to the generic body."""
    x16 = np.array([-1.0, 0.5, np.nan], dtype=np.float16)
    assert fast.relu(x16) is NotImplemented
    np.testing.assert_array_equal(gradcore.relu(x16), np.array([0.0, 0.5, np.nan], np.float16))
    assert gradcore.sigmoid(x16).dtype == np.float16
    g32, y64 = np.ones(3, np.float32), np.array([1.0, -1.0, 0.0])
    assert fast.relu_vjp(g32, y64) is NotImplemented
    np.testing.assert_array_equal(gradcore.relu_vjp(g32, y64), [1.0, 0.0, 0.0])
    masked = np.ma.masked_array([1.0, -1.0])
    assert fast.relu(masked) is NotImplemented
    x = np.array([np.inf, -np.inf, -1.0, 0.0])
    assert fast.leaky_relu(x, negative_slope=0.0) is NotImplemented
    assert fast.leaky_relu(x, negative_slope=-0.5) is NotImplemented
    assert_same_bits(
        gradcore.leaky_relu(x, negative_slope=-0.5),
        np.array([np.inf, np.inf, 0.5, -0.0]),  # x > 0 ? x : -0.5 x
    )


# --- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("xshape", "bias", "need_dx"),
    [((8, 5), True, True), ((8, 5), False, False), ((2, 3, 5), True, True), ((5,), True, True),
     ((0, 5), True, True)],
)  # fmt: skip
def test_linear_fast_path(xshape, bias, need_dx, dtype) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xshape).astype(dtype)
    W = rng.standard_normal((5, 4)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype) if bias else None
    g = rng.standard_normal((*xshape[:-1], 4)).astype(dtype)
    readonly(x, W, b, g)
    y = gradcore.linear(x, W, b)
    direct = fast.linear(x, W, b)
    assert direct is not NotImplemented
    assert_same_bits(y, direct)
    assert_same_bits(y, generic(gradcore.linear, x, W, b))
    grads = gradcore.linear_vjp(g, x, W, need_dx=need_dx)
    assert fast.linear_vjp(g, x, W, need_dx=need_dx) is not NotImplemented
    expected = generic(gradcore.linear_vjp, g, x, W, need_dx=need_dx)
    for actual, want in zip(grads, expected, strict=True):
        if want is None:
            assert actual is None
        else:
            assert_same_bits(actual, want)
    # PyTorch autograd in float64.
    xt, Wt = t64(x).requires_grad_(True), t64(W).requires_grad_(True)
    bt = t64(b).requires_grad_(True) if bias else torch.zeros(4, dtype=torch.float64,
                                                              requires_grad=True)  # fmt: skip
    out = xt @ Wt + bt
    out.backward(t64(g))
    rtol = RTOL[dtype] * 10
    close(y, out.detach().numpy(), rtol)
    if need_dx:
        close(grads[0], xt.grad.numpy(), rtol)
    close(grads[1], Wt.grad.numpy(), rtol)
    close(grads[2], bt.grad.numpy(), rtol)


def test_linear_fallbacks_and_errors() -> None:
    x, W = np.ones((3, 2), np.float32), np.ones((2, 4), np.float64)
    assert fast.linear(x, W) is NotImplemented  # mixed dtypes: the generic promotes
    assert gradcore.linear(x, W).dtype == np.float64
    W32 = np.ones((2, 4), np.float32)
    cases = [
        (gradcore.linear, (x, np.ones((3, 4), np.float32))),
        (gradcore.linear, (x, W32, np.ones(3, np.float32))),
        (gradcore.linear_vjp, (np.ones((3, 3), np.float32), x, W32)),
        (gradcore.linear_vjp, (np.ones((3, 4), np.float32), x, np.ones(2, np.float32))),
    ]
    for fn, args in cases:
        with pytest.raises(ValueError) as on:
            fn(*args)
        with gradcore.use_fast_paths(False), pytest.raises(ValueError) as off:
            fn(*args)
        assert str(on.value) == str(off.value)


# --- small inputs of the losses -------------------------------------------------------------


@pytest.fixture
def small_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Records whether each direct small-input path produced the result."""
    calls: dict[str, list[bool]] = {"xent": [], "mse": []}
    for key, name in (("xent", "_xent_small"), ("mse", "_mse_small")):
        original = getattr(fast, name)

        def recording(*args, _original=original, _key=key):
            result = _original(*args)
            calls[_key].append(result is not None)
            return result

        monkeypatch.setattr(fast, name, recording)
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_xent_small_direct_path(small_spy, dtype, reduction, inplace) -> None:
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 10)) * 3).astype(dtype)
    labels = rng.integers(0, 10, size=64)
    ref = torch_xent(x, labels, reduction=reduction)
    labels = labels.astype(np.int32)
    expected = generic(gradcore.softmax_cross_entropy, x, labels, reduction=reduction)
    readonly(labels)
    if not inplace:
        readonly(x)
    result = gradcore.softmax_cross_entropy(x, labels, reduction=reduction, inplace=inplace)
    assert small_spy["xent"] == [True]
    if inplace:
        assert result[1] is x
    check_result(result, ref, dtype)
    check_result(result, expected, dtype)


@pytest.mark.parametrize(
    "case", ["ignored", "ignore_index_in_range", "out_of_range", "huge", "nan", "minus_inf"]
)
def test_xent_small_declines_to_general_path(small_spy, case) -> None:
    """Rows the direct path does not handle go to the blocked loop, unharmed."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((9, 4)) * 2
    labels = rng.integers(0, 4, size=9)
    opts: dict = {}
    if case == "ignored":
        labels[3] = -100
    elif case == "ignore_index_in_range":
        labels[:] = [0, 1, 2, 3, 0, 1, 2, 3, 2]
        opts["ignore_index"] = 2
    elif case == "out_of_range":
        labels[5] = 4
        opts["check_labels"] = False
    elif case == "huge":
        x[2] += 1000.0
    elif case == "nan":
        x[4, 1] = np.nan
    else:
        x[6] = -np.inf
    x_before = x.copy()
    with np.errstate(all="ignore"):  # the generic body warns on the all -inf row
        expected = generic(gradcore.softmax_cross_entropy, x_before, labels, **opts)
    result = gradcore.softmax_cross_entropy(x, labels, inplace=True, **opts)
    assert small_spy["xent"] == [False]
    assert result[1] is x
    if case in ("out_of_range", "nan", "minus_inf"):
        bad = {"out_of_range": 5, "nan": 4, "minus_inf": 6}[case]
        assert np.isnan(result[0])
        assert np.isnan(result[1][bad]).all()
        assert np.isfinite(np.delete(result[1], bad, axis=0)).all()
        np.testing.assert_allclose(result[1], expected[1], rtol=1e-12, equal_nan=True)
        return
    ref = torch_xent(x_before, labels, ignore_index=opts.get("ignore_index", -100))
    check_result(result, ref, np.float64, scale=1000.0 if case == "huge" else 0.0)
    check_result(result, expected, np.float64, scale=1000.0 if case == "huge" else 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(), (7,), (16, 5)])
def test_mse_small_direct_path(small_spy, dtype, reduction, shape) -> None:
    rng = np.random.default_rng(2)
    p = np.asarray(rng.standard_normal(shape)).astype(dtype)
    t = np.asarray(rng.standard_normal(shape)).astype(dtype)
    readonly(p, t)
    result = gradcore.mse(p, t, reduction=reduction)
    assert small_spy["mse"] == [True]
    loss, grad = result
    assert type(loss) is np.ndarray
    assert type(grad) is np.ndarray
    check_result(result, torch_mse(p, t, reduction=reduction), dtype)
    check_result(result, generic(gradcore.mse, p, t, reduction=reduction), dtype)


def test_xent_uint64_labels_past_int64_are_flagged_not_ignored():
    # 2**64 - 100 would wrap to -100 (the ignore_index) in a signed conversion.
    x = np.zeros((2, 3))
    labels = np.array([1, 2**64 - 100], dtype=np.uint64)
    with pytest.raises(ValueError, match="out of range"):
        gradcore.softmax_cross_entropy(x, labels)
    loss, grad = gradcore.softmax_cross_entropy(x, labels, reduction="none", check_labels=False)
    assert np.isnan(loss[1])
    assert np.all(np.isnan(grad[1]))
    np.testing.assert_allclose(loss[0], np.log(3.0), rtol=1e-12)
