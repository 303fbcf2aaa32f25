"""Tests of the CuPy fast paths (gradcore.backends.cupy) and their CUDA sources.

Without a GPU: every ``.cu`` file is compiled by ``nvcc`` for sm_80 and sm_90 with the
specialisations the host code uses, and the pure-Python launch helpers are checked.
With a GPU (``@pytest.mark.gpu``): every option of the fused kernels against a float64
NumPy reference written from the documented formulas, and against the generic path on
CuPy. CuPy is never imported at collection time.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cuda_sim.reference import assert_rounded_to_nearest_even, ref_pointwise, ref_xent
from cuda_sim.reference import bf16_bits as _bf16_bits
from cuda_sim.reference import bf16_values as _bf16_values
from cuda_sim.reference import close as _close
from gradcore.backends import cupy as gcp
from hypothesis import given, settings
from hypothesis import strategies as st

import gradcore

CUDA_DIR = Path(gcp.__file__).with_name("cuda")

# --- nvcc: every CUDA source compiles for sm_80 and sm_90 ----------------------------------

_XENT_SHAPES = {"warp": 500, "block": 8000, "cluster": 60000, "online": 300007}
_XENT_OPTIONS = (  # (LOGIT_KIND, LABEL_KIND, TARGET_KIND, HAS_WEIGHT, REDUCTION)
    (0, 0, 0, 0, 1),
    (1, 1, 1, 1, 0),
    (2, 2, 0, 1, 2),
    (2, 1, 2, 0, 1),
)


def _xent_define_sets(arch: str) -> list[tuple[str, dict[str, int]]]:
    """Each variant with options that cover every logit kind, label kind, weight and
    reduction across the set (two per variant on sm_90, one on sm_80, to keep CI fast)."""
    sets = []
    for i, (variant, n_cols) in enumerate(_XENT_SHAPES.items()):
        picks = (i, i + 1) if arch == "sm_90" else (i + 2,)
        if arch == "sm_80" and variant == "cluster":
            continue  # clusters exist from sm_90 on; the host never asks for them below
        for pick in picks:
            logit, label, target, has_w, red = _XENT_OPTIONS[pick % len(_XENT_OPTIONS)]
            size = 4 if logit == 0 else 2
            tsize = 4 if target == 0 else 2
            soft = label == 2
            sizes = [size, size] + ([tsize] if soft else [])
            vec = gcp.vector_width(n_cols, sizes, [256] * len(sizes))
            softcap = pick % 2 == 1  # soft-capping in half the builds
            launch = gcp.choose_xent_launch(
                3, n_cols, vec=vec, soft=soft, cluster_ok=True, force=variant, softcap=softcap
            )
            defines = {
                "SOFTCAP": int(softcap),
                "LOGIT_KIND": logit,
                "LABEL_KIND": label,
                "TARGET_KIND": target,
                "HAS_WEIGHT": has_w,
                "REDUCTION": red,
                **launch.defines(),
            }
            sets.append((variant, defines))
    return sets


def _pointwise_define_sets() -> list[dict[str, int]]:
    out = []
    for loss, pred, target, w, q, red, vec in (
        (0, 0, 0, 0, 0, 1, 4),
        (0, 1, 4, 1, 0, 0, 2),
        (0, 2, 2, 1, 0, 2, 8),
        (1, 0, 3, 1, 1, 1, 4),
        (1, 2, 0, 0, 1, 0, 4),
        (1, 1, 5, 1, 1, 2, 1),
    ):
        out.append(
            {
                "LOSS": loss,
                "PRED_KIND": pred,
                "TARGET_KIND": target,
                "HAS_WEIGHT": w,
                "HAS_POS": q,
                "REDUCTION": red,
                "BLOCK": 256,
                "VEC": vec,
            }
        )
    return out


def _compile_jobs() -> list[tuple[str, str, tuple[str, ...]]]:
    jobs = []
    for arch in ("sm_80", "sm_90"):
        for _, defines in _xent_define_sets(arch):
            jobs.append(("softmax_xent.cu", arch, gcp.define_options(defines)))
        pointwise = _pointwise_define_sets()
        for defines in pointwise if arch == "sm_90" else pointwise[:2]:
            jobs.append(("pointwise_losses.cu", arch, gcp.define_options(defines)))
    return jobs


def test_compile_sets_cover_every_option() -> None:
    seen: dict[str, set[int]] = {}
    for arch in ("sm_80", "sm_90"):
        for variant, defines in _xent_define_sets(arch):
            seen.setdefault("VARIANT", set()).add(gcp.XENT_VARIANTS.index(variant))
            for key in ("LOGIT_KIND", "LABEL_KIND", "HAS_WEIGHT", "REDUCTION", "SOFTCAP"):
                seen.setdefault(key, set()).add(defines[key])
    assert seen == {
        "VARIANT": {0, 1, 2, 3},
        "LOGIT_KIND": {0, 1, 2},
        "LABEL_KIND": {0, 1, 2},
        "HAS_WEIGHT": {0, 1},
        "REDUCTION": {0, 1, 2},
        "SOFTCAP": {0, 1},
    }


def test_every_cuda_source_is_compiled_by_the_tests() -> None:
    compiled = {name for name, _, _ in _compile_jobs()}
    assert compiled == {p.name for p in CUDA_DIR.glob("*.cu")}


def test_cuda_sources_compile_with_nvcc() -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compiled here")
    jobs = _compile_jobs()

    def compile_one(job: tuple[str, str, tuple[str, ...]]) -> str | None:
        name, arch, options = job
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [
                nvcc,
                f"-arch={arch}",
                "--cubin",
                "-Werror",
                "all-warnings",
                "-Xptxas",
                "-v",
                *options,
                "-o",
                os.path.join(tmp, "k.cubin"),
                str(CUDA_DIR / name),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or "warning" in done.stderr.lower():
            return f"{name} {arch} {' '.join(options)}:\n{done.stdout}{done.stderr}"
        # Register spills go to local memory: every kernel must keep them at zero.
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", done.stdout + done.stderr)
        if not spills or any(int(b) for b in spills):
            return f"{name} {arch} {' '.join(options)} spills registers:\n{done.stderr}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failures = [f for f in pool.map(compile_one, jobs) if f]
    assert not failures, "\n\n".join(failures)


def _find_nvrtc() -> str | None:
    """A libnvrtc to load: $GRADCORE_NVRTC, else the one of the ``nvidia-cuda-nvrtc-cu12``
    wheel (which CI installs), else what the dynamic loader finds."""
    import ctypes.util
    import importlib.util

    path = os.environ.get("GRADCORE_NVRTC")
    if path:
        return path
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            found = sorted(Path(root, "lib").glob("libnvrtc.so*"))
            if found:
                return str(found[0])
    return ctypes.util.find_library("nvrtc")


def test_cuda_sources_compile_with_nvrtc() -> None:
    """CuPy compiles with NVRTC, not nvcc: no implicit cuda_runtime.h, and CuPy adds
    ``-ftz=true`` and the device's ``-arch``. Skipped where no libnvrtc can be loaded
    (set GRADCORE_NVRTC to the library's path to run it)."""
    import ctypes

    path = _find_nvrtc()
    if path is None:
        pytest.skip("no libnvrtc found (set GRADCORE_NVRTC to its path)")
    try:
        # NVRTC opens its builtins library by name at compile time: load the one beside
        # it first, so that a library outside the loader's path works too.
        for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
    except OSError as exc:
        pytest.skip(f"libnvrtc at {path} cannot be loaded: {exc}")
    failures = []
    for name, arch, options in _compile_jobs():
        source = (CUDA_DIR / name).read_text().encode()
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), source, name.encode(), 0, None, None) == 0
        opts = [o.encode() for o in (*options, f"-arch={arch}", "-ftz=true")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
        text = log.value.decode(errors="replace")
        if rc != 0 or "warning" in text.lower():
            failures.append(f"{name} {arch} {' '.join(options)}:\n{text}")
    assert not failures, "\n\n".join(failures)


def test_cluster_variant_declares_its_cluster_size() -> None:
    """The cluster variant relies on the compile-time __cluster_dims__ reaching the PTX
    (the launch through cuLaunchKernel passes no cluster size of its own)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH")
    launch = gcp.choose_xent_launch(3, 128256, vec=4, soft=False, cluster_ok=True)
    assert launch.variant == "cluster"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.ptx")
        cmd = [nvcc, "-arch=sm_90", "--ptx", *gcp.define_options(launch.defines()), "-o", out]
        done = subprocess.run(
            [*cmd, str(CUDA_DIR / "softmax_xent.cu")], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        ptx = Path(out).read_text()
    entry = ptx[ptx.index(".entry xent_rows") :]
    entry = entry[: entry.index("{")]
    assert f".reqnctapercluster {launch.cluster}, 1, 1" in entry
    assert "barrier.cluster.arrive" in ptx


# --- pure-Python helpers --------------------------------------------------------------------


def test_fast_paths_are_registered_without_cupy() -> None:
    from gradcore import _dispatch

    for op in ("softmax_cross_entropy", "mse", "binary_cross_entropy_with_logits"):
        assert ("cupy", op) in _dispatch._registry


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("cluster_ok", [False, True])
@pytest.mark.parametrize("n_cols", [1, 31, 1000, 1024, 1025, 5000, 32000, 40000, 128256, 300007])
def test_xent_launch_holds_the_whole_row(n_cols: int, cluster_ok: bool, soft: bool) -> None:
    vec = gcp.vector_width(n_cols, [4, 4], [0, 0])
    launch = gcp.choose_xent_launch(5, n_cols, vec=vec, soft=soft, cluster_ok=cluster_ok)
    budget = gcp.REGISTER_FLOATS // (2 if soft else 1)
    assert launch.block % 32 == 0
    assert 32 <= launch.block <= 1024
    if launch.variant == "online":
        assert launch.grid == 5
        return
    threads = 32 if launch.variant == "warp" else launch.block * launch.cluster
    assert threads * launch.items * launch.vec >= n_cols  # every class has a slot
    assert launch.items * launch.vec <= budget  # and fits in registers
    if launch.variant == "cluster":
        assert cluster_ok
        assert launch.cluster in (2, 4, 8)  # powers of two only
        assert launch.grid == 5 * launch.cluster
    if launch.variant == "warp":
        assert launch.grid == math.ceil(5 / (launch.block // 32))


def test_xent_launch_picks_each_variant() -> None:
    pick = gcp.choose_xent_launch
    assert pick(8, 1000, vec=4, soft=False, cluster_ok=True).variant == "warp"
    assert pick(8, 8000, vec=4, soft=False, cluster_ok=True).variant == "block"
    # Past 512 threads * 32 floats a row goes to a cluster (no 1024-thread blocks: spills).
    assert pick(8, 16384, vec=4, soft=False, cluster_ok=True).block == 512
    assert pick(8, 16385, vec=1, soft=False, cluster_ok=True).variant == "cluster"
    assert pick(8, 32000, vec=4, soft=False, cluster_ok=True).variant == "cluster"
    assert pick(8, 32000, vec=4, soft=False, cluster_ok=False).variant == "online"
    assert pick(8, 128256, vec=4, soft=False, cluster_ok=True).variant == "cluster"
    assert pick(8, 128256, vec=4, soft=False, cluster_ok=False).variant == "online"
    assert pick(8, 300007, vec=1, soft=False, cluster_ok=True).variant == "online"
    with pytest.raises(ValueError, match="does not fit"):
        pick(8, 5000, vec=4, soft=False, cluster_ok=True, force="warp")
    with pytest.raises(ValueError, match="does not fit"):
        pick(8, 5000, vec=4, soft=False, cluster_ok=False, force="cluster")
    with pytest.raises(ValueError, match="force must be one of"):
        pick(8, 5000, vec=4, soft=False, cluster_ok=False, force="bogus")
    with pytest.raises(ValueError, match="at least one row"):
        pick(0, 5000, vec=4, soft=False, cluster_ok=False)


def test_vector_width() -> None:
    assert gcp.vector_width(1024, [4, 4], [0, 256]) == 4
    assert gcp.vector_width(1024, [2, 2], [0, 256]) == 8
    assert gcp.vector_width(1024, [2, 4], [0, 256]) == 4  # 16 bytes of the wider array
    assert gcp.vector_width(1022, [2, 2], [0, 0]) == 2
    assert gcp.vector_width(1021, [4, 4], [0, 0]) == 1
    assert gcp.vector_width(1024, [4, 4], [0, 8]) == 2  # an 8-byte aligned view


def test_pointwise_launch() -> None:
    assert gcp.choose_pointwise_launch(1, vec=1, multiprocessors=132) == (1, 256)
    grid, block = gcp.choose_pointwise_launch(10**9, vec=4, multiprocessors=132)
    assert (grid, block) == (8 * 132, 256)


def test_define_options() -> None:
    assert gcp.define_options({"B": 2, "A": 1}) == ("-DA=1", "-DB=2")


@st.composite
def _shapes_and_broadcasts(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=4)))
    keep = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    wshape = tuple(s if k else 1 for s, k in zip(shape, keep, strict=True))
    drop = draw(st.integers(0, len(wshape)))
    return shape, wshape[drop:]


@settings(max_examples=60, deadline=None)
@given(_shapes_and_broadcasts())
def test_broadcast_layout_matches_numpy(case: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    shape, wshape = case
    w = np.arange(math.prod(wshape)).reshape(wshape)
    expected = np.broadcast_to(w, shape).ravel()
    layout = gcp.broadcast_layout(shape, wshape)
    if layout is None:
        # Only interior broadcast dimensions are refused.
        trimmed = [
            i
            for i, (a, b) in enumerate(zip(wshape[::-1], shape[::-1], strict=False))
            if a == b != 1
        ]
        assert trimmed
        assert any(
            wshape[::-1][i] == 1 and shape[::-1][i] != 1 for i in range(trimmed[0], trimmed[-1] + 1)
        )
        return
    inner, size = layout
    index = (np.arange(expected.size) // inner) % size
    np.testing.assert_array_equal(w.ravel()[index], expected)


def test_broadcast_layout_refuses_what_does_not_broadcast() -> None:
    assert gcp.broadcast_layout((3, 4), (5,)) is None
    assert gcp.broadcast_layout((3,), (2, 3)) is None
    assert gcp.broadcast_layout((3, 4, 5), (3, 1, 5)) is None
    assert gcp.broadcast_layout((3, 4, 5), (3, 1, 1)) == (20, 3)
    assert gcp.broadcast_layout((3, 4, 5), ()) == (1, 1)


def test_force_xent_variant_validates() -> None:
    with pytest.raises(ValueError, match="variant must be one of"), gcp.force_xent_variant("x"):
        pass


# --- GPU tests ------------------------------------------------------------------------------
# The float64 references and tolerances are shared with the CUDA simulator's tests.


def _cupy():  # type: ignore[no-untyped-def]
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("needs a CUDA device")
    except Exception:
        pytest.skip("needs a CUDA device")
    return cp


def _to_host(a, dtype: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    h = a.get()
    return _bf16_values(h) if dtype == "bfloat16" else h.astype(np.float64)


def _make_logits(rng: np.random.Generator, shape: tuple[int, ...], dtype: str):  # type: ignore[no-untyped-def]
    """Host values as the device sees them (rounded to dtype), and the device array."""
    cp = _cupy()
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    if dtype == "bfloat16":
        bits = _bf16_bits(x)
        return _bf16_values(bits).astype(np.float64), cp.asarray(bits)
    xd = x.astype(dtype)
    return xd.astype(np.float64), cp.asarray(xd)


def _run_xent(logits, labels, dtype: str, **kw):  # type: ignore[no-untyped-def]
    if dtype == "bfloat16":
        return gcp.softmax_cross_entropy_bf16(logits, labels, **kw)
    return gradcore.softmax_cross_entropy(logits, labels, **kw)


def _labels(rng: np.random.Generator, n: int, C: int, dtype: str, *, bad: bool) -> np.ndarray:
    y = rng.integers(0, C, size=n)
    y[::5] = -100  # ignored rows
    if bad and n > 3:
        y[3] = C + 7  # out of range, unchecked: that row is NaN
    return y.astype(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_kind", ["int32", "int64", "soft"])
@pytest.mark.parametrize("variant", ["block", "online"])
def test_xent_every_option_float32(
    variant: str, label_kind: str, weighted: bool, reduction: str
) -> None:
    cp = _cupy()
    rng = np.random.default_rng(1)
    n, C = 23, 1000
    x_host, x = _make_logits(rng, (n, C), "float32")
    w_host = rng.uniform(0.2, 2.0, C) if weighted else None
    w = None if w_host is None else cp.asarray(w_host.astype(np.float32))
    for eps, z in ((0.0, 0.0), (0.1, 1e-3)):
        if label_kind == "soft":
            t = rng.dirichlet(np.ones(C), size=n).astype(np.float32)
            t[1, :] = 0.0  # a row with no target mass
            t[2, 5] = 0.0
            y_host, y = t.astype(np.float64), cp.asarray(t)
        else:
            y_host = _labels(rng, n, C, label_kind, bad=True)
            y = cp.asarray(y_host)
        kw = dict(label_smoothing=eps, z_loss=z, reduction=reduction)
        out = cp.full(x.shape, cp.nan, dtype=x.dtype)  # unwritten elements stay NaN
        with gcp.force_xent_variant(variant):
            loss, grad = gradcore.softmax_cross_entropy(
                x, y, weight=w, check_labels=False, out=out, **kw
            )
        assert grad is out
        assert isinstance(loss, cp.ndarray)
        assert loss.dtype == x.dtype
        ref_loss, ref_grad = ref_xent(x_host, y_host, weight=w_host, **kw)  # type: ignore[arg-type]
        what = f"{variant} {label_kind} w={weighted} eps={eps} z={z} {reduction}"
        _close(grad.get(), ref_grad, "float32", "grad " + what)
        _close(loss.get(), ref_loss, "float32", "loss " + what)
        with gradcore.use_fast_paths(False):
            g_loss, g_grad = gradcore.softmax_cross_entropy(
                x, y, weight=w, check_labels=False, **kw
            )
        _close(grad.get(), g_grad.get(), "float32", "vs generic grad " + what)
        _close(loss.get(), g_loss.get(), "float32", "vs generic loss " + what)


_VARIANT_SHAPES = {
    "warp": (37, 100),
    "block": (9, 5003),
    "cluster": (5, 40000),
    "online": (3, 70001),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(_VARIANT_SHAPES))
def test_xent_each_variant_and_dtype(variant: str, dtype: str) -> None:
    cp = _cupy()
    if variant == "cluster" and int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("thread-block clusters need compute capability 9.0")
    rng = np.random.default_rng(2)
    n, C = _VARIANT_SHAPES[variant]
    x_host, x = _make_logits(rng, (n, C), dtype)
    y_host = _labels(rng, n, C, "int64", bad=False)
    w_host = rng.uniform(0.5, 1.5, C)
    kw = dict(label_smoothing=0.05, z_loss=1e-4, reduction="mean")
    with gcp.force_xent_variant(variant):
        loss, grad = _run_xent(x, cp.asarray(y_host), dtype, weight=cp.asarray(w_host), **kw)
    ref_loss, ref_grad = ref_xent(x_host, y_host, weight=w_host, **kw)  # type: ignore[arg-type]
    _close(_to_host(grad, dtype), ref_grad, dtype, f"grad {variant} {dtype}")
    _close(_to_host(loss, dtype), ref_loss, dtype, f"loss {variant} {dtype}")
    if dtype != "float32":  # bit for bit: rounded to nearest even, not truncated
        assert_rounded_to_nearest_even(grad.get(), ref_grad, dtype, "grad", cancel=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(_VARIANT_SHAPES))
def test_xent_softcap(variant: str) -> None:
    """Gemma 2 soft-capping through the fast path (called directly: the generic
    function may not take softcap=), bfloat16 bit for bit."""
    cp = _cupy()
    if variant == "cluster" and int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("thread-block clusters need compute capability 9.0")
    rng = np.random.default_rng(21)
    n, C = _VARIANT_SHAPES[variant]
    x_host, x = _make_logits(rng, (n, C), "bfloat16")
    y_host = _labels(rng, n, C, "int64", bad=False)
    kw = dict(label_smoothing=0.1, z_loss=1e-4, reduction="none", softcap=30.0)
    with gcp.force_xent_variant(variant):
        loss, grad = gcp.softmax_cross_entropy_bf16(x, cp.asarray(y_host), **kw)
    ref_loss, ref_grad = ref_xent(x_host, y_host, **kw)  # type: ignore[arg-type]
    _close(_to_host(grad, "bfloat16"), ref_grad, "bfloat16", f"grad {variant}")
    _close(_to_host(loss, "bfloat16"), ref_loss, "bfloat16", f"loss {variant}")
    assert_rounded_to_nearest_even(grad.get(), ref_grad, "bfloat16", "grad", cancel=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_cols", [128256, 300007])
def test_xent_long_rows_automatic_choice(n_cols: int, dtype: str) -> None:
    """V = 128256 (cluster on sm_90, else online) and a row longer than shared memory."""
    cp = _cupy()
    rng = np.random.default_rng(3)
    n = 6
    x_host, x = _make_logits(rng, (n, n_cols), dtype)
    y_host = _labels(rng, n, n_cols, "int32", bad=False)
    loss, grad = _run_xent(x, cp.asarray(y_host), dtype, reduction="sum")
    ref_loss, ref_grad = ref_xent(x_host, y_host, reduction="sum")
    _close(_to_host(grad, dtype), ref_grad, dtype, "grad")
    _close(_to_host(loss, dtype), ref_loss, dtype, "loss")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_xent_inplace_soft_targets_and_determinism(dtype: str) -> None:
    cp = _cupy()
    rng = np.random.default_rng(4)
    x_host, x = _make_logits(rng, (4, 3, 700), dtype)
    t = rng.dirichlet(np.ones(700), size=(4, 3)).astype(dtype)
    loss1, _ = gradcore.softmax_cross_entropy(x.copy(), cp.asarray(t))
    loss, grad = gradcore.softmax_cross_entropy(x, cp.asarray(t), inplace=True)
    assert grad is x
    assert loss1.get().tobytes() == loss.get().tobytes()  # bitwise reproducible
    ref_loss, ref_grad = ref_xent(x_host, t.astype(np.float64))
    _close(grad.get(), ref_grad, dtype, "grad")
    _close(loss.get(), ref_loss, dtype, "loss")


@pytest.mark.gpu
def test_xent_all_ignored_mean_is_nan_like_the_generic_path() -> None:
    cp = _cupy()
    x = cp.asarray(np.random.default_rng(5).standard_normal((4, 50)).astype(np.float32))
    y = cp.full(4, -100, dtype=cp.int64)
    loss, grad = gradcore.softmax_cross_entropy(x, y)
    with gradcore.use_fast_paths(False):
        g_loss, g_grad = gradcore.softmax_cross_entropy(x, y)
    np.testing.assert_array_equal(grad.get(), np.zeros((4, 50), dtype=np.float32))
    np.testing.assert_array_equal(g_grad.get(), np.zeros((4, 50), dtype=np.float32))
    assert np.isnan(float(loss.get()))
    assert np.isnan(float(g_loss.get()))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["warp", "online"])
def test_xent_zero_divisor_is_pytorchs(variant: str) -> None:
    """Weights that are 0 on every present label: the divisor is 0. As PyTorch: a NaN
    mean, NaN gradient rows for the rows not ignored, zero rows for the ignored one."""
    cp = _cupy()
    rng = np.random.default_rng(11)
    x = cp.asarray(rng.standard_normal((6, 40)).astype(np.float32))
    y_host = np.array([1, 2, -100, 1, 2, 1])
    w = np.ones(40, dtype=np.float32)
    w[[1, 2]] = 0.0
    kw = dict(weight=cp.asarray(w), label_smoothing=0.2, z_loss=1e-2)
    with gcp.force_xent_variant(variant):
        loss, grad = gradcore.softmax_cross_entropy(x, cp.asarray(y_host), **kw)
    g = grad.get()
    assert np.isnan(float(loss.get()))
    assert np.all(g[2] == 0.0)  # the ignored row
    assert np.all(np.isnan(np.delete(g, 2, axis=0)))


@pytest.mark.gpu
def test_xent_errors_match_the_generic_path() -> None:
    cp = _cupy()
    x = cp.zeros((3, 5), dtype=cp.float32)
    with pytest.raises(ValueError, match="out of range"):
        gradcore.softmax_cross_entropy(x, cp.asarray([0, 9, 1]), check_labels=True)
    with pytest.raises(ValueError, match="reduction must be one of"):
        gradcore.softmax_cross_entropy(x, cp.asarray([0, 1, 1]), reduction="avg")
    with pytest.raises(ValueError, match="either out= or inplace"):
        gradcore.softmax_cross_entropy(x, cp.asarray([0, 1, 1]), out=x.copy(), inplace=True)


@pytest.mark.gpu
def test_xent_inplace_allocates_no_logits_sized_buffer() -> None:
    cp = _cupy()
    x = cp.asarray(np.random.default_rng(6).standard_normal((256, 32000)).astype(np.float32))
    y = cp.asarray(np.random.default_rng(6).integers(0, 32000, 256))
    pool = cp.get_default_memory_pool()
    gradcore.softmax_cross_entropy(x, y, inplace=True)  # compile and warm up
    cp.cuda.get_current_stream().synchronize()
    before = pool.total_bytes()
    gradcore.softmax_cross_entropy(x, y, inplace=True)
    cp.cuda.get_current_stream().synchronize()
    assert pool.total_bytes() - before < x.nbytes // 16


@pytest.mark.gpu
@pytest.mark.slow
def test_xent_more_than_2_to_the_31_elements() -> None:
    """64-bit offsets: the last rows of a float16 (N, 128256) with N * C > 2**31."""
    cp = _cupy()
    C = 128256
    n = 2**31 // C + 3
    need = n * C * 6 + (1 << 30)  # float32 random numbers, then their float16 copy
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} free")
    rng = np.random.default_rng(7)
    x = cp.random.standard_normal((n, C), dtype=cp.float32).astype(cp.float16)
    tail_host = rng.standard_normal((3, C)).astype(np.float16)
    x[-3:] = cp.asarray(tail_host)
    y_host = rng.integers(0, C, n)
    loss, grad = gradcore.softmax_cross_entropy(
        x, cp.asarray(y_host), reduction="none", inplace=True
    )
    ref_loss, ref_grad = ref_xent(tail_host.astype(np.float64), y_host[-3:], reduction="none")
    _close(grad[-3:].get(), ref_grad, "float16", "grad of the last rows")
    _close(loss[-3:].get(), ref_loss, "float16", "loss of the last rows")
    del x, grad


@pytest.mark.gpu
@pytest.mark.slow
def test_pointwise_more_than_2_to_the_31_elements() -> None:
    """64-bit indices in the grid-stride loop: the last elements of 2**31 + 1000."""
    cp = _cupy()
    n = 2**31 + 1000
    need = n * 3 + (1 << 30)  # float16 prediction, uint8 target
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} free")
    x = cp.zeros(n, dtype=cp.float16)
    t = cp.zeros(n, dtype=cp.uint8)
    rng = np.random.default_rng(12)
    tail_x = rng.standard_normal(1000).astype(np.float16)
    tail_t = rng.integers(0, 2, 1000).astype(np.uint8)
    x[-1000:] = cp.asarray(tail_x)
    t[-1000:] = cp.asarray(tail_t)
    loss, grad = gradcore.binary_cross_entropy_with_logits(x, t, reduction="sum", inplace=True)
    _, ref_grad = ref_pointwise("bce", tail_x, tail_t, reduction="sum")
    _close(grad[-1000:].get(), ref_grad, "float16", "grad of the last elements")
    # every element before the tail has x = 0, t = 0: loss log 2 each
    ref_total = (n - 1000) * math.log(2) + float(
        ref_pointwise("bce", tail_x, tail_t, reduction="sum")[0]
    )
    assert abs(float(loss.get()) - ref_total) <= 2e-3 * ref_total
    del x, t, grad


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("loss_name", ["mse", "bce"])
def test_pointwise_losses(loss_name: str, dtype: str, reduction: str) -> None:
    cp = _cupy()
    rng = np.random.default_rng(8)
    shape = (37, 24)
    x_host, x = _make_logits(rng, shape, dtype)
    y32 = rng.uniform(0, 1, shape).astype(np.float32)
    cases = [
        (None, None),
        (rng.uniform(0.5, 2, shape), None),
        (rng.uniform(0.5, 2, (24,)), rng.uniform(0.5, 3, (24,))),
        (rng.uniform(0.5, 2, (37, 1)), rng.uniform(0.5, 3, ())),
    ]
    for w_host, q_host in cases:
        if dtype == "bfloat16" and (w_host is not None or q_host is not None):
            continue  # the bfloat16 kernels are reached only through raw bits, without options
        kw = dict(reduction=reduction)
        if w_host is not None:
            kw["weight"] = cp.asarray(w_host.astype(np.float32))
        if q_host is not None and loss_name == "bce":
            kw["pos_weight"] = cp.asarray(q_host.astype(np.float32))
        y = cp.asarray(y32 if dtype == "bfloat16" else y32.astype(dtype))
        y_host = y32.astype(np.float64) if dtype == "bfloat16" else y32.astype(dtype).astype(float)
        if dtype == "bfloat16":
            red = {"none": "none", "mean": "mean", "sum": "sum"}[reduction]
            loss, grad = gcp._pointwise(
                0 if loss_name == "mse" else 1, x, y, None, None, red, None, False, kind=2
            )
        else:
            f = gradcore.mse if loss_name == "mse" else gradcore.binary_cross_entropy_with_logits
            out = cp.full(shape, cp.nan, dtype=x.dtype)
            loss, grad = f(x, y, out=out, **kw)
            assert grad is out
            with gradcore.use_fast_paths(False):
                g_loss, g_grad = f(x, y, **kw)
            _close(grad.get(), g_grad.get(), dtype, "vs generic grad")
            _close(loss.get(), g_loss.get(), dtype, "vs generic loss")
        ref_kw = dict(
            weight=w_host,
            pos_weight=q_host if loss_name == "bce" else None,
            reduction=reduction,
        )
        ref_loss, ref_grad = ref_pointwise(loss_name, x_host, y_host, **ref_kw)  # type: ignore[arg-type]
        what = f"{loss_name} {dtype} {reduction} w={w_host is not None}"
        _close(_to_host(grad, dtype), ref_grad, dtype, "grad " + what)
        _close(_to_host(loss, dtype), ref_loss, dtype, "loss " + what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bce_large_logits_keep_the_small_softplus(dtype: str) -> None:
    """softplus(-x) for large x is tiny but not 0 (it was once formed as softplus(x) - x)."""
    cp = _cupy()
    x_host = np.array([-60.0, -30.0, -12.0, 0.0, 12.0, 30.0, 60.0], dtype=dtype)
    y_host = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=dtype)
    loss, grad = gradcore.binary_cross_entropy_with_logits(
        cp.asarray(x_host), cp.asarray(y_host), reduction="none"
    )
    x = x_host.astype(np.float64)
    # -log(sigmoid(x)) for y = 1, -log(1 - sigmoid(x)) for y = 0, both log1p(exp(-|x|))
    # here, since y matches the sign of x.
    ref = np.log1p(np.exp(-np.abs(x)))
    got = loss.get().astype(np.float64)
    if dtype == "float32":
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    else:  # below float16's smallest subnormal the loss rounds to 0
        tiny = ref < 2.0**-25
        np.testing.assert_allclose(got[~tiny], ref[~tiny], rtol=2e-3)
    assert np.all(np.isfinite(grad.get()))


@pytest.mark.gpu
def test_pointwise_integer_targets_inplace_and_fallback() -> None:
    cp = _cupy()
    rng = np.random.default_rng(9)
    x_host = rng.standard_normal((1000, 3)).astype(np.float32)
    t_host = rng.integers(0, 2, (1000, 3))
    x = cp.asarray(x_host)
    loss, grad = gradcore.binary_cross_entropy_with_logits(x, cp.asarray(t_host), inplace=True)
    assert grad is x
    ref_loss, ref_grad = ref_pointwise("bce", x_host, t_host)
    _close(grad.get(), ref_grad, "float32", "grad")
    _close(loss.get(), ref_loss, "float32", "loss")
    # An interior broadcast is not handled by the kernel; the generic path answers.
    x3 = cp.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))
    w3 = rng.uniform(0.5, 2, (3, 1, 5))
    loss, grad = gradcore.mse(x3, cp.zeros_like(x3), weight=cp.asarray(w3))
    ref_loss, ref_grad = ref_pointwise("mse", x3.get(), np.zeros((3, 4, 5)), weight=w3)
    _close(grad.get(), ref_grad, "float32", "fallback grad")
