"""The fused CUDA kernels, executed on the CPU by the simulator, through the real launch
code of ``gradcore.backends.cupy`` (variant, grid and block chosen there).

Every launch runs under two resume orders (three where a test asks) and must give
bit-identical buffers; every buffer is guarded. Each case is checked against the
float64 references and against the generic path on NumPy inputs. Shapes are small and
chosen to hit the boundaries: rows not a multiple of the rows per block, odd class
counts (vector width 1) and even ones (wider vectors), rows that fill a variant's last
register slot partially.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gradcore.backends import cupy as gcp

import gradcore

from . import fakecupy
from .reference import (
    assert_rounded_to_nearest_even,
    bf16_bits,
    bf16_values,
    close,
    ref_pointwise,
    ref_xent,
)

# (rows, classes) per variant: odd C (vector width 1), more rows than a warp block holds.
SHAPES = {"warp": (7, 37), "block": (5, 1001), "cluster": (3, 2051), "online": (4, 1001)}


def _weighted(variant: str, label_kind: str, reduction: str) -> bool:
    """Weights on for half the cases, so each (variant, labels) and (variant, reduction)
    pair sees both (a covering design instead of the full product: builds cost time)."""
    i = list(SHAPES).index(variant) + ["int32", "int64", "soft"].index(label_kind)
    return (i + ["mean", "sum", "none"].index(reduction)) % 2 == 0


def _logits(
    rng: np.random.Generator, shape: tuple[int, int], dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, the array to upload: float32/float16, or bfloat16 bits)."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[1, :: max(2, shape[1] // 7)] = -np.inf  # a masked row (some classes -inf)
    if dtype == "bfloat16":
        bits = bf16_bits(x)
        return bf16_values(bits).astype(np.float64), bits
    xd = x.astype(dtype)
    return xd.astype(np.float64), xd


def _hard_labels(rng: np.random.Generator, x: np.ndarray, dtype: str, *, bad: bool) -> np.ndarray:
    n, C = x.shape
    y = rng.integers(0, C, n)
    y[1] = np.flatnonzero(np.isfinite(x[1]))[0]  # the masked row's label is not masked
    y[::3] = -100  # ignored rows (row 0 among them)
    if bad:
        y[2] = C + 5  # out of range, unchecked: a NaN row
    return y.astype(dtype)


def _host(a: Any, dtype: str) -> np.ndarray:
    h = a.get()
    return bf16_values(h).astype(np.float64) if dtype == "bfloat16" else h.astype(np.float64)


def _run(
    sim: Any, variant: str | None, x: np.ndarray, y: np.ndarray, dtype: str, **kw: Any
) -> tuple[Any, Any]:
    dx = sim.asarray(x)
    dy = sim.asarray(y)
    if kw.get("weight") is not None:
        kw["weight"] = sim.asarray(kw["weight"])
    with gcp.force_xent_variant(variant):
        if dtype == "bfloat16":
            return gcp.softmax_cross_entropy_bf16(dx, dy, **kw)
        return gradcore.softmax_cross_entropy(dx, dy, **kw)


def _generic(x: np.ndarray, y: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    with gradcore.use_fast_paths(False):
        loss, grad = gradcore.softmax_cross_entropy(x, y, **kw)
    return np.asarray(loss, dtype=np.float64), np.asarray(grad, dtype=np.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_kind", ["int32", "int64", "soft"])
@pytest.mark.parametrize("variant", list(SHAPES))
def test_xent_every_option_float32(sim: Any, variant: str, label_kind: str, reduction: str) -> None:
    rng = np.random.default_rng(list(SHAPES).index(variant))
    n, C = SHAPES[variant]
    x64, x = _logits(rng, (n, C), "float32")
    weighted = _weighted(variant, label_kind, reduction)
    w = rng.uniform(0.2, 2.0, C).astype(np.float32) if weighted else None
    if label_kind == "soft":
        y = rng.dirichlet(np.ones(C), size=n).astype(np.float32)
        y[1] = np.where(np.isfinite(x[1]), y[1], 0.0)  # no target mass on masked classes
        y[2] = 0.0  # a row with no target mass
        y[0, 5] = 0.0
    else:
        y = _hard_labels(rng, x, label_kind, bad=True)
    for eps, z in ((0.0, 0.0), (0.1, 1e-3)):
        if label_kind == "soft" and eps > 0:
            x = np.where(np.isfinite(x), x, np.float32(-30.0))  # smoothing puts mass on every class
            x64 = x.astype(np.float64)
        kw = dict(label_smoothing=eps, z_loss=z, reduction=reduction)
        out = sim.full(x.shape, np.nan, dtype=np.float32)  # unwritten elements stay NaN
        loss, grad = _run(
            sim, variant, x, y, "float32", weight=w, out=out, check_labels=False, **kw
        )
        assert grad is out
        assert isinstance(loss, sim.ndarray)
        assert loss.dtype == np.float32
        what = f"{variant} {label_kind} w={weighted} eps={eps} z={z} {reduction}"
        ref_loss, ref_grad = ref_xent(x64, y, weight=w, **kw)  # type: ignore[arg-type]
        close(grad.get(), ref_grad, "float32", "grad " + what)
        close(loss.get(), ref_loss, "float32", "loss " + what)
        g_loss, g_grad = _generic(x, y, weight=w, check_labels=False, **kw)
        close(grad.get(), g_grad, "float32", "vs generic grad " + what)
        close(loss.get(), g_loss, "float32", "vs generic loss " + what)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(SHAPES))
def test_xent_16_bit_logits_round_to_nearest_even(sim: Any, variant: str, dtype: str) -> None:
    """Weights, smoothing and z-loss, int64 labels, the mean; the gradient in place. The
    16-bit outputs are checked bit for bit against the reference rounded to nearest even."""
    rng = np.random.default_rng(20 + list(SHAPES).index(variant))
    n, C = SHAPES[variant]
    C += 1  # even: vectors of 2 or more 16-bit elements
    x64, x = _logits(rng, (n, C), dtype)
    y = _hard_labels(rng, x64, "int64", bad=False)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    kw = dict(weight=w, label_smoothing=0.05, z_loss=1e-4, reduction="none")
    ref_loss, ref_grad = ref_xent(x64, y, **kw)  # type: ignore[arg-type]
    dx = sim.asarray(x)
    with gcp.force_xent_variant(variant):
        if dtype == "bfloat16":
            loss, grad = gcp.softmax_cross_entropy_bf16(
                dx,
                sim.asarray(y),
                inplace=True,
                weight=sim.asarray(w),
                label_smoothing=0.05,
                z_loss=1e-4,
                reduction="none",
            )
        else:
            loss, grad = gradcore.softmax_cross_entropy(
                dx,
                sim.asarray(y),
                inplace=True,
                weight=sim.asarray(w),
                label_smoothing=0.05,
                z_loss=1e-4,
                reduction="none",
            )
    assert grad is dx
    close(_host(grad, dtype), ref_grad, dtype, f"grad {variant} {dtype}")
    close(_host(loss, dtype), ref_loss, dtype, f"loss {variant} {dtype}")
    # no cancellation beyond the size of the terms in the softmax gradient
    assert_rounded_to_nearest_even(
        grad.get(), ref_grad, dtype, f"grad {variant} {dtype}", cancel=1e-10
    )
    assert_rounded_to_nearest_even(loss.get(), ref_loss, dtype, f"loss {variant} {dtype}")
    # the mean through the float32 per-row losses and xent_finalize
    with gcp.force_xent_variant(variant):
        run = (
            gcp.softmax_cross_entropy_bf16
            if dtype == "bfloat16"
            else gradcore.softmax_cross_entropy
        )
        loss, _ = run(
            sim.asarray(x), sim.asarray(y), weight=sim.asarray(w), label_smoothing=0.05, z_loss=1e-4
        )
    ref_loss, _ = ref_xent(x64, y, **{**kw, "reduction": "mean"})  # type: ignore[arg-type]
    close(_host(loss, dtype), ref_loss, dtype, f"mean {variant} {dtype}")


@pytest.mark.parametrize(
    ("C", "cc", "expected"),
    [
        (1024, 90, "VARIANT=0"),  # a warp holds 1024 floats (vector width 4)
        (1026, 90, "VARIANT=1"),  # one more vector: a block
        (16386, 90, "VARIANT=2"),  # past 512 threads * 32 floats: a cluster of 2
        (16386, 80, "VARIANT=3"),  # no clusters before sm_90: online
        (131076, 90, "VARIANT=3"),  # past 8 blocks * 512 threads * 32 floats: online
    ],
)
def test_xent_automatic_choice_across_thresholds(sim: Any, C: int, cc: int, expected: str) -> None:
    fakecupy.config.compute_capability = [cc, cc]
    rng = np.random.default_rng(C)
    x64, x = _logits(rng, (2, C), "float32")
    y = _hard_labels(rng, x64, "int32", bad=False)
    y[0] = 3
    loss, grad = _run(sim, None, x, y, "float32", reduction="sum", label_smoothing=0.1)
    ref_loss, ref_grad = ref_xent(x64, y, reduction="sum", label_smoothing=0.1)
    close(grad.get(), ref_grad, "float32", f"grad C={C}")
    close(loss.get(), ref_loss, "float32", f"loss C={C}")
    assert f"-D{expected}" in _rows_options(-1)


def _rows_options(i: int) -> str:
    """The -D options of the i-th launch of xent_rows."""
    return [la for la in fakecupy.config.launches if la["kernel"] == "xent_rows"][i]["options"]


def _torch_xent(x: np.ndarray, y: np.ndarray, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    torch = pytest.importorskip("torch")
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    w = kw.pop("weight", None)
    loss = torch.nn.functional.cross_entropy(
        t, torch.tensor(y), weight=None if w is None else torch.tensor(w, dtype=torch.float64), **kw
    )
    loss.backward()
    return loss.detach().numpy(), t.grad.numpy()


@pytest.mark.parametrize("variant", ["warp", "block", "cluster", "online"])
def test_xent_zero_divisor_is_pytorchs(sim: Any, variant: str) -> None:
    """The mean's divisor 0: every present label has class weight 0, or every row is
    ignored. PyTorch gives a NaN loss, NaN gradient rows for the rows not ignored and
    zero rows for the ignored ones; so do the kernels (they gave +-inf before)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    w = np.ones(40, dtype=np.float32)
    w[[1, 2]] = 0.0
    cases = [
        (np.array([1, 2, -100, 1, 2, 1]), w, 0.0),
        (np.array([1, 2, -100, 1, 2, 1]), w, 0.2),
        (np.full(6, -100), None, 0.0),
        (np.full(6, -100), w, 0.2),
    ]
    for y, weight, eps in cases:
        t_loss, t_grad = _torch_xent(x, y, weight=weight, label_smoothing=eps)
        for z in (0.0, 1e-2):
            loss, grad = _run(
                sim, variant, x, y, "float32", weight=weight, label_smoothing=eps, z_loss=z
            )
            what = f"{variant} y={y.tolist()} eps={eps} z={z}"
            assert np.isnan(float(loss.get())), what
            assert np.isnan(t_loss), what
            np.testing.assert_array_equal(np.isnan(grad.get()), np.isnan(t_grad), err_msg=what)
            np.testing.assert_array_equal(grad.get()[y == -100], 0.0, err_msg=what)
            ref_loss, ref_grad = ref_xent(
                x.astype(np.float64),
                y,
                weight=weight,
                label_smoothing=eps,
                z_loss=z,
                reduction="mean",
            )
            np.testing.assert_array_equal(np.isnan(ref_grad), np.isnan(t_grad), err_msg=what)
            assert np.isnan(ref_loss), what


@pytest.mark.parametrize("variant", ["warp", "online"])
def test_xent_ignore_index_inside_the_classes(sim: Any, variant: str) -> None:
    """ignore_index = 3, a real class: rows labelled 3 are ignored, and the mean's
    divisor leaves them out (a divisor counting them passes every other test)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((9, 30)).astype(np.float32)
    y = np.array([3, 0, 3, 7, 29, 3, 1, 2, 3])
    w = rng.uniform(0.5, 2.0, 30).astype(np.float32)
    for weight in (None, w):
        loss, grad = _run(sim, variant, x, y, "float32", weight=weight, ignore_index=3)
        t_loss, t_grad = _torch_xent(x, y, weight=weight, ignore_index=3)
        close(grad.get(), t_grad, "float32", "grad")
        close(loss.get(), t_loss, "float32", "loss")
        np.testing.assert_array_equal(grad.get()[y == 3], 0.0)


def test_xent_labels_converted_on_the_logits_device(sim: Any) -> None:
    """Logits on device 1 while device 0 is current, int16 labels: the int64 copy of the
    labels must be made on device 1 (it was made on the current device)."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal((5, 50)).astype(np.float32)
    y = rng.integers(0, 50, 5).astype(np.int16)
    with sim.cuda.Device(1):
        dx, dy = sim.asarray(x), sim.asarray(y)
    assert fakecupy.config.current == 0
    loss, grad = gradcore.softmax_cross_entropy(dx, dy)
    assert grad.device.id == 1
    assert loss.device.id == 1
    ref_loss, ref_grad = ref_xent(x.astype(np.float64), y.astype(np.int64))
    close(grad.get(), ref_grad, "float32", "grad")
    close(loss.get(), ref_loss, "float32", "loss")


def test_cluster_fallback_only_on_cluster_errors(sim: Any) -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 16386)).astype(np.float32)
    y = np.array([5, 16385])
    ref_loss, ref_grad = ref_xent(x.astype(np.float64), y)
    # A sticky error from an earlier kernel, reported at this launch: raised, and the
    # device keeps its clusters.
    fakecupy.config.fail_launches.append(("xent_rows", fakecupy.CUDA_ERROR_ILLEGAL_ADDRESS))
    with pytest.raises(fakecupy.CUDADriverError):
        gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y))
    assert 0 not in gcp._no_clusters
    # The driver refuses the cluster: the online variant answers, and is used from then on.
    fakecupy.config.fail_launches.append(("xent_rows", fakecupy.CUDA_ERROR_INVALID_CLUSTER_SIZE))
    loss, grad = gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y))
    assert 0 in gcp._no_clusters
    close(grad.get(), ref_grad, "float32", "grad after the fallback")
    close(loss.get(), ref_loss, "float32", "loss after the fallback")
    assert "-DVARIANT=3" in _rows_options(-1)


def test_kernels_are_fetched_once_per_specialisation(sim: Any) -> None:
    x = np.zeros((3, 20), dtype=np.float32)
    y = np.array([1, 2, 3])
    gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y))
    calls = fakecupy.config.get_function_calls
    assert calls == 3  # denominator, rows, finalize
    for _ in range(3):
        gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y))
    assert fakecupy.config.get_function_calls == calls


def test_xent_output_overlapping_an_input_is_refused(sim: Any) -> None:
    rng = np.random.default_rng(15)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    t = rng.dirichlet(np.ones(16), size=4).astype(np.float32)
    buf = sim.asarray(np.concatenate([x, t]))  # logits and soft targets in one buffer
    dx, dt = buf[:4], buf[4:]
    with pytest.raises(ValueError, match="overlaps labels"):
        gradcore.softmax_cross_entropy(dx, dt, out=dt)
    with pytest.raises(ValueError, match="out overlaps logits"):
        gradcore.softmax_cross_entropy(dx, dt, out=buf[1:5])
    # int64 labels, and a float32 weight, overlapping the gradient buffer
    raw = sim.zeros(4 * 16 + 16, dtype=np.float32)
    labels = raw[:8].view(np.int64)
    labels[...] = sim.asarray(np.array([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="overlaps labels"):
        gradcore.softmax_cross_entropy(sim.asarray(x), labels, out=raw[:64].reshape(4, 16))
    w = raw[64:]
    w.fill(1.0)
    with pytest.raises(ValueError, match="overlaps weight"):
        gradcore.softmax_cross_entropy(
            sim.asarray(x),
            sim.asarray(np.array([1, 2, 3, 4])),
            weight=w,
            out=raw[16:80].reshape(4, 16),
        )
    # exactly in place stays allowed, and right
    loss, grad = gradcore.softmax_cross_entropy(dx, dt, out=dx)
    ref_loss, ref_grad = ref_xent(x.astype(np.float64), t.astype(np.float64))
    close(grad.get(), ref_grad, "float32", "out=logits")
    close(loss.get(), ref_loss, "float32", "out=logits")


def test_pointwise_output_overlapping_an_input_is_refused(sim: Any) -> None:
    rng = np.random.default_rng(16)
    buf = sim.asarray(rng.standard_normal(64).astype(np.float32))
    x, t = buf[:32], buf[32:]
    with pytest.raises(ValueError, match="overlaps target"):
        gradcore.mse(x, t, out=t)
    with pytest.raises(ValueError, match="overlaps targets"):
        gradcore.binary_cross_entropy_with_logits(
            sim.asarray(np.zeros(32, np.float32)), t, out=buf[16:48]
        )
    w = sim.asarray(np.ones(32, np.float32))
    with pytest.raises(ValueError, match="overlaps weight"):
        gradcore.mse(sim.asarray(np.zeros(32, np.float32)), t, weight=w, out=w)


@pytest.mark.parametrize("label_kind", ["int64", "soft"])
@pytest.mark.parametrize("variant", list(SHAPES))
def test_xent_softcap(sim: Any, variant: str, label_kind: str) -> None:
    """Gemma 2 soft-capping, c * tanh(z / c), against the reference and PyTorch autograd
    through the cap; -inf logits are capped to -c (their gradient is 0)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(50 + list(SHAPES).index(variant))
    n, C = SHAPES[variant]
    x64, x = _logits(rng, (n, C), "float32")
    x[0, :3] = [60.0, -45.0, 25.0]  # past the cap
    x64 = x.astype(np.float64)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    if label_kind == "soft":
        y = rng.dirichlet(np.ones(C), size=n).astype(np.float32)
        kw: dict[str, Any] = dict(reduction="sum", label_smoothing=0.1)
    else:
        y = _hard_labels(rng, x, "int64", bad=False)
        kw = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3)
    with gcp.force_xent_variant(variant):
        loss, grad = gcp.softmax_cross_entropy(
            sim.asarray(x), sim.asarray(y), weight=sim.asarray(w), softcap=30.0, **kw
        )
    ref_loss, ref_grad = ref_xent(x64, y, weight=w, softcap=30.0, **kw)
    close(grad.get(), ref_grad, "float32", f"grad {variant} {label_kind}")
    close(loss.get(), ref_loss, "float32", f"loss {variant} {label_kind}")
    assert np.all(grad.get()[1][np.isinf(x[1])] == 0.0)
    if "z_loss" not in kw:  # PyTorch has no z-loss
        t = torch.tensor(x64, requires_grad=True)
        capped = 30.0 * torch.tanh(t / 30.0)
        target = torch.tensor(y.astype(np.float64)) if label_kind == "soft" else torch.tensor(y)
        tl = torch.nn.functional.cross_entropy(
            capped, target, weight=torch.tensor(w, dtype=torch.float64), **kw
        )
        tl.backward()
        close(grad.get(), t.grad.numpy(), "float32", "grad vs torch")
        close(loss.get(), tl.detach().numpy(), "float32", "loss vs torch")


def test_softcap_bf16_and_validation(sim: Any) -> None:
    rng = np.random.default_rng(60)
    x = bf16_bits((rng.standard_normal((5, 64)) * 20).astype(np.float32))
    y = rng.integers(0, 64, 5)
    loss, grad = gcp.softmax_cross_entropy_bf16(
        sim.asarray(x), sim.asarray(y), softcap=15.0, reduction="none"
    )
    ref_loss, ref_grad = ref_xent(
        bf16_values(x).astype(np.float64), y, softcap=15.0, reduction="none"
    )
    close(_host(grad, "bfloat16"), ref_grad, "bfloat16", "grad")
    assert_rounded_to_nearest_even(grad.get(), ref_grad, "bfloat16", "grad", cancel=1e-10)
    assert_rounded_to_nearest_even(loss.get(), ref_loss, "bfloat16", "loss")
    # The dispatched fast path leaves invalid values to the generic path (its errors);
    # the bf16 entry point, which has no generic twin, raises.
    as_half = sim.asarray(x.view(np.float16))
    assert gcp.softmax_cross_entropy(as_half, sim.asarray(y), softcap=0.0) is NotImplemented
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        gcp.softmax_cross_entropy_bf16(sim.asarray(x), sim.asarray(y), softcap=-1.0)
    with pytest.raises(TypeError, match="softcap must be a float"):
        gcp.softmax_cross_entropy_bf16(sim.asarray(x), sim.asarray(y), softcap="x")


# --- MSE and BCE ---------------------------------------------------------------------------

_WEIGHTS = [
    (None, None),
    ("full", None),
    ("row", "scalar"),  # (37, 1) and ()
    ("last", "last"),  # (C,) and (C,)
]


def _weight(
    rng: np.random.Generator, kind: str | None, shape: tuple[int, int], lo: float, hi: float
) -> np.ndarray | None:
    if kind is None:
        return None
    wshape = {"full": shape, "row": (shape[0], 1), "last": (shape[1],), "scalar": ()}[kind]
    return rng.uniform(lo, hi, wshape).astype(np.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_pointwise_losses(sim: Any, loss_name: str, dtype: str, reduction: str) -> None:
    """A grid-stride loop that wraps (one multiprocessor: at most 8 blocks), odd sizes
    (vector width 1) and even ones, broadcast weights; 16-bit outputs checked bit for bit."""
    fakecupy.config.multiprocessors = 1
    rng = np.random.default_rng(30)
    i = ["mse", "bce"].index(loss_name) + ["float32", "float16", "bfloat16"].index(dtype)
    shape = (37, 97) if (i + ["mean", "sum", "none"].index(reduction)) % 2 else (37, 96)
    wkind, qkind = _WEIGHTS[(i + 2 * ["mean", "sum", "none"].index(reduction)) % 4]
    x32 = (rng.standard_normal(shape) * 3).astype(np.float32)
    y32 = rng.uniform(0, 1, shape).astype(np.float32)
    w = _weight(rng, wkind, shape, 0.5, 2.0)
    q = _weight(rng, qkind, shape, 0.5, 3.0) if loss_name == "bce" else None
    if dtype == "bfloat16":
        xb, yb = bf16_bits(x32), y32
        x64 = bf16_values(xb).astype(np.float64)
        red = reduction
        loss, grad = gcp._pointwise(
            0 if loss_name == "mse" else 1,
            sim.asarray(xb),
            sim.asarray(yb),
            None if w is None else sim.asarray(w),
            None if q is None else sim.asarray(q),
            red,
            None,
            False,
            kind=2,
        )
        y64 = y32.astype(np.float64)
    else:
        xd, yd = x32.astype(dtype), y32.astype(dtype)
        x64, y64 = xd.astype(np.float64), yd.astype(np.float64)
        f = gradcore.mse if loss_name == "mse" else gradcore.binary_cross_entropy_with_logits
        kw: dict[str, Any] = dict(reduction=reduction)
        if w is not None:
            kw["weight"] = w
        if q is not None:
            kw["pos_weight"] = q
        out = sim.full(shape, np.nan, dtype=dtype)
        loss, grad = f(
            sim.asarray(xd),
            sim.asarray(yd),
            out=out,
            **{k: sim.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()},
        )
        assert grad is out
        with gradcore.use_fast_paths(False):
            g_loss, g_grad = f(xd, yd, **kw)
        close(grad.get(), g_grad, dtype, "vs generic grad")
        close(loss.get(), g_loss, dtype, "vs generic loss")
    ref_loss, ref_grad = ref_pointwise(
        loss_name, x64, y64, weight=w, pos_weight=q, reduction=reduction
    )
    what = f"{loss_name} {dtype} {reduction} w={wkind} q={qkind} {shape}"
    close(_host(grad, dtype), ref_grad, dtype, "grad " + what)
    close(_host(loss, dtype), ref_loss, dtype, "loss " + what)
    if dtype != "float32":
        assert_rounded_to_nearest_even(grad.get(), ref_grad, dtype, "grad " + what)
        if reduction == "none":
            assert_rounded_to_nearest_even(loss.get(), ref_loss, dtype, "loss " + what)


@pytest.mark.parametrize("target_dtype", ["bool", "int32", "int64"])
def test_bce_integer_targets_in_place(sim: Any, target_dtype: str) -> None:
    rng = np.random.default_rng(31)
    x = rng.standard_normal((33, 3)).astype(np.float32)
    t = rng.integers(0, 2, (33, 3)).astype(target_dtype)
    dx = sim.asarray(x)
    loss, grad = gradcore.binary_cross_entropy_with_logits(dx, sim.asarray(t), inplace=True)
    assert grad is dx
    ref_loss, ref_grad = ref_pointwise("bce", x, t.astype(np.float64))
    close(grad.get(), ref_grad, "float32", "grad")
    close(loss.get(), ref_loss, "float32", "loss")


@pytest.mark.parametrize(("offset", "C", "vec"), [(0, 64, 4), (1, 64, 1), (2, 64, 2), (0, 66, 2)])
def test_xent_vector_width_follows_alignment_and_pitch(
    sim: Any, offset: int, C: int, vec: int
) -> None:
    """A view 4 or 8 bytes past an aligned address, or rows whose pitch is not a multiple
    of 4 elements: narrower vectors, the same values."""
    rng = np.random.default_rng(40 + offset)
    x = rng.standard_normal((3, C)).astype(np.float32)
    y = rng.integers(0, C, 3)
    buf = sim.zeros(3 * C + 8, dtype=np.float32)
    view = buf[offset : offset + 3 * C].reshape(3, C)
    view[...] = sim.asarray(x)
    loss, grad = gradcore.softmax_cross_entropy(view, sim.asarray(y))
    assert f"-DVEC={vec}" in _rows_options(-1)
    ref_loss, ref_grad = ref_xent(x.astype(np.float64), y)
    close(grad.get(), ref_grad, "float32", "grad")
    close(loss.get(), ref_loss, "float32", "loss")


def test_pointwise_second_stage_over_more_than_1024_partials(sim: Any) -> None:
    """132 multiprocessors: 1026 blocks, so the single-block second stage strides over
    more partial sums than it has threads."""
    rng = np.random.default_rng(70)
    n = 1025 * 256 + 1  # odd: vector width 1
    x = rng.standard_normal(n).astype(np.float32)
    t = rng.standard_normal(n).astype(np.float32)
    loss, grad = gradcore.mse(sim.asarray(x), sim.asarray(t), reduction="sum")
    launch = [la for la in fakecupy.config.launches if la["kernel"] == "pointwise_loss"][-1]
    assert launch["grid"][0] > 1024
    ref_loss, ref_grad = ref_pointwise("mse", x, t, reduction="sum")
    close(grad.get(), ref_grad, "float32", "grad")
    close(loss.get(), ref_loss, "float32", "loss")
