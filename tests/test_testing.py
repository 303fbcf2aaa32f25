"""Tests of gradcore.testing: the pytest plugin, assert_close, check_vjp, no_compute."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest

import gradcore
import gradcore.testing
from gradcore.testing import (
    TEST_BACKENDS,
    assert_close,
    check_vjp,
    make_test_backend,
    no_compute,
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# The ids the fixtures must offer here, worked out independently of the plugin.
EXPECTED_IDS = [
    test_id
    for test_id, module in [
        ("numpy", "numpy"),
        ("numpy_readonly", "numpy"),
        ("array_api_strict", "array_api_strict"),
        ("array_api_strict_device1", "array_api_strict"),
        ("torch", "torch"),
        ("jax", "jax"),
        ("dask", "dask.array"),
    ]
    if _installed(module)
]

# Inner sessions without the unrelated plugins (hypothesis's alone costs seconds a run).
_INNER_ARGS = (
    "-p",
    "no:cacheprovider",
    "-p",
    "no:hypothesispytest",
    "-p",
    "no:benchmark",
    "--strict-markers",
)


def _reports(reprec, when="call"):
    """{test name with id: outcome} of an inline run."""
    out = {}
    for rep in reprec.getreports("pytest_runtest_logreport"):
        if rep.when == when or (rep.when == "setup" and rep.skipped):
            out[rep.nodeid.split("::", 1)[1]] = rep.outcome
    return out


# --- the plugin, run in an inner pytest session ------------------------------------------

INNER_TESTS = """
import numpy as np
import pytest
import gradcore

def test_fixtures(request, backend, xp):
    test_id = request.node.callspec.id
    assert xp is backend.xp
    assert isinstance(backend, gradcore.Backend)
    a = backend.asarray(np.arange(6.0).reshape(2, 3))
    assert gradcore.get_namespace(a) is xp
    np.testing.assert_array_equal(backend.to_numpy(a), np.arange(6.0).reshape(2, 3))
    name = {"numpy_readonly": "numpy", "array_api_strict_device1": "array_api_strict"}
    assert backend.name == name.get(test_id, test_id)
    if test_id == "array_api_strict_device1":
        assert "device1" in repr(a.device)
    if test_id == "jax":
        assert a.dtype == xp.float64  # 64-bit is on

def test_readonly(request, backend):
    a = backend.asarray(np.zeros(3))
    b = backend.asarray([1, 2], dtype="float32")
    if request.node.callspec.id == "numpy_readonly":
        assert isinstance(a, np.ndarray)
        assert not a.flags.writeable
        assert not b.flags.writeable
        assert b.dtype == np.float32
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1.0
    elif request.node.callspec.id == "numpy":
        assert a.flags.writeable

@pytest.mark.gpu
def test_needs_gpu():
    raise AssertionError("a gpu-marked test ran without a device")
"""


def test_plugin_fixtures_ids_readonly_and_gpu(pytester, monkeypatch):
    monkeypatch.setattr(gradcore.testing, "_cuda_visible", lambda: False)
    pytester.makepyfile(test_inner=INNER_TESTS)
    reprec = pytester.inline_run(*_INNER_ARGS)
    outcomes = _reports(reprec)
    expected = {f"test_fixtures[{i}]" for i in EXPECTED_IDS}
    expected |= {f"test_readonly[{i}]" for i in EXPECTED_IDS}
    assert {k for k, v in outcomes.items() if v == "passed"} == expected
    assert outcomes["test_needs_gpu"] == "skipped"
    skip = [r for r in reprec.getreports("pytest_runtest_logreport") if r.skipped]
    assert any("CUDA device" in str(r.longrepr) for r in skip)
    # The ids a downstream project can rely on (all installed in CI).
    for test_id in ("numpy", "numpy_readonly", "array_api_strict", "array_api_strict_device1"):
        assert f"test_fixtures[{test_id}]" in outcomes


def test_plugin_option_restricts_backends(pytester, monkeypatch):
    monkeypatch.setattr(gradcore.testing, "_cuda_visible", lambda: False)
    pytester.makepyfile(test_inner="def test_a(xp):\n    pass\n")
    reprec = pytester.inline_run("--gradcore-backends=numpy, torch,cupy", *_INNER_ARGS)
    outcomes = _reports(reprec)
    torch_outcome = "passed" if _installed("torch") else "skipped"
    assert outcomes == {"test_a[numpy]": "passed", "test_a[torch]": torch_outcome} | {
        "test_a[cupy]": "skipped"
    }


def test_plugin_unknown_backend_is_a_usage_error(pytester):
    pytester.makepyfile(test_inner="def test_a(xp):\n    pass\n")
    result = pytester.runpytest_inprocess("--gradcore-backends=numpy,nosuch", *_INNER_ARGS)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gradcore-backends*unknown nosuch*expected some of numpy*"])


def test_test_backends_constant():
    assert TEST_BACKENDS == (
        "numpy",
        "numpy_readonly",
        "array_api_strict",
        "array_api_strict_device1",
        "torch",
        "jax",
        "dask",
        "cupy",
    )


def test_readonly_backend_outside_pytest():
    b = make_test_backend("numpy_readonly")
    src = np.arange(3.0)
    a = b.asarray(src, dtype=np.float32)
    assert a.dtype == np.float32
    assert not a.flags.writeable
    assert src.flags.writeable  # the caller's array is left alone
    torch = pytest.importorskip("torch")
    t = b.asarray(torch.arange(3.0, dtype=torch.float64))
    assert isinstance(t, np.ndarray)
    assert not t.flags.writeable
    np.testing.assert_array_equal(t, [0.0, 1.0, 2.0])


# --- assert_close ------------------------------------------------------------------------


def _other_library(backend):
    """A backend of another library than ``backend`` (for the wrong-library checks)."""
    for name in ("torch", "array_api_strict", "jax", "dask"):
        if name != backend.name and _installed(name):
            return gradcore.backend(name)
    pytest.skip("needs a second array library")


def test_assert_close_passes_on_equal(backend):
    x = np.linspace(-2, 3, 12).reshape(3, 4)
    a = backend.asarray(x)
    assert_close(a, backend.asarray(x))
    assert_close(a, x)
    assert_close(a, x, xp=backend.xp)
    assert_close(backend.asarray(x, dtype="float32"), x.astype(np.float32))
    assert_close(backend.asarray([1, 2], dtype="int64"), np.array([1, 2]))


def test_assert_close_nan_and_tolerances(backend):
    x = np.array([1.0, np.nan, -np.inf])
    assert_close(backend.asarray(x), x)  # NaN where NaN, inf where inf
    with pytest.raises(AssertionError):
        assert_close(backend.asarray(x), np.array([1.0, 0.0, -np.inf]))
    one = np.array([1.0])
    assert_close(backend.asarray(one + 1e-13), one)  # within float64's rtol
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close(backend.asarray(one + 1e-9), one)
    assert_close(backend.asarray(one + 1e-9), one, rtol=1e-8)
    assert_close(backend.asarray(one + 1e-9), one, atol=1e-8)
    f32 = np.array([1.0], dtype=np.float32)
    assert_close(backend.asarray(f32 * (1 + 2e-6)), f32)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close(backend.asarray(f32 * (1 + 1e-3)), f32)


def test_assert_close_wrong_library(backend):
    x = np.ones((2, 2))
    a = backend.asarray(x)
    other = _other_library(backend)
    with pytest.raises(AssertionError, match="library") as info:
        assert_close(a, other.asarray(x))
    assert backend.name in str(info.value)
    assert other.name in str(info.value)
    # Against a NumPy reference the library is fixed by xp=.
    with pytest.raises(AssertionError, match="library"):
        assert_close(a, x, xp=other.xp)
    if backend.name != "numpy":  # a NumPy `desired` is a reference of any library
        with pytest.raises(AssertionError, match="library"):
            assert_close(other.asarray(x), a)


def test_assert_close_wrong_device():
    xps = pytest.importorskip("array_api_strict")
    cpu = xps.ones(3)
    dev1 = xps.ones(3, device=xps.Device("device1"))
    for actual, desired in [(cpu, dev1), (dev1, cpu)]:
        with pytest.raises(AssertionError, match="device") as info:
            assert_close(actual, desired)
        assert "device1" in str(info.value)
        assert "CPU_DEVICE" in str(info.value)
    assert_close(dev1, dev1)


def test_assert_close_device_is_checked_before_values():
    torch = pytest.importorskip("torch")
    # Values on the meta device cannot be read at all: only the device check can fail.
    with pytest.raises(AssertionError, match="device"):
        assert_close(torch.ones(2), torch.ones(2, device="meta"))


def test_assert_close_wrong_dtype(backend):
    x = np.ones(3)
    with pytest.raises(AssertionError, match="dtype: got float32, expected float64"):
        assert_close(backend.asarray(x, dtype="float32"), backend.asarray(x))
    with pytest.raises(AssertionError, match="dtype: got float64, expected float32"):
        assert_close(backend.asarray(x), x.astype(np.float32))
    with pytest.raises(AssertionError, match="dtype: got int64, expected float64"):
        assert_close(backend.asarray([1, 1, 1], dtype="int64"), x)
    assert_close(backend.asarray(x, dtype="float32"), x, check_dtype=False)


def test_assert_close_wrong_shape(backend):
    x = np.arange(6.0)
    with pytest.raises(AssertionError, match=r"shape: got \(2, 3\), expected \(3, 2\)"):
        assert_close(backend.asarray(x.reshape(2, 3)), x.reshape(3, 2))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(backend.asarray(x.reshape(1, 6)), backend.asarray(x))
    with pytest.raises(AssertionError, match="shape"):
        assert_close(backend.asarray(np.float64(1.0)), np.ones(1))


def test_assert_close_wrong_values(backend):
    x = np.linspace(0, 1, 5)
    y = x.copy()
    y[3] += 0.1
    for desired in (y, backend.asarray(y)):
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            assert_close(backend.asarray(x), desired)


def test_assert_close_message_and_non_arrays():
    with pytest.raises(AssertionError, match=r"^loss: shape"):
        assert_close(np.ones(2), np.ones(3), err_msg="loss")
    with pytest.raises(AssertionError, match="expected an array, got float"):
        assert_close(1.0, np.ones(()))


def test_assert_close_bfloat16():
    torch = pytest.importorskip("torch")
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    assert_close(a, a.clone())
    assert_close(a, np.array([1.0, 2.0, 3.0]), check_dtype=False)
    with pytest.raises(AssertionError, match="dtype: got bfloat16"):
        assert_close(a, np.array([1.0, 2.0, 3.0], dtype=np.float32))
    with pytest.raises(AssertionError, match="Not equal"):
        assert_close(a, np.array([1.0, 2.0, 3.5]), check_dtype=False)


# --- check_vjp ---------------------------------------------------------------------------


def test_check_vjp_elementwise(backend, xp):
    x = backend.asarray(np.linspace(-1.5, 2.0, 12).reshape(3, 4))

    def f(x):
        return xp.sin(x) * x

    def right(v, x):
        return v * (xp.cos(x) * x + xp.sin(x))

    def wrong(v, x):  # the product rule with a term missing
        return v * xp.cos(x) * x

    check_vjp(f, right, x)
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(f, wrong, x)


def test_check_vjp_on_jax_without_float64():
    # Without jax_enable_x64 the differences can only be taken in float32: a step of
    # 1e-6 there is mostly rounding noise and failed right VJPs. The check must pass a
    # right VJP, catch a wrong one, and not warn about float64 being unavailable.
    pytest.importorskip("jax")
    import subprocess
    import sys

    script = """
import warnings
import numpy as np
import jax.numpy as jnp
import gradcore as gc
from gradcore.testing import check_vjp
warnings.simplefilter("error")
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 10)), dtype=jnp.float32)
right = lambda g, x: gc.sigmoid_vjp(g, gc.sigmoid(x))
for seed in range(3):
    check_vjp(gc.sigmoid, right, x, seed=seed)
try:
    check_vjp(gc.sigmoid, lambda g, x: 1.05 * right(g, x), x)
except AssertionError:
    print("caught")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "caught"


def test_check_vjp_catches_a_transposed_jacobian(backend, xp):
    rng = np.random.default_rng(1)
    A_np = rng.standard_normal((4, 3))
    A = backend.asarray(A_np)
    At = backend.asarray(A_np.T.copy())
    S = backend.asarray(A_np[:3] + A_np[:3].T)  # symmetric: transposing changes nothing
    x = backend.asarray(rng.standard_normal((3, 2)))

    check_vjp(lambda x: xp.matmul(A, x), lambda v, x: xp.matmul(At, v), x)
    check_vjp(lambda x: xp.matmul(S, x), lambda v, x: xp.matmul(S, v), x)
    # (3, 3) block of A used untransposed: right shape, wrong Jacobian.
    B = backend.asarray(A_np[:3])
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(lambda x: xp.matmul(B, x), lambda v, x: xp.matmul(B, v), x)


def test_check_vjp_argnum_and_tuples(backend, xp):
    rng = np.random.default_rng(2)
    # Square factors, so that mixing the two gradients up is still shape-correct.
    a = backend.asarray(rng.standard_normal((3, 3)))
    b = backend.asarray(rng.standard_normal((3, 3)))

    def f(a, b):
        return xp.matmul(a, b)

    def vjp(v, a, b):
        return xp.matmul(v, xp.matrix_transpose(b)), xp.matmul(xp.matrix_transpose(a), v)

    def swapped(v, a, b):
        da, db = vjp(v, a, b)
        return db, da

    check_vjp(f, vjp, a, b, argnum=0)
    check_vjp(f, vjp, a, b, argnum=1)
    # A single array is taken as the gradient of args[argnum].
    check_vjp(f, lambda v, a, b: vjp(v, a, b)[1], a, b, argnum=1)
    for argnum in (0, 1):
        with pytest.raises(AssertionError, match="VJP check failed"):
            check_vjp(f, swapped, a, b, argnum=argnum)


def test_check_vjp_scalar_output_and_wrong_scale(backend, xp):
    x = backend.asarray(np.array([0.5, -1.0, 2.0]))

    def f(x):
        return xp.sum(x**2)

    check_vjp(f, lambda v, x: 2 * v * x, x)
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(f, lambda v, x: v * x, x)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_check_vjp_works_in_float64_whatever_the_input(backend, xp, dtype):
    x = backend.asarray(np.linspace(-1, 1, 6).reshape(2, 3), dtype=dtype)
    # Finite differences with eps=1e-6 in float32 would be noise; the check casts to
    # float64 first, so a correct VJP passes and a slightly wrong one still fails.
    check_vjp(lambda x: x * x, lambda v, x: 2 * v * x, x)
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(lambda x: x * x, lambda v, x: 2.001 * v * x, x)


# --- no_compute --------------------------------------------------------------------------


def test_no_compute_allows_lazy_work():
    da = pytest.importorskip("dask.array")
    x = da.ones((4, 4), chunks=2)
    with no_compute():
        y = (x * 2 + 1).sum(axis=0)
        loss, grad = gradcore.get_namespace(y).sum(y), y * 3
    assert float(loss.compute()) == 48.0
    np.testing.assert_array_equal(grad.compute(), np.full(4, 36.0))


@pytest.mark.parametrize(
    "force",
    [
        lambda y: y.compute(),
        lambda y: np.asarray(y),
        lambda y: float(y.sum()),
        lambda y: bool((y > 0).all()),
        lambda y: y.persist(),
        lambda y: gradcore.to_numpy(y),
    ],
    ids=["compute", "asarray", "float", "bool", "persist", "to_numpy"],
)
def test_no_compute_refuses_a_compute(force):
    da = pytest.importorskip("dask.array")
    y = da.ones((4, 4), chunks=2) * 2
    with pytest.raises(AssertionError, match="Dask compute"), no_compute():
        force(y)
    # Restored after the block.
    np.testing.assert_array_equal(np.asarray(y), np.full((4, 4), 2.0))


# --- the plugin imports no array library until a test asks for it -----------------------


def test_configuring_the_plugin_imports_no_backend(tmp_path):
    # A project that uses none of gradcore's fixtures must not pay for importing
    # torch, JAX or Dask (seconds) because gradcore is installed. A fresh interpreter
    # runs a whole session (collection and configure included) and reports from inside
    # its only test which heavy libraries are loaded by then.
    import subprocess
    import sys

    (tmp_path / "test_unrelated.py").write_text(
        "import sys\n"
        "def test_nothing_heavy(pytestconfig):\n"
        "    assert pytestconfig.pluginmanager.hasplugin('gradcore')\n"
        "    heavy = sorted({'torch', 'jax', 'dask', 'cupy'} & set(sys.modules))\n"
        "    assert not heavy, f'imported at configure time: {heavy}'\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_unrelated.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_jax_64_bit_is_scoped_to_the_tests_using_the_fixture(pytester, monkeypatch):
    pytest.importorskip("jax")
    pytester.makepyfile(
        test_inner="""
import jax
import jax.numpy as jnp

def test_before():
    assert jnp.ones(3).dtype == jnp.float32

def test_uses_fixture(backend, xp):
    assert xp.ones(3).dtype == xp.float64

def test_after():
    # the user's setting (32-bit by default) is back
    assert jnp.ones(3).dtype == jnp.float32
    assert not jax.config.jax_enable_x64
"""
    )
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    result = pytester.runpytest_subprocess("--gradcore-backends=jax", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_jax_x64_restores_the_previous_setting():
    jax = pytest.importorskip("jax")
    from gradcore.testing import jax_x64

    before = bool(jax.config.jax_enable_x64)
    with jax_x64(not before):
        assert bool(jax.config.jax_enable_x64) is (not before)
    assert bool(jax.config.jax_enable_x64) is before


# --- check_vjp with VJPs that take the output ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "x"),
    [
        ("sigmoid", np.linspace(-3.0, 3.0, 12)),
        ("tanh", np.linspace(-2.0, 2.0, 12)),
        # relu away from its kink at 0, where finite differences see slope 1/2
        ("relu", np.linspace(-2.05, 2.0, 12).reshape(3, 4)),
    ],
)
def test_check_vjp_with_a_vjp_of_the_output(name, x):
    f = getattr(gradcore, name)
    f_vjp = getattr(gradcore, f"{name}_vjp")
    check_vjp(f, f_vjp, x, vjp_takes="output")
    # Read as a VJP of the input, the same function is wrong for sigmoid and tanh
    # (s(1-s) of x is not s'(x)); for relu x > 0 and relu(x) > 0 agree, so take a
    # deliberately wrong VJP of the output instead.
    with pytest.raises(AssertionError, match="VJP check failed"):
        check_vjp(f, lambda g, y: f_vjp(g, y) * 1.01, x, vjp_takes="output")
    if name != "relu":
        with pytest.raises(AssertionError, match="VJP check failed"):
            check_vjp(f, f_vjp, x)


def test_check_vjp_output_mode_against_torch_autograd():
    # An independent reference: the derivative torch's autograd finds, used as the VJP.
    torch = pytest.importorskip("torch")
    x = np.linspace(-3.0, 3.0, 9)

    def torch_vjp(g, y):
        t = torch.tensor(x, requires_grad=True)
        torch.sigmoid(t).backward(torch.as_tensor(np.asarray(g)))
        return t.grad.numpy()

    check_vjp(gradcore.sigmoid, torch_vjp, x, vjp_takes="output")


def test_check_vjp_refuses_an_unknown_mode():
    x = np.ones(3)
    with pytest.raises(ValueError, match="vjp_takes"):
        check_vjp(gradcore.sigmoid, gradcore.sigmoid_vjp, x, vjp_takes="y")


# --- the suite skips, not fails, where torch, JAX and Dask are not installed -----------------

_ABSENT_PLUGIN = '''
import importlib.machinery, sys

ABSENT = ("torch", "jax", "jaxlib", "dask")


class _Absent:
    """The path finder, blind to ABSENT: find_spec gives None and importing fails,
    exactly as when they are not installed (and their distributions are not listed)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        for dist in importlib.machinery.PathFinder.find_distributions(*args, **kwargs):
            if (dist.metadata["Name"] or "").lower() not in ABSENT:
                yield dist

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [_Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''

# Tests that needed one of the libraries without saying so (they failed where it was
# absent), and modules that skip as a whole.
_ABSENT_TESTS = [
    "tests/test_cli.py::test_torch_backend_softmax_model_sgd",
    "tests/test_cli.py::test_bench_runs_the_training_benchmark",
    "tests/test_jacobian.py::test_jacobian_stays_lazy_on_dask",
    "tests/test_testing.py::test_plugin_option_restricts_backends",
    "tests/test_testing.py::test_plugin_fixtures_ids_readonly_and_gpu",
    "tests/test_readme.py",
    "tests/test_train.py",
]


def test_suite_skips_where_torch_jax_and_dask_are_absent(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "gradcore_absent_backends.py").write_text(_ABSENT_PLUGIN, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-p",
            "gradcore_absent_backends",
            *_ABSENT_TESTS,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "failed" not in proc.stdout
    assert "error" not in proc.stdout.lower().split("short test summary")[-1]
    assert re.search(r"could not import 'torch'", proc.stdout), proc.stdout[-2000:]
    assert re.search(r"could not import 'dask", proc.stdout), proc.stdout[-2000:]
