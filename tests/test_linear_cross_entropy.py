"""The fused linear + cross-entropy and the soft-cap option, against PyTorch autograd.

References are computed on the host in float64 by PyTorch's ``cross_entropy`` of the
materialised logits ``x @ W + b`` (soft-capped where asked), differentiated by autograd:
code that shares nothing with gradcore. Every backend of the plugin runs the same checks.
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

import gradcore
from gradcore.testing import assert_close, no_compute

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_capped_xent(z, lt, *, softcap=None, z_loss=0.0, reduction="mean", **kw):
    """PyTorch's cross-entropy (+ z-loss) of ``z`` soft-capped, as one autograd graph."""
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, lt, reduction=reduction, **kw)
    if z_loss:
        zterm = z_loss * torch.logsumexp(z, dim=-1) ** 2
        if lt.dtype.is_floating_point:
            divisor = zterm.numel()
        else:
            active = lt != kw.get("ignore_index", -100)
            zterm = torch.where(active, zterm, torch.zeros_like(zterm))
            w = kw.get("weight")
            divisor = active.sum() if w is None else w[lt[active]].sum()
        if reduction == "mean":
            loss = loss + zterm.sum() / divisor
        elif reduction == "sum":
            loss = loss + zterm.sum()
        else:
            loss = loss + zterm
    return loss


def _torch_lxent(x, W, labels, *, bias=None, weight=None, **kw):
    """Loss, dx, dW, db of ``cross_entropy(x @ W + b)`` by PyTorch autograd in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    z = xt @ Wt
    if bt is not None:
        z = z + bt
    V = W.shape[1]
    lt = torch.tensor(labels)
    z2 = z.reshape(-1, V)
    lt2 = lt.reshape(-1, V) if labels.dtype.kind == "f" else lt.reshape(-1)
    if weight is not None:
        kw["weight"] = torch.tensor(weight, dtype=torch.float64)
    loss = _torch_capped_xent(z2, lt2, **kw)
    if kw.get("reduction") == "none":
        loss = loss.reshape(x.shape[:-1])
    loss.sum().backward()
    db = None if bt is None else bt.grad.numpy()
    return loss.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), db


def _problem(seed=0, N=13, H=5, V=9, soft=False, ignore_frac=0.3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, H))
    W = rng.standard_normal((H, V)) * 0.8
    b = rng.standard_normal(V) * 0.5
    if soft:
        labels = rng.random((N, V))
        labels /= labels.sum(axis=1, keepdims=True)
    else:
        labels = rng.integers(0, V, N)
        labels = np.where(rng.random(N) < ignore_frac, -100, labels)
        labels[0] = 1  # never all ignored here
    return x, W, b, labels


def _check(backend, got, want, *, atol=1e-13, rtol=1e-10):
    names = ("loss", "dx", "dW", "db")
    for name, g, w in zip(names, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert_close(g, np.asarray(w), xp=backend.xp, rtol=rtol, atol=atol, err_msg=name)


OPTIONS = [
    dict(weight=w, label_smoothing=ls, reduction=r, z_loss=z, softcap=c)
    for w, ls, r, z, c in itertools.product(
        [False, True], [0.0, 0.15], ["mean", "sum", "none"], [0.0, 1e-3], [None, 3.0]
    )
]
# Class weights apply to integer labels (soft targets carry their own weighting). Each
# case runs with one chunk size of 1, 7, N (13) and N + 5; the sizes are spread so that
# every option value meets every size (the NumPy test below runs all sizes for all).
_CHUNKS = (1, 7, 13, 18)
CASES = [
    (soft, o, _CHUNKS[(i + i // 4 + i // 16) % 4])
    for i, (soft, o) in enumerate(
        [(False, o) for o in OPTIONS] + [(True, o) for o in OPTIONS if not o["weight"]]
    )
]


def _case_id(case):
    soft, o, chunk = case
    words = ["soft" if soft else "hard", *(f"{k}={v}" for k, v in o.items())]
    return "-".join([*words, f"chunk={chunk}"])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch_for_every_option_and_chunk_size(backend, case):
    soft, opts, chunk = case
    kwargs = dict(opts)
    x, W, b, labels = _problem(soft=soft)
    assert x.shape[0] == 13
    weight = np.random.default_rng(1).random(W.shape[1]) + 0.5 if kwargs.pop("weight") else None
    want = _torch_lxent(x, W, labels, bias=b, weight=weight, **kwargs)
    if weight is not None:
        kwargs["weight"] = backend.asarray(weight)
    for chunk_size in (chunk, None):
        got = gradcore.linear_cross_entropy(
            backend.asarray(x),
            backend.asarray(W),
            backend.asarray(labels),
            bias=backend.asarray(b),
            chunk_size=chunk_size,
            **kwargs,
        )
        _check(backend, got, want)


@pytest.mark.parametrize("fast", [False, True], ids=["generic", "fast"])
def test_both_paths_on_numpy_with_every_option(fast):
    """The NumPy fast path and the generic body, each against PyTorch."""
    x, W, b, labels = _problem(seed=3, N=29, H=6, V=11)
    weight = np.random.default_rng(2).random(11) + 0.5
    b_np = gradcore.backend("numpy")
    with gradcore.use_fast_paths(fast):
        for opts in OPTIONS:
            kwargs = dict(opts)
            wt = weight if kwargs.pop("weight") else None
            want = _torch_lxent(x, W, labels, bias=b, weight=wt, **kwargs)
            for chunk in (1, 7, 29, 40):
                got = gradcore.linear_cross_entropy(
                    x, W, labels, bias=b, weight=wt, chunk_size=chunk, **kwargs
                )
                _check(b_np, got, want)


def test_numpy_without_scipy_adds_dw_in_column_blocks(monkeypatch):
    """Without SciPy's gemm, each chunk's x.T @ g reaches dW through column blocks."""
    from gradcore.backends import numpy as numpy_backend

    monkeypatch.setattr(numpy_backend, "USE_SCIPY_GEMM", False)
    monkeypatch.setattr(numpy_backend, "DW_BLOCK_BYTES", 6 * 8 * 4)  # blocks of 4 columns
    x, W, b, labels = _problem(seed=21, N=29, H=6, V=11)
    for reduction in ("mean", "sum"):
        want = _torch_lxent(x, W, labels, bias=b, reduction=reduction, label_smoothing=0.1)
        got = gradcore.linear_cross_entropy(
            x, W, labels, bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=7
        )
        _check(gradcore.backend("numpy"), got, want)


def test_without_bias_db_is_none_and_need_dx_false(backend):
    x, W, _, labels = _problem(seed=4)
    want = _torch_lxent(x, W, labels, label_smoothing=0.1)
    got = gradcore.linear_cross_entropy(
        backend.asarray(x), backend.asarray(W), backend.asarray(labels), label_smoothing=0.1
    )
    _check(backend, got, want)
    _, dx, dW, db = gradcore.linear_cross_entropy(
        backend.asarray(x), backend.asarray(W), backend.asarray(labels), need_dx=False
    )
    assert dx is None
    assert db is None
    assert_close(dW, _torch_lxent(x, W, labels)[2], xp=backend.xp, atol=1e-13)


def test_leading_axes_are_rows(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 6))
    W = rng.standard_normal((6, 10))
    b = rng.standard_normal(10)
    labels = rng.integers(0, 10, (3, 4))
    labels[1, 2] = -100
    for reduction in ("mean", "none"):
        want = _torch_lxent(x, W, labels, bias=b, reduction=reduction, z_loss=1e-2)
        got = gradcore.linear_cross_entropy(
            backend.asarray(x),
            backend.asarray(W),
            backend.asarray(labels),
            bias=backend.asarray(b),
            reduction=reduction,
            z_loss=1e-2,
            chunk_size=5,
        )
        _check(backend, got, want)


def test_all_ignored_gives_nan_mean_and_zero_gradients(backend):
    x, W, b, _ = _problem(seed=6)
    labels = np.full(x.shape[0], -100)
    loss, dx, dW, db = gradcore.linear_cross_entropy(
        backend.asarray(x),
        backend.asarray(W),
        backend.asarray(labels),
        bias=backend.asarray(b),
        chunk_size=4,
    )
    assert np.isnan(backend.to_numpy(loss))
    for g, like in ((dx, x), (dW, W), (db, b)):
        assert_close(g, np.zeros_like(like), xp=backend.xp)
    loss, *_ = gradcore.linear_cross_entropy(
        backend.asarray(x), backend.asarray(W), backend.asarray(labels), reduction="sum"
    )
    assert_close(loss, np.asarray(0.0), xp=backend.xp)


def test_ignore_index_inside_class_range_with_weights(backend):
    x, W, b, _ = _problem(seed=7)
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 9, x.shape[0])
    weight = np.arange(1.0, 10.0)
    want = _torch_lxent(x, W, labels, bias=b, weight=weight, ignore_index=2)
    got = gradcore.linear_cross_entropy(
        backend.asarray(x),
        backend.asarray(W),
        backend.asarray(labels),
        bias=backend.asarray(b),
        weight=backend.asarray(weight),
        ignore_index=2,
        chunk_size=3,
    )
    _check(backend, got, want)


def test_chain_rule_equals_linear_vjp_of_the_materialised_gradient(backend):
    """dx, dW, db are linear_vjp applied to the cross-entropy gradient of x @ W + b."""
    x, W, b, labels = _problem(seed=8, N=17, H=4, V=6)
    xb, Wb, bb, lb = (backend.asarray(a) for a in (x, W, b, labels))
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=2.0)
    logits = gradcore.linear(xb, Wb, bb)
    loss_ref, g = gradcore.softmax_cross_entropy(logits, lb, **opts)
    dx_ref, dW_ref, db_ref = gradcore.linear_vjp(g, xb, Wb)
    loss, dx, dW, db = gradcore.linear_cross_entropy(xb, Wb, lb, bias=bb, chunk_size=5, **opts)
    for got, ref in ((loss, loss_ref), (dx, dx_ref), (dW, dW_ref), (db, db_ref)):
        assert_close(got, ref, rtol=1e-12, atol=1e-15)


def test_unchecked_out_of_range_labels_poison_the_result(backend):
    x, W, b, labels = _problem(seed=9)
    labels = labels.copy()
    labels[3] = 50
    loss, dx, dW, _ = gradcore.linear_cross_entropy(
        backend.asarray(x),
        backend.asarray(W),
        backend.asarray(labels),
        bias=backend.asarray(b),
        check_labels=False,
        chunk_size=4,
    )
    assert np.isnan(backend.to_numpy(loss))
    dx = backend.to_numpy(dx)
    assert np.all(np.isnan(dx[3]))
    assert np.all(np.isfinite(np.delete(dx, 3, axis=0)))
    assert np.all(np.isnan(backend.to_numpy(dW)))


def test_out_of_range_labels_raise_where_checked(backend):
    x, W, _, labels = _problem(seed=10)
    labels = labels.copy()
    labels[2] = 9
    if backend.name in ("numpy", "torch", "array_api_strict"):
        with pytest.raises(ValueError, match=r"class index 9 at position \(2,\)"):
            gradcore.linear_cross_entropy(
                backend.asarray(x), backend.asarray(W), backend.asarray(labels)
            )
    if backend.name != "jax":
        with pytest.raises(ValueError, match="out of range"):
            gradcore.linear_cross_entropy(
                backend.asarray(x), backend.asarray(W), backend.asarray(labels), check_labels=True
            )


# --- float16 / bfloat16: float32 accumulation ------------------------------------------------


def test_half_precision_accumulates_in_float32():
    """With one row per chunk, dW is a sum of 1024 terms: summed in float16 it would be
    off by about 1e-2 relative; summed in float32 and rounded once it is within float16's
    rounding of the float64 reference."""
    rng = np.random.default_rng(11)
    N, H, V = 1024, 8, 16
    x = rng.standard_normal((N, H)).astype(np.float16)
    W = (rng.standard_normal((H, V)) * 0.3).astype(np.float16)
    b = (rng.standard_normal(V) * 0.1).astype(np.float16)
    labels = rng.integers(0, V, N)
    want = _torch_lxent(
        x.astype(np.float64), W.astype(np.float64), labels, bias=b.astype(np.float64),
        reduction="sum",
    )  # fmt: skip
    loss, dx, dW, db = gradcore.linear_cross_entropy(
        x, W, labels, bias=b, chunk_size=1, reduction="sum"
    )
    for a in (loss, dx, dW, db):
        assert a.dtype == np.float16
    for got, ref in ((dW, want[2]), (db, want[3]), (loss, want[0])):
        scale = np.max(np.abs(ref))
        assert np.max(np.abs(got.astype(np.float64) - ref)) <= 1e-3 * scale
    np.testing.assert_allclose(dx.astype(np.float64), want[1], rtol=2e-2, atol=2e-3)
    # The same sum accumulated in float16 really is worse: the check above can fail.
    naive = np.zeros((H, V), np.float16)
    _, g = gradcore.softmax_cross_entropy(x @ W + b, labels, reduction="sum")
    for i in range(N):
        naive += np.outer(x[i], g[i]).astype(np.float16)
    assert np.max(np.abs(naive - want[2])) > 1e-3 * np.max(np.abs(want[2]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_torch(dtype):
    rng = np.random.default_rng(12)
    N, H, V = 256, 8, 12
    x = rng.standard_normal((N, H))
    W = rng.standard_normal((H, V)) * 0.3
    labels = rng.integers(0, V, N)
    tdt = getattr(torch, dtype)
    xt, Wt = torch.tensor(x).to(tdt), torch.tensor(W).to(tdt)
    want = _torch_lxent(
        xt.double().numpy(), Wt.double().numpy(), labels, label_smoothing=0.1, reduction="sum"
    )
    loss, dx, dW, db = gradcore.linear_cross_entropy(
        xt, Wt, torch.tensor(labels), chunk_size=3, label_smoothing=0.1, reduction="sum"
    )
    assert db is None
    for a in (loss, dx, dW):
        assert a.dtype == tdt
    tol = 1e-2 if dtype == "bfloat16" else 1e-3
    for got, ref in ((dW, want[2]), (loss, want[0])):
        err = np.max(np.abs(got.double().numpy() - ref))
        assert err <= tol * np.max(np.abs(ref))


# --- memory and mutation ---------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_numpy_peak_memory_is_a_few_chunks_not_the_logits(softcap):
    """tracemalloc sees NumPy's buffers: the call's peak extra memory stays below two
    chunks of logits plus dW (three chunks with a soft-cap, which keeps the cap's
    derivative), while the logits of all rows would be 32 times one chunk."""
    rng = np.random.default_rng(13)
    N, H, V, chunk = 4096, 8, 4096, 128
    x = rng.standard_normal((N, H))
    W = rng.standard_normal((H, V)) * 0.1
    b = rng.standard_normal(V) * 0.1
    labels = rng.integers(0, V, N)
    gradcore.linear_cross_entropy(x[:256], W, labels[:256], bias=b, chunk_size=chunk)  # warm
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        loss, dx, dW, db = gradcore.linear_cross_entropy(
            x, W, labels, bias=b, chunk_size=chunk, softcap=softcap
        )
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    chunk_bytes = chunk * V * 8
    bound = (3 if softcap else 2) * chunk_bytes + dW.nbytes
    assert peak < bound, (peak, bound)
    assert 10 * bound < N * V * 8
    want = _torch_lxent(x, W, labels, bias=b, softcap=softcap)
    _check(gradcore.backend("numpy"), (loss, dx, dW, db), want, rtol=1e-9)


def test_inputs_are_not_mutated():
    x, W, b, labels = _problem(seed=14)
    weight = np.linspace(0.5, 1.5, 9)
    copies = [a.copy() for a in (x, W, b, labels, weight)]
    for fast in (False, True):
        with gradcore.use_fast_paths(fast):
            gradcore.linear_cross_entropy(
                x, W, labels, bias=b, weight=weight, softcap=2.0, label_smoothing=0.1, chunk_size=4
            )
            gradcore.softmax_cross_entropy(x @ W, labels, softcap=2.0, weight=weight)
    for a, c in zip((x, W, b, labels, weight), copies, strict=True):
        np.testing.assert_array_equal(a, c)


# --- errors ----------------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    x = np.zeros((4, 3))
    W = np.zeros((3, 5))
    labels = np.array([0, 1, 2, 3])
    lx = gradcore.linear_cross_entropy
    cases = [
        (lambda: lx(x.astype(int), W, labels), TypeError, "x must"),
        (lambda: lx(x, W.astype(int), labels), TypeError, "W must"),
        (lambda: lx(x, np.zeros((4, 5)), labels), ValueError, "x's last dimension"),
        (lambda: lx(x, np.zeros(3), labels), ValueError, "W must be 2-D"),
        (lambda: lx(x, np.zeros((3, 0)), labels[:0]), ValueError, "W must have at least one"),
        (lambda: lx(x, W, labels, bias=np.zeros(4)), ValueError, "bias must have shape"),
        (lambda: lx(x, W, labels, bias=np.zeros(5, int)), TypeError, "bias"),
        (lambda: lx(x, W, labels[:3]), ValueError, "labels must have shape"),
        (lambda: lx(x, W, np.zeros((4, 4))), ValueError, "probabilities"),
        (lambda: lx(x, W, labels.astype(bool)), TypeError, "labels"),
        (lambda: lx(x, W, labels, softcap=0.0), ValueError, "softcap"),
        (lambda: lx(x, W, labels, softcap=-1.0), ValueError, "softcap"),
        (lambda: lx(x, W, labels, softcap=float("inf")), ValueError, "softcap"),
        (lambda: lx(x, W, labels, softcap="big"), TypeError, "softcap"),
        (lambda: lx(x, W, labels, chunk_size=0), ValueError, "chunk_size"),
        (lambda: lx(x, W, labels, chunk_size=2.5), TypeError, "chunk_size"),
        (lambda: lx(x, W, labels, need_dx=1), TypeError, "need_dx"),
        (lambda: lx(x, W, labels, reduction="avg"), ValueError, "reduction"),
        (lambda: lx(x, W, labels, label_smoothing=2.0), ValueError, "label_smoothing"),
        (lambda: lx(x, W, labels, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: lx(x, W, labels, weight=np.ones(3)), ValueError, "weight"),
        (lambda: lx(x, W, np.full((4, 5), 0.2), ignore_index=0), ValueError, "ignore_index"),
        (lambda: lx(x, W, labels, check_labels="yes"), TypeError, "check_labels"),
        (lambda: lx(x, W, labels + 10), ValueError, "out of range"),
        (lambda: gradcore.softmax_cross_entropy(x, labels % 3, softcap=0), ValueError, "softcap"),
        (lambda: gradcore.softmax_cross_entropy(x, labels % 3, softcap=True), TypeError, "softc"),
    ]
    for fast in (False, True):
        with gradcore.use_fast_paths(fast):
            for call, exc, word in cases:
                with pytest.raises(exc, match=word):
                    call()


# --- softcap on softmax_cross_entropy --------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["generic", "fast"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_softmax_cross_entropy_softcap_matches_torch(backend, fast, soft):
    rng = np.random.default_rng(15)
    x = rng.standard_normal((7, 5)) * 6  # well into tanh's curved part
    x[1, 2] = -np.inf  # a masked class is capped to -c, as the composition does
    if soft:
        labels = rng.random((7, 5))
        labels /= labels.sum(axis=1, keepdims=True)
        opts = dict(label_smoothing=0.1, z_loss=1e-3)
    else:
        labels = rng.integers(0, 5, 7)
        labels[3] = -100
        opts = dict(label_smoothing=0.1, z_loss=1e-3, weight=rng.random(5) + 0.5)
    for reduction in ("mean", "sum", "none"):
        xt = torch.tensor(x, requires_grad=True)
        kw = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
        tl = _torch_capped_xent(xt, torch.tensor(labels), softcap=2.5, reduction=reduction, **kw)
        tl.sum().backward()
        kwargs = {
            k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()
        }
        with gradcore.use_fast_paths(fast):
            loss, grad = gradcore.softmax_cross_entropy(
                backend.asarray(x),
                backend.asarray(labels),
                softcap=2.5,
                reduction=reduction,
                **kwargs,
            )
        assert_close(loss, tl.detach().numpy(), xp=backend.xp)
        assert_close(grad, xt.grad.numpy(), xp=backend.xp, atol=1e-15)


@pytest.mark.parametrize("fast", [False, True], ids=["generic", "fast"])
def test_softmax_cross_entropy_softcap_out_inplace_axis_float32(fast):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 6, 4)) * 5
    labels = rng.integers(0, 6, (3, 4))
    xt = torch.tensor(np.moveaxis(x, 1, -1).reshape(-1, 6), requires_grad=True)
    tl = _torch_capped_xent(xt, torch.tensor(labels.reshape(-1)), softcap=3.0)
    tl.backward()
    want = np.moveaxis(xt.grad.numpy().reshape(3, 4, 6), -1, 1)
    with gradcore.use_fast_paths(fast):
        out = np.full_like(x, np.nan)
        loss, grad = gradcore.softmax_cross_entropy(x, labels, axis=1, softcap=3.0, out=out)
        assert grad is out
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-16)
        xc = x.copy()
        loss, grad = gradcore.softmax_cross_entropy(xc, labels, axis=1, softcap=3.0, inplace=True)
        assert grad is xc
        np.testing.assert_allclose(xc, want, rtol=1e-12, atol=1e-16)
        np.testing.assert_allclose(loss, tl.item(), rtol=1e-12)
        x32 = x.astype(np.float32)
        loss, grad = gradcore.softmax_cross_entropy(x32, labels, axis=1, softcap=3.0)
        assert grad.dtype == np.float32
        assert loss.dtype == np.float32
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


# --- laziness and tracing --------------------------------------------------------------------


def test_jax_jit_every_option():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    x, W, b, labels = _problem(seed=17)
    weight = np.linspace(0.5, 1.5, 9)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=2.0)
    for reduction in ("mean", "sum", "none"):
        wt = jnp.asarray(weight)
        fn = jax.jit(
            lambda a, w, y, c, r=reduction, wt=wt: gradcore.linear_cross_entropy(
                a, w, y, bias=c, weight=wt, reduction=r, chunk_size=4, **opts
            )
        )
        got = fn(jnp.asarray(x), jnp.asarray(W), jnp.asarray(labels), jnp.asarray(b))
        want = _torch_lxent(x, W, labels, bias=b, weight=weight, reduction=reduction, **opts)
        _check(gradcore.backend("jax", device="cpu"), got, want)


def test_dask_stays_lazy():
    pytest.importorskip("dask")
    bk = gradcore.backend("dask")
    x, W, b, labels = _problem(seed=18)
    with no_compute():
        got = gradcore.linear_cross_entropy(
            bk.asarray(x), bk.asarray(W), bk.asarray(labels), bias=bk.asarray(b), chunk_size=5
        )
    _check(bk, got, _torch_lxent(x, W, labels, bias=b))


# --- CuPy (needs a GPU) ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_fast_path_matches_torch(dtype):
    cupy = pytest.importorskip("cupy")
    import gradcore.backends.cupy_linear  # registers the fast path

    rng = np.random.default_rng(19)
    N, H, V = 300, 64, 1000
    x = rng.standard_normal((N, H)).astype(dtype)
    W = (rng.standard_normal((H, V)) * 0.1).astype(dtype)
    b = (rng.standard_normal(V) * 0.1).astype(dtype)
    labels = rng.integers(0, V, N)
    labels[::7] = -100
    tol = 2e-5 if dtype == "float32" else 2e-3
    for opts in (dict(), dict(label_smoothing=0.1, z_loss=1e-4, softcap=15.0)):
        for reduction in ("mean", "sum", "none"):
            want = _torch_lxent(
                x.astype(np.float64), W.astype(np.float64), labels, bias=b.astype(np.float64),
                reduction=reduction, **opts,
            )  # fmt: skip
            got = gradcore.linear_cross_entropy(
                cupy.asarray(x), cupy.asarray(W), cupy.asarray(labels), bias=cupy.asarray(b),
                reduction=reduction, chunk_size=77, **opts,
            )  # fmt: skip
            for g, w in zip(got, want, strict=True):
                assert isinstance(g, cupy.ndarray)
                assert g.dtype == np.dtype(dtype)
                g = cupy.asnumpy(g).astype(np.float64)
                assert np.max(np.abs(g - w)) <= tol * max(1.0, np.max(np.abs(w)))


# --- the head layer, fit and the command line ------------------------------------------------


def _mlp_pair(**head_options):
    from gradcore import nn

    plain = nn.MLP([4, 8, 5], seed=3, dtype="float64")
    fused = nn.with_fused_head(nn.MLP([4, 8, 5], seed=3, dtype="float64"), **head_options)
    return plain, fused


def test_head_layer_gradients_equal_the_materialised_model(backend):
    """forward_loss + backward() of the fused head give the loss, input gradient and
    parameter gradients of the same MLP trained through its logits."""
    if backend.name in ("dask",):
        pytest.skip("model training on Dask is covered by the training tests")
    plain, fused = _mlp_pair(chunk_size=3, softcap=4.0, label_smoothing=0.1)
    plain.to(backend)
    fused.to(backend)
    rng = np.random.default_rng(20)
    X = backend.asarray(rng.standard_normal((11, 4)))
    y = backend.asarray(rng.integers(0, 5, 11))
    logits = plain.forward(X)
    loss_ref, g = gradcore.softmax_cross_entropy(logits, y, softcap=4.0, label_smoothing=0.1)
    dx_ref = plain.backward(g)
    loss = fused.forward_loss(X, y)
    dx = fused.backward()
    assert_close(loss, loss_ref, rtol=1e-12)
    assert_close(dx, dx_ref, rtol=1e-12, atol=1e-15)
    want = plain.grads()
    got = fused.grads()
    assert sorted(got) == sorted(want)
    for name in want:
        assert_close(got[name], want[name], rtol=1e-12, atol=1e-15, err_msg=name)
    # forward() gives the soft-capped logits, and backward(g) chains through the cap.
    capped = fused.forward(X)
    assert_close(capped, 4.0 * np.tanh(backend.to_numpy(logits) / 4.0), xp=backend.xp)
    _, g_capped = gradcore.softmax_cross_entropy(capped, y, label_smoothing=0.1)
    assert_close(fused.backward(g_capped), dx_ref, rtol=1e-12, atol=1e-15)


def test_head_backward_without_forward_loss_says_so():
    _, fused = _mlp_pair()
    with pytest.raises(RuntimeError, match="forward_loss"):
        fused.backward()
    from gradcore import nn

    with pytest.raises(TypeError, match="LinearCrossEntropy"):
        nn.MLP([2, 3]).forward_loss(np.zeros((1, 2), np.float32), np.zeros(1, np.int64))
    with pytest.raises(TypeError, match="Linear layer"):
        nn.with_fused_head(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="softcap"):
        nn.LinearCrossEntropy(2, 3, softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        nn.LinearCrossEntropy(2, 3, chunk_size=0)


def test_fit_with_the_fused_head_follows_the_plain_model_step_for_step(tmp_path):
    from gradcore import data, nn, train

    X, y = data.spirals(240, classes=3, noise=0.2, seed=1)
    histories = []
    models = []
    for fused in (False, True):
        model = nn.MLP([2, 16, 3], seed=1, dtype="float64")
        if fused:
            model = nn.with_fused_head(model, chunk_size=5)
        h = gradcore.fit(
            model, X, y, loss="cross_entropy", optimizer="adam", epochs=2, batch_size=32,
            progress=False, validation=(X, y),
        )  # fmt: skip
        histories.append(h)
        models.append(model)
    plain, fused = histories
    np.testing.assert_allclose(fused.step_loss, plain.step_loss, rtol=1e-10)
    np.testing.assert_allclose(fused.val_loss, plain.val_loss, rtol=1e-10)
    assert fused.val_accuracy == plain.val_accuracy
    assert fused.accuracy == [None, None]  # the logits it would need are never formed
    for name, p in models[0].state_dict().items():
        np.testing.assert_allclose(models[1].state_dict()[name], p, rtol=1e-9, atol=1e-12)
    # A checkpoint rebuilds the head with its options.
    path = train.save(tmp_path / "head", models[1])
    rebuilt = train.load(path).build_model()
    assert isinstance(rebuilt.layers[-1], nn.LinearCrossEntropy)
    assert rebuilt.layers[-1].chunk_size == 5
    np.testing.assert_array_equal(rebuilt.predict(X), models[1].predict(X))


def test_fit_refuses_loss_options_a_fused_head_would_leave_out():
    from gradcore import data, nn

    X, y = data.spirals(60, classes=3, seed=1)
    model = nn.with_fused_head(nn.MLP([2, 8, 3], seed=1))
    for options in ({"weight": np.ones(3, np.float32)}, {"ignore_index": 0}):
        with pytest.raises(ValueError, match=r"^loss_kwargs \((weight|ignore_index)\)"):
            gradcore.fit(
                model, X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=8,
                progress=False, loss_kwargs=options,
            )  # fmt: skip


def test_cli_fused_head_trains_and_refuses_regression(capsys):
    from gradcore import cli

    assert cli.main(["train", "--fused-head", "--epochs", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "LinearCrossEntropy(64, 3" in out
    accuracy = float(out.split("test accuracy: ")[1].split()[0])
    assert accuracy > 0.8
    assert cli.main(["train", "--fused-head", "--dataset", "linear", "--epochs", "1"]) == 2
    assert "--fused-head needs a classification" in capsys.readouterr().err
