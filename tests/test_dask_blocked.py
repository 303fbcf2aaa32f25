"""Dask losses that run the NumPy fast path once per block (gradcore.backends.dask).

Values are checked against float64 NumPy formulas written here and against NumPy's own
result on the same data; graphs are checked to grow with the number of chunks only, to
stay lazy (``no_compute``), and to compute on a ``dask.distributed.LocalCluster``.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradcore
from gradcore._dispatch import fast_path_for
from gradcore.testing import no_compute

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def _tol(dtype):
    return {"rtol": 2e-5, "atol": 1e-7} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-15}


def _xent_reference(x, y, w=None, ignore_index=-100, eps=0.0, reduction="mean"):
    """Softmax cross-entropy and its gradient from the formulas, in float64."""
    x = x.astype(np.float64)
    C = x.shape[1]
    w = np.ones(C) if w is None else w.astype(np.float64)
    m = x.max(1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
    p = np.exp(logp)
    keep = y != ignore_index
    lab = np.where(keep, y, 0)
    onehot = np.eye(C)[lab]
    wy = np.where(keep, w[lab], 0.0)
    target = (1 - eps) * onehot + eps / C
    row = np.where(keep, -(target * w * logp).sum(1), 0.0)
    coef = (target * w).sum(1, keepdims=True)
    grad = np.where(keep[:, None], coef * p - target * w, 0.0)
    if reduction == "none":
        return row, grad
    if reduction == "sum":
        return row.sum(), grad
    return row.sum() / wy.sum(), grad / wy.sum()


def _graph_size(*arrays):
    """Tasks in the union of the arrays' graphs, before any optimisation."""
    keys: set = set()
    for a in arrays:
        keys.update(dict(a.__dask_graph__()))
    return len(keys)


def _data(rows=1000, classes=7, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 * rng.normal(size=(rows, classes))).astype(dtype)
    y = rng.integers(0, classes, size=rows)
    y[::5] = -1
    w = rng.uniform(0.5, 2.0, size=classes)
    return x, y, w


def test_dask_fast_paths_are_registered():
    import array_api_compat.dask.array as dxp

    for op in ("softmax_cross_entropy", "mse", "binary_cross_entropy_with_logits"):
        assert fast_path_for(op, dxp) is not None, op


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight": True},
        {"label_smoothing": 0.1, "weight": True},
        {"reduction": "sum", "weight": True},
        {"reduction": "none", "weight": True},
    ],
    ids=["plain", "weight", "smoothing", "sum", "none"],
)
def test_blocked_cross_entropy_equals_numpy(dtype, options):
    x, y, w = _data(dtype=dtype)
    options = dict(options)
    use_weight = options.pop("weight", False)
    X = da.from_array(x, chunks=(96, -1))
    Y = da.from_array(y, chunks=(250,))  # other row chunks than the logits
    kwargs = {"ignore_index": -1, **options}
    with no_compute():
        loss, grad = gradcore.softmax_cross_entropy(
            X, Y, weight=da.from_array(w) if use_weight else None, **kwargs
        )
    assert isinstance(loss, da.Array)
    assert isinstance(grad, da.Array)
    assert grad.chunks == X.chunks
    got_loss, got_grad = dask.compute(loss, grad)
    assert got_loss.dtype == dtype
    assert got_grad.dtype == dtype
    ref_loss, ref_grad = _xent_reference(
        x, y, w if use_weight else None, -1, options.get("label_smoothing", 0.0),
        options.get("reduction", "mean"),
    )  # fmt: skip
    np.testing.assert_allclose(got_loss, ref_loss, **_tol(dtype))
    np.testing.assert_allclose(got_grad, ref_grad, **_tol(dtype))
    np_loss, np_grad = gradcore.softmax_cross_entropy(
        x, y, weight=w if use_weight else None, **kwargs
    )
    np.testing.assert_allclose(got_loss, np_loss, **_tol(dtype))
    np.testing.assert_allclose(got_grad, np_grad, **_tol(dtype))


def test_blocked_cross_entropy_z_loss_and_soft_targets():
    x, y, _ = _data(dtype=np.float64)
    X = da.from_array(x, chunks=(128, -1))
    for kwargs in ({"ignore_index": -1, "z_loss": 1e-3},):
        loss, grad = gradcore.softmax_cross_entropy(X, da.from_array(y, chunks=128), **kwargs)
        want = gradcore.softmax_cross_entropy(x, y, **kwargs)
        np.testing.assert_allclose(loss.compute(), want[0], rtol=1e-12)
        np.testing.assert_allclose(grad.compute(), want[1], rtol=1e-12, atol=1e-15)
    t = np.random.default_rng(3).dirichlet(np.ones(7), size=x.shape[0])
    loss, grad = gradcore.softmax_cross_entropy(X, da.from_array(t, chunks=(100, -1)))
    m = x.max(1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
    np.testing.assert_allclose(loss.compute(), -(t * logp).sum() / x.shape[0], rtol=1e-12)
    np.testing.assert_allclose(grad.compute(), (np.exp(logp) - t) / x.shape[0], atol=1e-15)


def test_all_ignored_gives_nan_loss_and_zero_gradient():
    x = np.ones((10, 3), dtype=np.float32)
    y = np.full(10, -100)
    loss, grad = gradcore.softmax_cross_entropy(
        da.from_array(x, chunks=(4, 3)), da.from_array(y, chunks=4)
    )
    assert np.isnan(loss.compute())
    np.testing.assert_array_equal(grad.compute(), np.zeros_like(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_blocked_mse_and_bce_equal_numpy(dtype, reduction):
    rng = np.random.default_rng(5)
    p = rng.normal(size=(300, 5)).astype(dtype)
    t = rng.normal(size=(300, 5)).astype(dtype)
    b = (t > 0).astype(dtype)
    w = rng.uniform(0.5, 2.0, size=5)
    q = rng.uniform(0.5, 3.0, size=5)
    P = da.from_array(p, chunks=(64, 2))  # rows and columns chunked
    with no_compute():
        mse = gradcore.mse(P, da.from_array(t, chunks=(100, 5)), reduction=reduction)
        wmse = gradcore.mse(P, da.from_array(t), weight=da.from_array(w), reduction=reduction)
        bce = gradcore.binary_cross_entropy_with_logits(
            P, da.from_array(b), pos_weight=da.from_array(q), weight=da.from_array(w),
            reduction=reduction,
        )  # fmt: skip
    (ml, mg), (wl, wg), (bl, bg) = dask.compute(mse, wmse, bce)
    x64, t64, b64 = p.astype(np.float64), t.astype(np.float64), b.astype(np.float64)
    scale = 1.0 / p.size if reduction == "mean" else 1.0

    def reduce(e):
        return e if reduction == "none" else e.sum() * scale

    d = x64 - t64
    np.testing.assert_allclose(ml, reduce(d**2), **_tol(dtype))
    np.testing.assert_allclose(mg, 2 * d * scale, **_tol(dtype))
    np.testing.assert_allclose(wl, reduce(w * d**2), **_tol(dtype))
    np.testing.assert_allclose(wg, 2 * w * d * scale, **_tol(dtype))
    sp = np.logaddexp(0, x64)  # softplus(x)
    sn = np.logaddexp(0, -x64)  # softplus(-x)
    sig = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(bl, reduce(w * (q * b64 * sn + (1 - b64) * sp)), **_tol(dtype))
    np.testing.assert_allclose(bg, w * ((q * b64 + 1 - b64) * sig - q * b64) * scale, **_tol(dtype))
    np_loss, np_grad = gradcore.mse(p, t, reduction=reduction)
    np.testing.assert_allclose(ml, np_loss, **_tol(dtype))
    np.testing.assert_allclose(mg, np_grad, **_tol(dtype))


def test_graph_has_a_few_tasks_per_chunk():
    x, y, w = _data(rows=4096, classes=10)
    sizes = {}
    for chunks in (8, 32):
        X = da.from_array(x, chunks=(4096 // chunks, -1))
        Y = da.from_array(y, chunks=(4096 // chunks,))
        with no_compute():
            loss, grad = gradcore.softmax_cross_entropy(X, Y, weight=da.from_array(w))
            mloss, mgrad = gradcore.mse(X, X * 0.5)
        sizes[chunks] = (_graph_size(loss, grad), _graph_size(mloss, mgrad))
        with gradcore.use_fast_paths(False):
            gloss, ggrad = gradcore.softmax_cross_entropy(X, Y, weight=da.from_array(w))
        generic = _graph_size(gloss, ggrad)
        assert sizes[chunks][0] <= 8 * chunks + 16, sizes
        assert sizes[chunks][1] <= 8 * chunks + 16, sizes
        assert sizes[chunks][0] * 2 < generic, (sizes, generic)
    # Linear in the number of chunks.
    assert sizes[32][0] - sizes[8][0] <= 8 * 24


def test_split_class_axis_falls_back_to_the_generic_path():
    x, y, _ = _data(dtype=np.float64)
    X = da.from_array(x, chunks=(100, 3))  # the class axis in three chunks
    loss, grad = gradcore.softmax_cross_entropy(X, da.from_array(y, chunks=100), ignore_index=-1)
    ref_loss, ref_grad = _xent_reference(x, y, None, -1)
    np.testing.assert_allclose(loss.compute(), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad.compute(), ref_grad, rtol=1e-12, atol=1e-15)


def test_on_a_local_cluster():
    distributed = pytest.importorskip("distributed")
    x, y, w = _data(rows=2000, classes=11)
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",  # over loopback, not the in-process transport
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        X = da.from_array(x, chunks=(250, -1))
        Y = da.from_array(y, chunks=(250,))
        with no_compute():
            loss, grad = gradcore.softmax_cross_entropy(
                X, Y, weight=da.from_array(w), ignore_index=-1
            )
            mloss, mgrad = gradcore.mse(X, X * 0.5)
        got = client.compute([loss, grad, mloss, mgrad], sync=True)
    ref_loss, ref_grad = gradcore.softmax_cross_entropy(x, y, weight=w, ignore_index=-1)
    np.testing.assert_allclose(got[0], ref_loss, rtol=2e-6)
    np.testing.assert_allclose(got[1], ref_grad, rtol=2e-5, atol=1e-8)
    want = _xent_reference(x, y, w, -1)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    m64 = x.astype(np.float64) * 0.5
    np.testing.assert_allclose(got[2], (m64**2).mean(), rtol=2e-5)
    np.testing.assert_allclose(got[3], 2 * m64 / x.size, rtol=2e-5, atol=1e-12)
