"""Regressions of silent wrong numbers in the fused head, softcap and blocked losses.

Every reference is PyTorch autograd in float64 on the materialised logits (code that
shares nothing with gradcore), on both the fast paths and the generic bodies.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradcore

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_lxent(x, W, labels, *, weight=None, reduction="mean", softcap=None):
    """Loss, dx, dW of ``cross_entropy(x @ W)`` by PyTorch autograd in float64."""
    xt = torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)
    Wt = torch.tensor(np.asarray(W, dtype=np.float64), requires_grad=True)
    z = xt @ Wt
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = F.cross_entropy(z, torch.tensor(labels), weight=w, reduction=reduction)
    loss.backward()
    return loss.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy()


def _assert_matches(got, want, rtol=1e-10, atol=1e-12):
    for g, w in zip(got, want, strict=False):
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_linear_xent_mean_with_zero_class_weights_has_nan_gradients(fast, chunk_size):
    # Every non-ignored row's class weight is 0: the mean is 0/0. PyTorch, and
    # softmax_cross_entropy followed by linear_vjp (which this must equal), give NaN
    # gradients; a zero gradient would let training go on silently.
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((7, 4)), rng.standard_normal((4, 5))
    labels = np.array([0, 1, 0, 1, -100, 0, 1])
    weight = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    want = _torch_lxent(x, W, labels, weight=weight)
    assert np.isnan(want[1][0]).all()
    assert (want[1][4] == 0).all()
    with gradcore.use_fast_paths(fast):
        got = gradcore.linear_cross_entropy(x, W, labels, weight=weight, chunk_size=chunk_size)
    _assert_matches(got[:3], want)


@pytest.mark.gpu
def test_cupy_linear_xent_mean_with_zero_class_weights_has_nan_gradients():
    # The CuPy fast path scales by 1 / divisor with the divisor replaced by 1 when it
    # is 0; the rows not ignored must still come out NaN, as on the other paths.
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 4)).astype(np.float32)
    W = rng.standard_normal((4, 5)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, -100, 0, 1])
    weight = np.array([0.0, 0.0, 1.0, 1.0, 1.0], np.float32)
    want = _torch_lxent(x.astype(np.float64), W.astype(np.float64), labels, weight=weight)
    got = gradcore.linear_cross_entropy(
        cupy.asarray(x), cupy.asarray(W), cupy.asarray(labels), weight=cupy.asarray(weight),
        chunk_size=3,
    )  # fmt: skip
    _assert_matches([cupy.asnumpy(g) for g in got[:3]], want, rtol=1e-5, atol=1e-6)


def test_dask_mean_with_zero_class_weights_has_nan_gradients():
    # The blocked fast path must agree with the generic body (and PyTorch): NaN rows for
    # the rows not ignored, zero rows for the ignored ones.
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(1)
    z = rng.standard_normal((9, 5))
    labels = np.array([0, 1, -100, 1, 0, 0, -100, 1, 1])
    weight = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    zt = torch.tensor(z, requires_grad=True)
    ref = F.cross_entropy(zt, torch.tensor(labels), weight=torch.tensor(weight))
    ref.backward()
    for z_loss in (0.0, 0.1):
        loss, grad = gradcore.softmax_cross_entropy(
            da.from_array(z, chunks=(4, 5)),
            da.from_array(labels, chunks=4),
            weight=da.from_array(weight, chunks=5),
            z_loss=z_loss,
        )
        assert np.isnan(loss.compute())
        np.testing.assert_array_equal(grad.compute(), zt.grad.numpy())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("dtype", "cap"), [(np.float32, 1e39), (np.float32, 1e-46), (np.float64, 1e-320)]
)
def test_softcap_the_dtype_cannot_hold_is_refused_not_nan(fast, dtype, cap):
    # A cap that rounds to inf (or to 0) in the logits' dtype made every loss and
    # gradient NaN (x / inf * inf), although PyTorch in float64 gives finite values.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 3)).astype(dtype)
    W = rng.standard_normal((3, 5)).astype(dtype)
    labels = rng.integers(0, 5, 6)
    with gradcore.use_fast_paths(fast):
        with pytest.raises(ValueError, match="softcap"):
            gradcore.softmax_cross_entropy(x @ W, labels, softcap=cap)
        with pytest.raises(ValueError, match="softcap"):
            gradcore.linear_cross_entropy(x, W, labels, softcap=cap)
        # Caps the dtype holds still match PyTorch.
        for ok in (1e30 if dtype == np.float32 else 1e300, 1e-30):
            got = gradcore.linear_cross_entropy(x, W, labels, softcap=ok)
            want = _torch_lxent(x, W, labels, softcap=ok)
            _assert_matches(got[:3], want, rtol=2e-5, atol=1e-6)


def test_float16_head_caps_its_logits_in_float32_like_its_loss():
    # A float16 head with softcap past float16's range (1e5 rounds to inf there) gave
    # NaN logits from forward/predict (inf * tanh(z / inf) = inf * 0), while its fused
    # training loss, computed in float32, was finite: evaluation silently NaN.
    from gradcore import nn

    rng = np.random.default_rng(3)
    X = rng.standard_normal((6, 4))
    for cap in (1e5, 3.0):
        head = nn.LinearCrossEntropy(4, 3, seed=1, dtype="float16", softcap=cap)
        W = np.asarray(head.state_dict()["W"], dtype=np.float64)
        b = np.asarray(head.state_dict()["b"], dtype=np.float64)
        Xq = X.astype(np.float16).astype(np.float64)
        z = Xq @ W + b
        want = cap * np.tanh(z / cap)
        np.testing.assert_allclose(head.predict(X).astype(np.float64), want, rtol=2e-3, atol=2e-3)
        out = head.forward(X)
        assert out.dtype == np.float16
        g = np.ones((6, 3), dtype=np.float16)
        head.backward(g)
        dW = head.grads()["W"]
        assert dW.dtype == np.float16
        np.testing.assert_allclose(
            dW.astype(np.float64), Xq.T @ (1.0 - np.tanh(z / cap) ** 2), rtol=5e-3, atol=5e-3
        )


def test_fit_validation_loss_is_the_mean_over_the_whole_set():
    # With ignore_index and class weights, batches of the validation set have different
    # divisors: averaging the batch means by their row counts is not the set's mean
    # (fit(comm=...) computes the set's mean, so the two disagreed).
    from gradcore import nn

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 4)), rng.integers(0, 3, 64)
    Xv, yv = rng.standard_normal((2100, 4)), rng.integers(0, 3, 2100)
    yv[:1024][rng.random(1024) < 0.9] = -1  # the first evaluation batch mostly ignored
    w = np.array([1.0, 3.0, 0.5])
    model = nn.MLP([4, 8, 3], "tanh", seed=1, dtype="float64")
    history = gradcore.fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer="sgd",
        epochs=1,
        batch_size=32,
        progress=False,
        validation=(Xv, yv),
        loss_kwargs={"ignore_index": -1, "weight": w},
    )
    zt = torch.tensor(np.asarray(model.predict(Xv)))
    want = F.cross_entropy(zt, torch.tensor(yv), weight=torch.tensor(w), ignore_index=-1)
    np.testing.assert_allclose(history.val_loss[-1], want.item(), rtol=1e-12)


def test_linear_xent_fast_path_with_tiny_class_weights_keeps_dw_finite():
    # The mean's divisor (sum of tiny class weights) is below 1: the NumPy fast path put
    # 1/divisor on x before x.T @ g, and x * 1/divisor overflowed float32 (NaN and -inf
    # in dW) where the generic body and PyTorch give finite gradients.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 4)) * 1e3).astype(np.float32)
    W = (rng.standard_normal((4, 5)) * 1e-3).astype(np.float32)
    labels = rng.integers(0, 5, 8)
    weight = np.full(5, 1e-37, dtype=np.float32)
    want = _torch_lxent(x, W, labels, weight=weight.astype(np.float64))
    for fast in (True, False):
        with gradcore.use_fast_paths(fast):
            got = gradcore.linear_cross_entropy(x, W, labels, weight=weight, chunk_size=3)
        _assert_matches(got[:3], want, rtol=1e-4, atol=1e-3)
