"""gradcore.torch: drop-in autograd losses, checked against torch.nn.functional."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
# Imported at collection: an in-process pytester run elsewhere in the suite restores
# sys.modules afterwards, and a first import of torch._dynamo inside such a run would
# be re-executed later and register its operator library twice.
import torch._dynamo  # noqa: E402

import gradcore  # noqa: E402
import gradcore.torch as gt  # noqa: E402
from gradcore import _dispatch  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CUDA = torch.cuda.is_available()


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=what)


def _upstream(loss, generator):
    """A non-trivial scalar built from the loss: 3 * loss, or a weighted sum of rows."""
    if loss.ndim == 0:
        return 3.0 * loss
    r = torch.rand(loss.shape, generator=generator, dtype=loss.dtype) + 0.5
    return (loss * r).sum()


def _grad_of(fn, x, generator_seed):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    _upstream(loss, torch.Generator().manual_seed(generator_seed)).backward()
    return loss.detach(), x.grad


# --- import hygiene -----------------------------------------------------------------------


def test_import_gradcore_imports_no_framework():
    code = (
        "import sys, gradcore, gradcore.losses\n"
        "bad = [m for m in ('torch', 'jax', 'cupy', 'dask', 'mpi4py') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- cross-entropy against torch.nn.functional ---------------------------------------------

SHAPES = {"2d": (6, 5), "nd": (3, 5, 4), "1d": (5,)}


def _xent_case(shape_name, target_kind, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[shape_name]
    C = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2
    rows = tuple(s for i, s in enumerate(shape) if i != (1 if len(shape) > 1 else 0))
    if target_kind == "soft":
        y = torch.softmax(
            torch.randn(shape, generator=g, dtype=dtype), dim=1 if len(shape) > 1 else 0
        )
    else:
        y = torch.randint(0, C, rows, generator=g)
        if target_kind == "ignored" and y.ndim:
            y.view(-1)[::3] = 2  # ignore_index=2 below: several rows drop out
    w = torch.rand(C, generator=g, dtype=dtype) + 0.5
    return x, y, w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("target_kind", ["hard", "ignored", "soft"])
@pytest.mark.parametrize("shape_name", ["2d", "nd", "1d"])
def test_cross_entropy_matches_torch(
    dtype, reduction, weighted, smoothing, target_kind, shape_name
):
    x, y, w = _xent_case(shape_name, target_kind, dtype)
    kw = {
        "weight": w if weighted else None,
        "reduction": reduction,
        "label_smoothing": smoothing,
        "ignore_index": 2 if target_kind == "ignored" else -100,
    }
    loss, grad = _grad_of(lambda t: gt.cross_entropy(t, y, **kw), x, 1)
    ref_loss, ref_grad = _grad_of(lambda t: F.cross_entropy(t, y, **kw), x, 1)
    _close(loss, ref_loss, dtype, "loss")
    _close(grad, ref_grad, dtype, "grad")


def _z_reference(x, y, weight, ignore_index, reduction, smoothing, z):
    """F.cross_entropy plus z * lse^2 per counted row, in the cross-entropy's divisor."""
    axis = 1 if x.ndim > 1 else 0
    ce = F.cross_entropy(
        x, y, weight=weight, ignore_index=ignore_index, reduction="none", label_smoothing=smoothing
    )
    lse = torch.logsumexp(x, dim=axis)
    if y.is_floating_point():
        active = torch.ones_like(lse, dtype=torch.bool)
        divisor = torch.tensor(float(lse.numel()), dtype=x.dtype)
    else:
        active = y != ignore_index
        w_y = torch.ones_like(lse) if weight is None else weight[y.clamp(0)]
        divisor = torch.where(active, w_y, 0).sum()
    rows = ce + torch.where(active, z * lse**2, 0)
    if reduction == "none":
        return rows
    return rows.sum() / divisor if reduction == "mean" else rows.sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target_kind", ["ignored", "soft"])
def test_cross_entropy_z_loss(dtype, reduction, weighted, target_kind):
    x, y, w = _xent_case("nd", target_kind, dtype, seed=3)
    weight = w if weighted else None
    ignore = 2 if target_kind == "ignored" else -100
    loss, grad = _grad_of(
        lambda t: gt.cross_entropy(
            t, y, weight, ignore_index=ignore, reduction=reduction, label_smoothing=0.1, z_loss=0.01
        ),
        x,
        2,
    )
    ref_loss, ref_grad = _grad_of(
        lambda t: _z_reference(t, y, weight, ignore, reduction, 0.1, 0.01), x, 2
    )
    _close(loss, ref_loss, dtype, "loss")
    _close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["hard", "ignored", "soft"])
def test_cross_entropy_softcap_matches_autograd_through_tanh(dtype, reduction, target_kind):
    x, y, w = _xent_case("2d", target_kind, dtype, seed=5)
    x = x * 4.0  # logits large enough for the cap to bend them
    cap = 3.0
    ignore = 2 if target_kind == "ignored" else -100
    options = {"ignore_index": ignore, "reduction": reduction, "label_smoothing": 0.1}
    loss, grad = _grad_of(
        lambda t: gt.cross_entropy(t, y, w, softcap=cap, z_loss=0.01, **options), x, 4
    )

    def reference(t):  # PyTorch autograd through the cap c tanh(t / c)
        return _z_reference(cap * torch.tanh(t / cap), y, w, ignore, reduction, 0.1, 0.01)

    ref_loss, ref_grad = _grad_of(reference, x, 4)
    _close(loss, ref_loss, dtype, "loss")
    _close(grad, ref_grad, dtype, "grad")


def test_cross_entropy_legacy_size_average_and_positional_arguments():
    x, y, w = _xent_case("2d", "hard", torch.float64)
    with pytest.warns(UserWarning, match="deprecated"):
        ours = gt.cross_entropy(x, y, w, False)  # size_average=False: a sum
    _close(ours, F.cross_entropy(x, y, w, reduction="sum"), torch.float64, "loss")


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_target"])
def test_cross_entropy_non_contiguous_inputs(layout):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    if layout == "transposed":
        x = base.t()  # (9, 12): class axis 1 is the contiguous one of the storage
    else:
        x = base[::2, 1:8]
    y = torch.randint(0, x.shape[1], (x.shape[0],), generator=g)
    if layout == "expanded_target":
        y = torch.tensor([1]).expand(x.shape[0])
    loss, grad = _grad_of(lambda t: gt.cross_entropy(t, y, reduction="none"), x, 6)
    ref_loss, ref_grad = _grad_of(lambda t: F.cross_entropy(t, y, reduction="none"), x, 6)
    _close(loss, ref_loss, torch.float64, "loss")
    _close(grad, ref_grad, torch.float64, "grad")
    # The gradient has the layout torch.empty_like gives (what the fake impl promises).
    assert grad.stride() == torch.empty_like(x).stride()


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.full((4,), -100)
    loss = gt.cross_entropy(x, y)
    assert torch.isnan(loss)
    assert torch.isnan(F.cross_entropy(x.detach(), y))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_retain_graph_backward_twice():
    x, y, _ = _xent_case("2d", "hard", torch.float64)
    x.requires_grad_(True)
    ref = torch.autograd.grad(F.cross_entropy(x, y), x)[0]
    loss = gt.cross_entropy(x, y)
    for k in (1, 2, 3):  # the saved gradient must not be scaled or accumulated into
        loss.backward(retain_graph=True)
        _close(x.grad, k * ref, torch.float64, f"backward {k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cross_entropy_half_precision_on_cpu_takes_the_generic_path(dtype, monkeypatch):
    calls = _count_numpy_fast_path(monkeypatch)
    x64, y, w = _xent_case("2d", "hard", torch.float64)
    x = x64.to(dtype).requires_grad_(True)
    loss = gt.cross_entropy(x, y, w.to(dtype), label_smoothing=0.1)
    loss.backward()
    assert calls == []
    assert loss.dtype == dtype
    assert x.grad.dtype == dtype
    ref_x = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(ref_x, y, w.to(dtype).double(), label_smoothing=0.1)
    ref.backward()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol)


def test_gradients_of_targets_and_weights_are_refused_not_zero():
    x, y, w = _xent_case("2d", "soft", torch.float64)
    with pytest.raises(NotImplementedError, match="target"):
        torch.func.grad(lambda t: gt.cross_entropy(x, t))(y)
    with pytest.raises(NotImplementedError, match="target"):
        torch.func.grad(lambda t: gt.binary_cross_entropy_with_logits(x, t))(torch.rand_like(x))
    with pytest.raises(NotImplementedError, match="target"):
        gt.cross_entropy(x, y.requires_grad_(True))
    xh, yh, _ = _xent_case("2d", "hard", torch.float64)
    with pytest.raises(NotImplementedError, match="weight"):
        gt.cross_entropy(xh, yh, w.requires_grad_(True))
    with pytest.raises(NotImplementedError, match="pos_weight"):
        gt.binary_cross_entropy_with_logits(
            xh, torch.rand_like(xh), pos_weight=torch.ones(5, dtype=xh.dtype, requires_grad=True)
        )


def test_cross_entropy_bad_label_raises_value_error():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        gt.cross_entropy(x, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="reduction"):
        gt.cross_entropy(x, torch.tensor([0, 1, 1]), reduction="avg")


# --- MSE and BCE ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_loss_matches_torch(dtype, reduction, weighted):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, generator=g, dtype=dtype)
    target = torch.randn(6, 4, generator=g, dtype=dtype)
    weight = torch.rand(6, 4, generator=g, dtype=dtype) + 0.5 if weighted else None

    def run(fn):
        xr = x.clone().requires_grad_(True)
        tr = target.clone().requires_grad_(True)
        loss = fn(xr, tr, reduction=reduction, weight=weight)
        _upstream(loss, torch.Generator().manual_seed(8)).backward()
        return loss.detach(), xr.grad, tr.grad

    ours, ref = run(gt.mse_loss), run(F.mse_loss)
    for a, b, what in zip(ours, ref, ("loss", "input grad", "target grad"), strict=True):
        _close(a, b, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_with_logits_matches_torch(dtype, reduction, weighted, pos_weighted):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=g, dtype=dtype) * 4
    target = torch.rand(6, 4, generator=g, dtype=dtype)
    weight = torch.rand(6, 4, generator=g, dtype=dtype) + 0.5 if weighted else None
    pos = torch.rand(4, generator=g, dtype=dtype) * 3 if pos_weighted else None
    kw = {"weight": weight, "reduction": reduction, "pos_weight": pos}
    loss, grad = _grad_of(lambda t: gt.binary_cross_entropy_with_logits(t, target, **kw), x, 10)
    ref_loss, ref_grad = _grad_of(
        lambda t: F.binary_cross_entropy_with_logits(t, target, **kw), x, 10
    )
    _close(loss, ref_loss, dtype, "loss")
    _close(grad, ref_grad, dtype, "grad")


def test_modules_are_torch_modules_with_the_same_results():
    x, y, w = _xent_case("2d", "hard", torch.float64)
    ours = gt.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    _close(ours(x, y), ref(x, y), torch.float64, "CrossEntropyLoss")
    t = torch.rand_like(x)
    _close(gt.MSELoss(reduction="sum")(x, t), torch.nn.MSELoss(reduction="sum")(x, t),
           torch.float64, "MSELoss")  # fmt: skip
    pos = torch.full((5,), 2.0, dtype=torch.float64)
    _close(
        gt.BCEWithLogitsLoss(pos_weight=pos)(x, t),
        torch.nn.BCEWithLogitsLoss(pos_weight=pos)(x, t),
        torch.float64,
        "BCEWithLogitsLoss",
    )
    assert "z_loss" in repr(gt.CrossEntropyLoss(z_loss=1e-4))


# --- routing: the NumPy fast path, zero-copy ----------------------------------------------


def _count_numpy_fast_path(monkeypatch, op="softmax_cross_entropy"):
    """Wrap the registered NumPy fast path of ``op``; return the list of its calls."""
    import array_api_compat.numpy as np_compat

    fast = _dispatch.fast_path_for(op, np_compat)
    assert fast is not None
    calls = []

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return fast(*args, **kwargs)

    monkeypatch.setitem(_dispatch._registry, ("numpy", op), counting)
    monkeypatch.setattr(_dispatch, "_cache", {})
    return calls


def test_cpu_route_takes_the_numpy_fast_path_on_views(monkeypatch):
    calls = _count_numpy_fast_path(monkeypatch)
    x = torch.randn(64, 33, requires_grad=True)
    y = torch.randint(0, 33, (64,))
    loss = gt.cross_entropy(x, y)
    loss.backward()
    assert len(calls) == 1
    (logits, labels), kwargs = calls[0]
    assert isinstance(logits, np.ndarray)
    assert type(logits) is np.ndarray
    # Views, not copies: the kernel reads the tensors' own memory and writes into
    # a buffer that PyTorch allocated (the gradient the backward hands on).
    assert logits.__array_interface__["data"][0] == x.data_ptr()
    assert labels.__array_interface__["data"][0] == y.data_ptr()
    out = kwargs["out"]
    assert out.__array_interface__["data"][0] == x.grad.data_ptr()


def test_cpu_route_hands_the_kernel_numpy_arrays_not_tensors(monkeypatch):
    # Tensors reaching the kernel would run the generic body in PyTorch ops.
    seen = []
    original = gradcore.losses.softmax_cross_entropy

    def spy(*args, **kwargs):
        seen.append(type(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(gradcore.losses, "softmax_cross_entropy", spy)
    x = torch.randn(8, 5, requires_grad=True)
    gt.cross_entropy(x, torch.randint(0, 5, (8,))).backward()
    assert seen == [np.ndarray]


def test_inplace_writes_the_gradient_into_the_logits_storage():
    g = torch.Generator().manual_seed(11)
    h = torch.randn(32, 16, generator=g, requires_grad=True)
    W = torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    logits = h @ W
    storage = logits.data_ptr()
    seen = []
    logits.register_hook(lambda grad: seen.append(grad.data_ptr()))
    loss = gt.cross_entropy(logits, y, inplace=True)
    loss.backward()
    assert seen == [storage]  # the gradient handed on IS the logits' storage: no copy

    ref_h = h.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_h @ W, y)
    ref.backward()
    _close(loss.detach(), ref.detach(), torch.float32, "loss")
    _close(h.grad, ref_h.grad, torch.float32, "grad")


def test_inplace_with_scaled_upstream_gradient():
    x, y, w = _xent_case("nd", "ignored", torch.float64)
    kw = {"weight": w, "ignore_index": 2, "reduction": "none", "label_smoothing": 0.1}

    def ours(t):
        return gt.cross_entropy(t * 1.0, y, inplace=True, **kw)  # a non-leaf to overwrite

    loss, grad = _grad_of(ours, x, 12)
    ref_loss, ref_grad = _grad_of(lambda t: F.cross_entropy(t, y, **kw), x, 12)
    _close(loss, ref_loss, torch.float64, "loss")
    _close(grad, ref_grad, torch.float64, "grad")


def test_inplace_is_loud_when_the_logits_are_needed_elsewhere():
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    # exp saves its output for its backward; overwriting it must not go unnoticed.
    logits = torch.exp(x)
    loss = gt.cross_entropy(logits, y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    # Using the overwritten logits in later differentiated work raises too.
    logits = x * 2.0
    loss = gt.cross_entropy(logits, y, inplace=True)
    with pytest.raises(RuntimeError, match="inplace=True"):
        (loss + logits.sum()).backward()

    # A parameter (leaf that requires grad) is never overwritten.
    with pytest.raises(ValueError, match="leaf"):
        gt.cross_entropy(x, y, inplace=True)
    assert logits._version > 0


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_inplace_elementwise_losses(loss_name):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    t = torch.rand(5, 6, generator=g, dtype=torch.float64)
    ours_fn = gt.mse_loss if loss_name == "mse" else gt.binary_cross_entropy_with_logits
    ref_fn = F.mse_loss if loss_name == "mse" else F.binary_cross_entropy_with_logits
    loss, grad = _grad_of(lambda a: ours_fn(a + 0.0, t, reduction="sum", inplace=True), x, 14)
    ref_loss, ref_grad = _grad_of(lambda a: ref_fn(a, t, reduction="sum"), x, 14)
    _close(loss, ref_loss, torch.float64, "loss")
    _close(grad, ref_grad, torch.float64, "grad")


# --- torch.func and torch.compile ---------------------------------------------------------


def test_torch_func_grad_matches_autograd():
    x, y, w = _xent_case("nd", "ignored", torch.float64)
    kw = {"weight": w, "ignore_index": 2, "label_smoothing": 0.1}
    ours = torch.func.grad(lambda t: 3.0 * gt.cross_entropy(t, y, **kw))(x)
    ref = torch.func.grad(lambda t: 3.0 * F.cross_entropy(t, y, **kw))(x)
    _close(ours, ref, torch.float64, "func.grad")
    rows = torch.rand(3, 4, dtype=torch.float64)
    ours = torch.func.grad(lambda t: (gt.cross_entropy(t, y, reduction="none", **kw) * rows).sum())
    ref = torch.func.grad(lambda t: (F.cross_entropy(t, y, reduction="none", **kw) * rows).sum())
    _close(ours(x), ref(x), torch.float64, "func.grad none")
    t = torch.rand_like(x)
    ours = torch.func.grad(lambda a: gt.binary_cross_entropy_with_logits(a, t))(x)
    ref = torch.func.grad(lambda a: F.binary_cross_entropy_with_logits(a, t))(x)
    _close(ours, ref, torch.float64, "func.grad bce")
    ours = torch.func.grad(lambda a: gt.mse_loss(a, t))(x)
    _close(ours, torch.func.grad(lambda a: F.mse_loss(a, t))(x), torch.float64, "func.grad mse")
    ours = torch.func.grad(lambda b: gt.mse_loss(x, b, reduction="sum"))(t)
    ref = torch.func.grad(lambda b: F.mse_loss(x, b, reduction="sum"))(t)
    _close(ours, ref, torch.float64, "func.grad mse target")


def test_torch_func_grad_ignores_inplace():
    x, y, _ = _xent_case("2d", "hard", torch.float64)
    before = x.clone()
    ours = torch.func.grad(lambda t: gt.cross_entropy(t * 1.0, y, inplace=True))(x)
    _close(ours, torch.func.grad(lambda t: F.cross_entropy(t, y))(x), torch.float64, "grad")
    assert torch.equal(x, before)


def test_higher_order_derivatives_raise_instead_of_dropping_terms():
    x, y, _ = _xent_case("2d", "hard", torch.float64)
    with pytest.raises(NotImplementedError, match="first-order"):
        torch.func.grad(
            lambda t: (torch.func.grad(lambda u: gt.cross_entropy(u, y))(t) ** 2).sum()
        )(x)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gt.cross_entropy(xr, y), xr, create_graph=True)
    with pytest.raises(RuntimeError):
        (g**2).sum().backward()


def _mlp_run(criterion, steps, compile_step=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)
    ).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 5, (64,), generator=g)

    def loss_of(xb, yb):
        return criterion(model(xb), yb)

    if compile_step:
        loss_of = torch.compile(loss_of, fullgraph=True)
    losses = []
    for step in range(steps):
        idx = slice((step * 16) % 64, (step * 16) % 64 + 16)
        opt.zero_grad()
        loss = loss_of(X[idx], Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("inplace", [False, True])
def test_training_loop_tracks_torch_cross_entropy(inplace):
    kw = {"label_smoothing": 0.05}
    ours, ours_params = _mlp_run(gt.CrossEntropyLoss(**kw, inplace=inplace), 50)
    ref, ref_params = _mlp_run(torch.nn.CrossEntropyLoss(**kw), 50)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    for a, b in zip(ours_params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ours[-1] < ours[0]


def test_training_loop_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    # inplace=True is ignored under the compiler (it plans the memory itself).
    ours, ours_params = _mlp_run(gt.CrossEntropyLoss(inplace=True), 50, compile_step=True)
    ref, ref_params = _mlp_run(torch.nn.CrossEntropyLoss(), 50)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    for a, b in zip(ours_params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# --- README ----------------------------------------------------------------------------


def test_readme_pytorch_jax_section_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it from PyTorch / JAX", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        if "import jax" in block:
            pytest.importorskip("jax")
        exec(compile(block, "README: Use it from PyTorch / JAX", "exec"), {})


# --- CUDA ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_route_matches_cpu_on_a_side_stream(dtype, reduction):
    pytest.importorskip("cupy")
    g = torch.Generator().manual_seed(15)
    x = (torch.randn(64, 1000, generator=g) * 3).to(dtype)
    y = torch.randint(0, 1000, (64,), generator=g)
    y[::7] = -100
    w = torch.rand(1000, generator=g) + 0.5
    kw = {"weight": w, "label_smoothing": 0.1, "reduction": reduction}
    cpu_loss, cpu_grad = _grad_of(lambda t: gt.cross_entropy(t.double(), y, **kw), x.double(), 16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        xc = x.cuda().requires_grad_(True)
        loss = gt.cross_entropy(xc, y.cuda(), w.cuda(), label_smoothing=0.1, reduction=reduction)
        up = loss * 3.0 if loss.ndim == 0 else (
            loss * (torch.rand(loss.shape, generator=torch.Generator().manual_seed(16),
                               dtype=torch.float64) + 0.5).to(loss.device, loss.dtype)
        ).sum()  # fmt: skip
        up.backward()
    stream.synchronize()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss.detach().cpu().double(), cpu_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(xc.grad.cpu().double(), cpu_grad, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_route_takes_the_cupy_fast_path(monkeypatch):
    pytest.importorskip("cupy")
    import array_api_compat.cupy as cp_compat

    fast = _dispatch.fast_path_for("softmax_cross_entropy", cp_compat)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fast(*args, **kwargs)

    monkeypatch.setitem(_dispatch._registry, ("cupy", "softmax_cross_entropy"), counting)
    monkeypatch.setattr(_dispatch, "_cache", {})
    x = torch.randn(16, 100, device="cuda", requires_grad=True)
    gt.cross_entropy(x, torch.randint(0, 100, (16,), device="cuda")).backward()
    torch.cuda.synchronize()
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["xent_nd", "xent_soft", "mse", "bce"])
def test_cuda_other_losses_and_layouts_match_cpu(dtype, case):
    g = torch.Generator().manual_seed(17)
    if case.startswith("xent"):
        shape = (8, 50, 3) if case == "xent_nd" else (16, 50)
        x = torch.randn(shape, generator=g)
        if case == "xent_nd":
            t = torch.randint(0, 50, (8, 3), generator=g)
        else:
            t = torch.softmax(torch.randn(shape, generator=g), dim=1)
        fn = gt.cross_entropy
    else:
        x = torch.randn(32, 7, generator=g)
        t = torch.rand(32, 7, generator=g)
        fn = gt.mse_loss if case == "mse" else gt.binary_cross_entropy_with_logits
    x = x.to(dtype)
    cpu_x = x.double().requires_grad_(True)
    cpu_t = t.double() if t.is_floating_point() else t
    fn(cpu_x, cpu_t).backward()
    dev_x = x.cuda().requires_grad_(True)
    dev_t = (t.to(dtype) if t.is_floating_point() else t).cuda()
    loss = fn(dev_x, dev_t)
    (loss * 3.0).backward()
    torch.cuda.synchronize()
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(loss.double().cpu(), fn(cpu_x.detach(), cpu_t), rtol=tol, atol=tol)
    torch.testing.assert_close(dev_x.grad.double().cpu(), 3.0 * cpu_x.grad, rtol=tol, atol=tol)


def _logits_sized_ops(fn, numel):
    """The PyTorch ops that write a tensor of ``numel`` elements while ``fn`` runs
    (views such as ``detach`` write nothing and are left out)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() == numel and not func.is_view:
                    seen.append(str(func))
            return out

    with Record():
        fn()
    return seen


def test_backward_makes_no_pass_over_the_logits():
    # The kernel's gradient is handed on as is for loss.backward() (upstream exactly 1):
    # no multiply, and no zero tensor materialised for the op's gradient output.
    x = torch.randn(64, 37, requires_grad=True)
    y = torch.randint(0, 37, (64,))
    for reduction in ("mean", "sum"):
        x.grad = None
        loss = gt.cross_entropy(x, y, reduction=reduction)
        assert _logits_sized_ops(loss.backward, x.numel()) == []
    # A scaled upstream gradient costs exactly one multiply.
    x.grad = None
    loss = gt.cross_entropy(x, y) * 3.0
    assert _logits_sized_ops(loss.backward, x.numel()) == ["aten.mul.Tensor"]


def test_every_loss_and_reduction_under_torch_compile_fullgraph():
    # The fake implementations (shapes of "none", MSE, BCE) only matter when traced.
    torch._dynamo.reset()
    x, y, w = _xent_case("nd", "ignored", torch.float64, seed=19)
    t = torch.rand(3, 5, 4, dtype=torch.float64)
    pos = torch.full((4,), 2.0, dtype=torch.float64)
    r = torch.rand(3, 4, dtype=torch.float64) + 0.5

    def total(mod, a):
        rows = mod.cross_entropy(a, y, w, ignore_index=2, reduction="none", label_smoothing=0.1)
        mse = mod.mse_loss(a, t, weight=t + 0.5)
        bce = mod.binary_cross_entropy_with_logits(a, t, pos_weight=pos, reduction="sum")
        return (rows * r).sum() + 2.0 * mse + bce

    compiled = torch.compile(lambda a: total(gt, a), fullgraph=True)
    loss, grad = _grad_of(compiled, x, 20)
    ref_loss, ref_grad = _grad_of(lambda a: total(F, a), x, 20)
    _close(loss, ref_loss, torch.float64, "loss")
    _close(grad, ref_grad, torch.float64, "grad")


# --- linear + cross-entropy ----------------------------------------------------------------


def _lxent_case(target_kind, dtype, seed=0, n=9, h=4, v=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype)
    W = torch.randn(v, h, generator=g, dtype=dtype)  # PyTorch's (C, in_features) layout
    b = torch.randn(v, generator=g, dtype=dtype)
    if target_kind == "soft":
        y = torch.softmax(torch.randn(n, v, generator=g, dtype=dtype), dim=1)
    else:
        y = torch.randint(0, v, (n,), generator=g)
        if target_kind == "ignored":
            y[::3] = 2
        elif target_kind == "all_ignored":
            y[:] = 2
    w = torch.rand(v, generator=g, dtype=dtype) + 0.5
    return x, W, b, y, w


def _lxent_grads(fn, x, W, b, seed):
    """loss, and the gradients of a non-trivial function of it for x, W and b."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W, b) if t is not None]
    loss = fn(*leaves, *([None] if b is None else []))
    _upstream(loss, torch.Generator().manual_seed(seed)).backward()
    return [loss.detach(), *(t.grad for t in leaves)]


def _close_nan(actual, expected, dtype, what):
    tol = TOL[dtype]
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True, msg=what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("affine", ["plain", "bias_and_class_weights"])
@pytest.mark.parametrize("target_kind", ["hard", "ignored", "all_ignored", "soft"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("extras", ["none", "z_loss_and_softcap"])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_linear_cross_entropy_matches_torch_autograd(
    dtype, reduction, affine, target_kind, smoothing, extras, chunk_size
):
    x, W, b, y, w = _lxent_case(target_kind, dtype, seed=7)
    x = x * 2.0  # logits large enough for the cap to bend them
    if affine == "plain":
        b = w = None
    ignore = 2 if "ignored" in target_kind else -100
    z, cap = (0.01, 2.5) if extras == "z_loss_and_softcap" else (0.0, None)
    options = {"weight": w, "reduction": reduction, "label_smoothing": smoothing}

    def ours(xx, WW, bb):
        return gt.linear_cross_entropy(
            xx, WW, y, linear_bias=bb, ignore_index=ignore, z_loss=z, softcap=cap,
            chunk_size=chunk_size, **options,
        )  # fmt: skip

    def reference(xx, WW, bb):  # float64/float32 autograd through the materialised logits
        logits = F.linear(xx, WW, bb)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return _z_reference(logits, y, w, ignore, reduction, smoothing, z)

    got = _lxent_grads(ours, x, W, b, 31)
    want = _lxent_grads(reference, x, W, b, 31)
    for a, e, what in zip(got, want, ("loss", "dx", "dW", "db"), strict=False):
        _close_nan(a, e, dtype, what)
    if target_kind == "all_ignored":
        assert all(bool((g == 0).all()) for g in got[1:]), "all-ignored: zero gradients"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["ignored", "soft"])
def test_linear_cross_entropy_matches_torch_functional(reduction, target_kind):
    # The same call as torch.nn.functional.linear_cross_entropy (its names, its
    # ignore_index=None default, its options object), float32 to 1e-5.
    x, W, b, y, w = _lxent_case(target_kind, torch.float32, seed=3, n=33, h=8, v=11)
    kw = {"linear_bias": b, "weight": w, "reduction": reduction, "label_smoothing": 0.1}
    if target_kind == "ignored":
        kw["ignore_index"] = 2
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=5)
    got = _lxent_grads(lambda a, c, d: gt.linear_cross_entropy(a, c, y, options=opts, **kw), x, W,
                       None, 5)  # fmt: skip
    want = _lxent_grads(lambda a, c, d: F.linear_cross_entropy(a, c, y, **kw), x, W, None, 5)
    for a, e, what in zip(got, want, ("loss", "dx", "dW"), strict=True):
        _close(a, e, torch.float32, what)


def test_linear_cross_entropy_none_with_unequal_row_gradients_is_not_a_scaled_sum():
    # dW of sum_i g_i loss_i is sum_i g_i x_i^T delta_i: rescaling the sum's dW by any
    # one factor is wrong. Checked on rows whose g_i differ by orders of magnitude.
    x, W, b, y, _ = _lxent_case("hard", torch.float64, seed=11, n=6)
    r = torch.tensor([1e-3, 1.0, 10.0, 0.0, -2.0, 5.0], dtype=torch.float64)
    grads = []
    for f in (gt.linear_cross_entropy, F.linear_cross_entropy):
        xx, WW, bb = (t.clone().requires_grad_(True) for t in (x, W, b))
        (f(xx, WW, y, linear_bias=bb, reduction="none") * r).sum().backward()
        grads.append((xx.grad, WW.grad, bb.grad))
    for a, e in zip(*grads, strict=True):
        _close(a, e, torch.float64, "grad")


def test_linear_cross_entropy_unbatched_input_and_partial_requires_grad():
    x, W, b, y, _ = _lxent_case("hard", torch.float64, seed=2, n=1)
    x1, y1 = x[0], y[0]
    for reduction in ("mean", "none"):
        WW = W.clone().requires_grad_(True)
        loss = gt.linear_cross_entropy(x1, WW, y1, linear_bias=b, reduction=reduction)
        (3 * loss).backward()
        WR = W.clone().requires_grad_(True)
        ref = F.cross_entropy(F.linear(x1, WR, b), y1, reduction=reduction)
        (3 * ref).backward()
        _close(loss.detach(), ref.detach(), torch.float64, "loss")
        _close(WW.grad, WR.grad, torch.float64, "dW")


def test_linear_cross_entropy_takes_the_numpy_fast_path_on_cpu(monkeypatch):
    calls = _count_numpy_fast_path(monkeypatch, "linear_cross_entropy")
    x, W, _, y, _ = _lxent_case("hard", torch.float32, n=16)
    x.requires_grad_(True)
    gt.linear_cross_entropy(x, W, y).backward()
    assert len(calls) == 1
    (xn, wn, _), _kwargs = calls[0]
    assert type(xn) is np.ndarray
    assert xn.__array_interface__["data"][0] == x.data_ptr()
    # The (C, H) weight reaches the (H, C) kernel as a transposed view, not a copy.
    assert wn.shape == (4, 6)
    assert wn.__array_interface__["data"][0] == W.data_ptr()


def test_linear_cross_entropy_errors_and_refusals():
    x, W, _b, y, w = _lxent_case("soft", torch.float64)
    with pytest.raises(NotImplementedError, match="target"):
        gt.linear_cross_entropy(x, W, y.clone().requires_grad_(True))
    with pytest.raises(NotImplementedError, match="weight"):
        gt.linear_cross_entropy(x, W, y, weight=w.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="linear_weight"):
        gt.linear_cross_entropy(x, W.reshape(6, 2, 2), y)
    with pytest.raises(ValueError, match="input"):
        gt.linear_cross_entropy(x[:, :3], W, y)
    with pytest.raises(TypeError, match="dtype"):
        gt.linear_cross_entropy(x.float(), W, y)
    with pytest.raises(ValueError, match="reduction"):
        gt.linear_cross_entropy(x, W, y, reduction="avg")


def test_linear_cross_entropy_module_is_the_torch_module():
    torch.manual_seed(0)
    ours = gt.LinearCrossEntropyLoss(4, 6, bias=True, dtype=torch.float64, label_smoothing=0.1)
    ref = torch.nn.LinearCrossEntropyLoss(4, 6, bias=True, dtype=torch.float64,
                                          label_smoothing=0.1)  # fmt: skip
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(ours.state_dict())
    x, _, _, y, _ = _lxent_case("ignored", torch.float64)
    a, e = ours(x, y), ref(x, y)
    _close(a, e, torch.float64, "loss")
    a.backward()
    e.backward()
    _close(ours.linear.weight.grad, ref.linear.weight.grad, torch.float64, "dW")
    _close(ours.linear.bias.grad, ref.linear.bias.grad, torch.float64, "db")
    assert "chunk_size" in repr(gt.LinearCrossEntropyLoss(4, 6, chunk_size=2))
    with pytest.raises(ValueError, match="out_features"):
        gt.LinearCrossEntropyLoss(4, 6, out_features=(2,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_under_torch_compile_fullgraph(reduction):
    torch._dynamo.reset()
    x, W, b, y, w = _lxent_case("ignored", torch.float64, seed=23)
    r = torch.rand(9, dtype=torch.float64) + 0.5

    def total(mod, a, c, d):
        loss = mod.linear_cross_entropy(a, c, y, linear_bias=d, weight=w, ignore_index=2,
                                        reduction=reduction)  # fmt: skip
        return (loss * r).sum() if reduction == "none" else 3.0 * loss

    compiled = torch.compile(lambda a, c, d: total(gt, a, c, d), fullgraph=True)
    got = _lxent_grads(compiled, x, W, b, 1)
    want = _lxent_grads(lambda a, c, d: total(F, a, c, d), x, W, b, 1)
    for a, e in zip(got, want, strict=True):
        _close(a, e, torch.float64, "compiled")


def test_linear_cross_entropy_under_torch_func_grad():
    x, W, b, y, _ = _lxent_case("hard", torch.float64, seed=4)
    r = torch.rand(9, dtype=torch.float64) + 0.5

    def f(mod, c):
        return (mod.linear_cross_entropy(x, c, y, linear_bias=b, reduction="none") * r).sum()

    _close(torch.func.grad(lambda c: f(gt, c))(W), torch.func.grad(lambda c: f(F, c))(W),
           torch.float64, "torch.func.grad")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_half_precision_on_cpu(dtype, reduction):
    # No NumPy dtype: the generic kernel in PyTorch ops, gradients accumulated in float32
    # and returned in the input's dtype; checked against float32 autograd.
    x, W, b, y, _ = _lxent_case("ignored", torch.float32, seed=8, n=20, h=8, v=13)
    options = {"ignore_index": 2, "reduction": reduction}
    half = [t.to(dtype) for t in (x, W, b)]
    got = _lxent_grads(
        lambda a, c, d: gt.linear_cross_entropy(a, c, y, linear_bias=d, **options), *half, 6
    )
    want = _lxent_grads(
        lambda a, c, d: F.cross_entropy(F.linear(a, c, d), y, **options),
        *(t.float() for t in half),
        6,
    )
    for a, e, what in zip(got, want, ("loss", "dx", "dW", "db"), strict=True):
        assert a.dtype == dtype, what
        torch.testing.assert_close(a.float(), e, rtol=2e-2, atol=2e-2 * float(e.abs().max()))
