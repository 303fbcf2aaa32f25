"""The simulator itself: deliberately broken copies of the kernels must each fail, and the
rig must refuse what it cannot run faithfully (unknown PTX, wrong argument sizes, launch
limits). A rig that cannot fail proves nothing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gradcore.backends import cupy as gcp

import gradcore

from . import build, fakecupy
from .reference import (
    assert_rounded_to_nearest_even,
    bf16_bits,
    bf16_values,
    close,
    ref_pointwise,
    ref_xent,
)


def _xent_case(sim: Any, variant: str, n: int = 5, C: int = 301, **kw: Any) -> None:
    """One softmax cross-entropy call on the simulator, checked against the reference."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((n, C)) * 2).astype(np.float32)
    y = rng.integers(0, C, n)
    y[0] = -100
    dkw = {k: sim.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    with gcp.force_xent_variant(variant):
        loss, grad = gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y), **dkw)
    ref_loss, ref_grad = ref_xent(x.astype(np.float64), y, **kw)
    close(grad.get(), ref_grad, "float32", f"grad {variant}")
    close(loss.get(), ref_loss, "float32", f"loss {variant}")


def _bf16_case(sim: Any, variant: str) -> None:
    rng = np.random.default_rng(8)
    x = bf16_bits((rng.standard_normal((3, 64)) * 2).astype(np.float32))
    y = rng.integers(0, 64, 3)
    with gcp.force_xent_variant(variant):
        _, grad = gcp.softmax_cross_entropy_bf16(sim.asarray(x), sim.asarray(y), reduction="none")
    _, ref_grad = ref_xent(bf16_values(x).astype(np.float64), y, reduction="none")
    close(bf16_values(grad.get()), ref_grad, "bfloat16", "grad")  # a truncation passes this
    assert_rounded_to_nearest_even(grad.get(), ref_grad, "bfloat16", "grad", cancel=1e-10)


def _ignore_index_case(sim: Any, variant: str) -> None:
    x = np.random.default_rng(9).standard_normal((6, 20)).astype(np.float32)
    y = np.array([3, 1, 3, 5, 7, 3])
    with gcp.force_xent_variant(variant):
        loss, _ = gradcore.softmax_cross_entropy(sim.asarray(x), sim.asarray(y), ignore_index=3)
    ref_loss, _ = ref_xent(x.astype(np.float64), y, ignore_index=3)
    close(loss.get(), ref_loss, "float32", "loss")


def _mse_case(sim: Any) -> None:
    fakecupy.config.multiprocessors = 1
    rng = np.random.default_rng(10)
    x = rng.standard_normal(3001).astype(np.float32)
    t = rng.standard_normal(3001).astype(np.float32)
    loss, grad = gradcore.mse(sim.asarray(x), sim.asarray(t))
    ref_loss, ref_grad = ref_pointwise("mse", x, t)
    close(grad.get(), ref_grad, "float32", "grad")
    close(loss.get(), ref_loss, "float32", "loss")


XENT = "softmax_xent.cu"
POINTWISE = "pointwise_losses.cu"

# (name, file, text in the kernel, broken replacement, the check that must fail, what
# the simulator is expected to report)
MUTATIONS = [
    (
        "dropped __syncthreads",
        XENT,
        "    __syncthreads();\n#pragma unroll\n    for (int k = 0; k < K; ++k) {\n",
        "#pragma unroll\n    for (int k = 0; k < K; ++k) {\n",
        lambda sim: _xent_case(sim, "block"),
        "race|Not equal|Mismatch",
    ),
    (
        "shuffle under a divergent branch",
        XENT,
        "for (int k = 0; k < K; ++k) v[k] = combine(v[k], __shfl_xor_sync(",
        "for (int k = 0; k < K; ++k) if ((threadIdx.x & 31) < 16) v[k] = combine(v[k], "
        "__shfl_xor_sync(",
        lambda sim: _xent_case(sim, "warp"),
        "(?s)deadlock.*__shfl_xor_sync",
    ),
    (
        "off-by-one bound on the write",
        XENT,
        "        if (j0 < C) {\n            float g[VEC];",
        "        if (j0 <= C) {\n            float g[VEC];",
        lambda sim: _xent_case(sim, "warp", n=9, C=37),
        "out-of-bounds|race|Mismatch",
    ),
    (
        "reused scratch slot",
        XENT,
        "group_reduce<4>(acc, false, scratch[1]);",
        "group_reduce<4>(acc, false, scratch[0]);",
        lambda sim: _xent_case(sim, "block"),
        "race|Mismatch",
    ),
    (
        "a block leaves while its cluster reads its shared memory",
        XENT,
        "    cluster_sync_all();  // no block may leave while another reads its shared memory\n",
        "",
        lambda sim: _xent_case(sim, "cluster", n=2),
        "has exited",
    ),
    (
        "bfloat16 truncated instead of rounded",
        XENT,
        "    u += 0x7fffu + ((u >> 16) & 1u);\n    return (unsigned short)(u >> 16);",
        "    return (unsigned short)(u >> 16);",
        lambda sim: _bf16_case(sim, "warp"),
        "rounded to nearest even",
    ),
    (
        "the divisor counts rows of ignore_index",
        XENT,
        "if (y != ignore_index && y >= 0 && y < n_cols)",
        "if (y >= 0 && y < n_cols)",
        lambda sim: _ignore_index_case(sim, "online"),
        "Mismatch|Not equal",
    ),
    (
        "dropped __syncthreads in the pointwise partial sums",
        POINTWISE,
        "parts[threadIdx.x >> 5] = acc;\n    __syncthreads();\n    if (threadIdx.x == 0) {\n"
        "        double r = 0.0;\n        for (int w = 0; w < BLOCK / 32; ++w)",
        "parts[threadIdx.x >> 5] = acc;\n    if (threadIdx.x == 0) {\n"
        "        double r = 0.0;\n        for (int w = 0; w < BLOCK / 32; ++w)",
        _mse_case,
        "race|Mismatch",
    ),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_broken_kernel_fails(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mutation: Any
) -> None:
    name, filename, old, new, check, expected = mutation
    for source in gcp.CUDA_DIR.glob("*.cu"):
        shutil.copy(source, tmp_path / source.name)
    text = (tmp_path / filename).read_text()
    assert text.count(old) == 1, f"the mutation {name!r} no longer applies to {filename}"
    (tmp_path / filename).write_text(text.replace(old, new))
    check(sim)  # the intact kernel passes the check
    monkeypatch.setattr(gcp, "CUDA_DIR", tmp_path)
    monkeypatch.setattr(gcp, "_modules", {})
    monkeypatch.setattr(gcp, "_kernels", {})
    with pytest.raises(AssertionError, match=expected):
        check(sim)


def test_every_launch_is_identical_under_shuffled_orders(sim: Any) -> None:
    fakecupy.config.orders = [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2)]
    _xent_case(sim, "block", label_smoothing=0.1, z_loss=1e-3)
    _xent_case(sim, "cluster", n=2, weight=np.linspace(0.5, 1.5, 301))
    _mse_case(sim)


def test_unknown_inline_ptx_is_refused() -> None:
    text = 'void f(float x) { float y; asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x)); }'
    with pytest.raises(build.RewriteError, match=r"ex2\.approx\.f32.*not known"):
        build.rewrite(text)
    known = 'void f(float& y, unsigned short h) { asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h)); }'
    assert "sim::cvt_f32_f16((h))" in build.rewrite(known)[0]


def test_argument_sizes_and_launch_limits_are_checked(sim: Any) -> None:
    x = sim.asarray(np.zeros((2, 40), np.float32))
    y = sim.asarray(np.array([1, 2]))
    gradcore.softmax_cross_entropy(x, y, reduction="sum")
    defines = {"LOGIT_KIND": 0, "LABEL_KIND": 1, "TARGET_KIND": 0, "HAS_WEIGHT": 0, "REDUCTION": 2}
    launch = gcp.choose_xent_launch(2, 40, vec=4, soft=False, cluster_ok=True)
    kernel = gcp._kernel(XENT, "xent_finalize", {**defines, **launch.defines()}, 0)
    rows = sim.zeros(2, dtype=np.float32)
    out = sim.empty((), dtype=np.float32)
    with pytest.raises(
        fakecupy.SimError, match=r"int32 \(4 bytes\) but the kernel's parameter has 8"
    ):
        kernel((1,), (1024,), (rows, rows, out, np.int32(2)))
    with pytest.raises(fakecupy.SimError, match=r"not a pointer|parameter is a pointer"):
        kernel((1,), (1024,), (rows, 3, out, np.int64(2)))
    kernel((1,), (1024,), (rows, rows, out, 2))  # a Python int travels as int64
    rows_kernel = gcp._kernel(XENT, "xent_rows", {**defines, **launch.defines()}, 0)
    with pytest.raises(fakecupy.CUDADriverError, match="launch_bounds"):
        rows_kernel((1,), (launch.block * 2,), ())
    with pytest.raises(fakecupy.CUDADriverError, match="block"):
        rows_kernel((1,), (2048,), ())


_TINY = r"""
typedef long long i64;
extern "C" __global__ void __launch_bounds__(64)
to_half(const float* in, unsigned short* out, float* back, i64 n) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(in[i]));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    out[i] = h;
    back[i] = f;
}
extern "C" __global__ void divergent(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = 1.0f;
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void lane_outside_mask(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
    out[threadIdx.x] = v;
}
"""


def test_half_conversions_round_to_nearest_even(sim: Any) -> None:
    """The shim's cvt.rn.f16.f32 against NumPy's float16 (round to nearest even): ties,
    subnormals, overflow to infinity, NaN."""
    half = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float32)
    nxt = np.nextafter(half.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    ties = (half + nxt) / 2  # exactly halfway between two float16
    values = np.concatenate(
        [ties, -ties, ties * (1 + 2**-20), [65504.0, 65520.0, 1e6, -1e6, np.inf, 2.0**-25]]
    ).astype(np.float32)
    kernel = sim.RawModule(code=_TINY).get_function("to_half")
    n = values.size
    out = sim.empty(n, dtype=np.uint16)
    back = sim.empty(n, dtype=np.float32)
    kernel(((n + 63) // 64,), (64,), (sim.asarray(values), out, back, np.int64(n)))
    with np.errstate(over="ignore"):  # 65520 and beyond round to infinity
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(out.get(), expected.view(np.uint16))
    np.testing.assert_array_equal(back.get(), expected.astype(np.float32))


def test_divergent_barriers_and_masks_are_reported(sim: Any) -> None:
    module = sim.RawModule(code=_TINY)
    out = sim.zeros(64, dtype=np.float32)
    with pytest.raises(fakecupy.SimError, match=r"(?s)divergent __syncthreads.*threads 0-15"):
        module.get_function("divergent")((1,), (64,), (out,))
    with pytest.raises(fakecupy.SimError, match="not in mask 0x0000ffff"):
        module.get_function("lane_outside_mask")((1,), (32,), (out,))
