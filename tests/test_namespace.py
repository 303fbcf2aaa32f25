"""Tests of gradcore._namespace: get_namespace, backend(), Backend and to_numpy."""

from __future__ import annotations

import importlib.util
import sys

import array_api_compat
import array_api_compat.numpy
import numpy as np
import pytest

import gradcore
from gradcore import _namespace

# The namespace array-api-compat hands out for each library, by module name (written
# out here rather than asked of gradcore, so that the tests are an independent check).
EXPECTED_NAMESPACE = {
    "numpy": "array_api_compat.numpy",
    "torch": "array_api_compat.torch",
    "jax": "jax.numpy",
    "dask": "array_api_compat.dask.array",
    "array_api_strict": "array_api_strict",
}


def _native(name: str, data: object) -> object:
    """``data`` as an array made by the library ``name`` itself (not through gradcore)."""
    if name == "numpy":
        return np.asarray(data)
    if name == "torch":
        torch = pytest.importorskip("torch")
        return torch.asarray(np.asarray(data))
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(np.asarray(data))
    if name == "dask":
        da = pytest.importorskip("dask.array")
        return da.from_array(np.asarray(data), chunks=2)
    if name == "array_api_strict":
        xps = pytest.importorskip("array_api_strict")
        return xps.asarray(np.asarray(data).tolist())
    if name == "array_api_strict_device1":
        xps = pytest.importorskip("array_api_strict")
        return xps.asarray(np.asarray(data).tolist(), device=xps.Device("device1"))
    raise AssertionError(name)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# --- get_namespace -----------------------------------------------------------------------


@pytest.mark.parametrize("lib", sorted(EXPECTED_NAMESPACE))
def test_get_namespace_of_each_library(lib):
    a = _native(lib, [1.0, 2.0, 3.0])
    b = _native(lib, [4.0, 5.0, 6.0])
    assert gradcore.get_namespace(a).__name__ == EXPECTED_NAMESPACE[lib]
    assert gradcore.get_namespace(a, b).__name__ == EXPECTED_NAMESPACE[lib]


@pytest.mark.parametrize("lib", sorted(EXPECTED_NAMESPACE))
def test_get_namespace_skips_python_scalars_and_none(lib):
    a = _native(lib, [1.0, 2.0])
    ns = gradcore.get_namespace(None, 1, a, 2.5, None, True, 1j)
    assert ns.__name__ == EXPECTED_NAMESPACE[lib]


def test_get_namespace_numpy_scalar_is_numpy():
    assert gradcore.get_namespace(np.float32(1.0), np.ones(2)).__name__ == "array_api_compat.numpy"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("numpy", "torch"),
        ("torch", "numpy"),
        ("numpy", "dask"),
        ("torch", "jax"),
        ("jax", "array_api_strict"),
        ("array_api_strict", "numpy"),
    ],
)
def test_get_namespace_two_libraries_is_a_type_error_naming_both(first, second):
    a = _native(first, [1.0, 2.0])
    b = _native(second, [1.0, 2.0])
    with pytest.raises(TypeError, match="two different libraries") as info:
        gradcore.get_namespace(a, b)
    message = str(info.value)
    assert first in message
    assert second in message
    # A scalar or None in between changes nothing.
    with pytest.raises(TypeError, match="two different libraries"):
        gradcore.get_namespace(a, 3.0, None, b)


def test_get_namespace_two_devices_is_a_value_error_naming_both():
    cpu = _native("array_api_strict", [1.0, 2.0])
    dev1 = _native("array_api_strict_device1", [1.0, 2.0])
    for args in [(cpu, dev1), (dev1, cpu), (cpu, cpu, dev1)]:
        with pytest.raises(ValueError, match="two different devices") as info:
            gradcore.get_namespace(*args)
        assert "CPU_DEVICE" in str(info.value)
        assert "device1" in str(info.value)
    # One device is fine, whichever it is.
    assert gradcore.get_namespace(dev1, dev1).__name__ == "array_api_strict"


def test_get_namespace_two_torch_devices():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="two different devices") as info:
        gradcore.get_namespace(torch.ones(2), torch.ones(2, device="meta"))
    assert "cpu" in str(info.value)
    assert "meta" in str(info.value)


def test_get_namespace_jax_tracer_with_a_concrete_array():
    # Under jax.jit a traced argument has no device (None); a concrete array closed
    # over by the traced function (a class weight) has one. That is not two devices.
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    weight = jnp.asarray([1.0, 2.0])
    seen = []

    def f(x):
        seen.append(gradcore.get_namespace(x, weight).__name__)
        seen.append(gradcore.get_namespace(weight, x).__name__)
        return x

    jax.jit(f)(jnp.asarray([3.0, 4.0]))
    assert seen == ["jax.numpy", "jax.numpy"]


@pytest.mark.parametrize("args", [(), (None,), (1.0, None, 2), (True,)])
def test_get_namespace_without_arrays_is_a_type_error(args):
    with pytest.raises(TypeError, match="at least one array"):
        gradcore.get_namespace(*args)


@pytest.mark.parametrize("bad", [[1.0, 2.0], "abc", object()])
def test_get_namespace_rejects_non_arrays(bad):
    with pytest.raises(TypeError, match="expected an array"):
        gradcore.get_namespace(bad)
    with pytest.raises(TypeError, match="expected an array"):
        gradcore.get_namespace(np.ones(2), bad)


def test_get_namespace_xp_is_passed_through():
    sentinel = object()
    assert gradcore.get_namespace(np.ones(2), xp=sentinel) is sentinel
    assert gradcore.get_namespace(xp=sentinel) is sentinel
    # The caller's namespace wins without looking at the arguments at all.
    assert gradcore.get_namespace([1, 2], "not an array", xp=sentinel) is sentinel


def test_backend_name():
    assert gradcore.backend_name(array_api_compat.numpy) == "numpy"
    assert gradcore.backend_name(gradcore.get_namespace(np.ones(1))) == "numpy"
    for lib in ("torch", "jax", "dask", "array_api_strict"):
        if _installed(lib):
            ns = gradcore.get_namespace(_native(lib, [1.0]))
            assert gradcore.backend_name(ns) == lib
    # Unknown namespaces keep their module name, for readable messages.
    assert gradcore.backend_name(sys) == "sys"


# --- backend() ---------------------------------------------------------------------------


_CPU_BACKENDS = ["numpy", "torch", "jax", "dask", "array_api_strict"]


def _skip_unless_installed(name: str) -> None:
    module = {"dask": "dask.array"}.get(name, name)
    if not _installed(module):
        pytest.skip(f"{name} is not installed")


@pytest.mark.parametrize("name", _CPU_BACKENDS)
def test_backend_every_name(name):
    _skip_unless_installed(name)
    b = gradcore.backend(name)
    assert isinstance(b, gradcore.Backend)
    assert b.name == name
    assert b.xp.__name__ == EXPECTED_NAMESPACE[name]
    a = b.asarray([1.0, 2.0])
    # The array lands in the backend's library, on its device.
    assert array_api_compat.array_namespace(a).__name__ == EXPECTED_NAMESPACE[name]
    assert array_api_compat.device(a) == b.device
    assert name in str(b)


def test_backend_default_devices():
    assert gradcore.backend("numpy").device == "cpu"
    if _installed("dask"):
        assert gradcore.backend("dask").device == "cpu"
    if _installed("torch"):
        import torch

        assert gradcore.backend("torch").device == torch.device("cpu")
        assert gradcore.backend("torch", "cpu").device == torch.device("cpu")
    if _installed("jax"):
        assert gradcore.backend("jax", "cpu").device.platform == "cpu"
    if _installed("array_api_strict"):
        import array_api_strict as xps

        assert gradcore.backend("array_api_strict").device == xps.Device("CPU_DEVICE")


def test_backend_array_api_strict_device1():
    xps = pytest.importorskip("array_api_strict")
    b = gradcore.backend("array_api_strict", device="device1")
    assert b.device == xps.Device("device1")
    a = b.asarray(np.arange(3.0))
    assert a.device == xps.Device("device1")
    np.testing.assert_array_equal(b.to_numpy(a), np.arange(3.0))


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("array-api-strict", "array_api_strict"),
        ("Array_API_Strict", "array_api_strict"),
        ("  numpy ", "numpy"),
        ("NumPy", "numpy"),
        ("TORCH", "torch"),
    ],
)
def test_backend_aliases(alias, name):
    _skip_unless_installed(name)
    assert gradcore.backend(alias).name == name


@pytest.mark.parametrize(
    ("name", "device"),
    [("numpy", "cuda"), ("numpy", "gpu:0"), ("dask", "cuda:0"), ("jax", "nosuchplatform:0")],
)
def test_backend_rejects_a_device_the_library_lacks(name, device):
    _skip_unless_installed(name)
    with pytest.raises(ValueError, match=name if name != "jax" else "JAX"):
        gradcore.backend(name, device)


@pytest.mark.parametrize("name", ["nosuch", "numpy2", "", "tensorflow"])
def test_backend_unknown_name_lists_the_available_ones(name):
    with pytest.raises(ValueError, match="unknown backend") as info:
        gradcore.backend(name)
    message = str(info.value)
    assert repr(name) in message
    assert "available here: numpy" in message
    for known in ("numpy", "torch", "jax", "dask", "array_api_strict", "cupy"):
        assert known in message


@pytest.mark.parametrize(
    ("name", "module"),
    [("torch", "torch"), ("jax", "jax"), ("dask", "dask.array"), ("array_api_strict", None)],
)
def test_backend_not_installed(monkeypatch, name, module):
    # A None entry in sys.modules makes the import fail as if the library were absent.
    monkeypatch.setitem(sys.modules, module or name, None)
    with pytest.raises(ValueError, match="not installed") as info:
        gradcore.backend(name)
    available = str(info.value).split("available here:", 1)[1]
    assert name not in available
    assert "numpy" in available
    assert name not in gradcore.available_backends()
    assert "numpy" in gradcore.available_backends()


def test_backend_cupy_without_a_device(monkeypatch):
    monkeypatch.setattr(_namespace, "_cuda_device_count", lambda: 0)
    with pytest.raises(ValueError, match="cupy") as info:
        gradcore.backend("cupy")
    assert "available here: numpy" in str(info.value)


def test_available_backends_lists_cupy_only_with_a_device(monkeypatch):
    monkeypatch.setattr(_namespace, "_cuda_device_count", lambda: 0)
    without = gradcore.available_backends()
    assert "cupy" not in without
    assert without[0] == "numpy"
    for name, module in [
        ("torch", "torch"),
        ("jax", "jax"),
        ("dask", "dask.array"),
        ("array_api_strict", "array_api_strict"),
    ]:
        assert (name in without) == _installed(module)

    monkeypatch.setattr(_namespace, "_cuda_device_count", lambda: 1)
    with_gpu = gradcore.available_backends()
    assert "cupy" in with_gpu
    # Listed in the documented order, and nothing else changes.
    assert with_gpu == [n for n in gradcore.BACKEND_NAMES if n in [*without, "cupy"]]


# --- Backend.asarray / to_numpy / synchronize (over the plugin's backends) ----------------

_DTYPES = ["float32", "float64", np.float32, np.dtype("float64"), "int64", np.int32, "bool"]


@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_asarray_dtype_from_list_and_numpy(backend, xp, dtype):
    expected = np.array([[0, 1, 2], [3, 4, 5]]).astype(dtype)
    for source in ([[0, 1, 2], [3, 4, 5]], np.arange(6).reshape(2, 3)):
        a = backend.asarray(source, dtype=dtype)
        assert a.dtype == getattr(xp, np.dtype(dtype).name)
        assert tuple(a.shape) == (2, 3)
        assert array_api_compat.device(a) == array_api_compat.device(backend.asarray([0]))
        host = backend.to_numpy(a)
        assert isinstance(host, np.ndarray)
        assert host.dtype == expected.dtype
        np.testing.assert_array_equal(host, expected)


def test_asarray_keeps_dtype_and_zero_dim(backend, xp):
    for value in (np.array(2.5), np.float64(2.5), 2.5):
        a = backend.asarray(value)
        assert tuple(a.shape) == ()
        assert float(backend.to_numpy(a)) == 2.5
    a = backend.asarray(np.ones((2, 0, 3), dtype=np.float32))
    assert tuple(a.shape) == (2, 0, 3)
    assert a.dtype == xp.float32


def test_asarray_non_contiguous_numpy(backend):
    base = np.arange(24.0).reshape(4, 6)
    view = base[::2, 1::2].T  # neither C- nor F-contiguous
    np.testing.assert_array_equal(backend.to_numpy(backend.asarray(view)), view)


@pytest.mark.parametrize(
    "source", ["numpy", "torch", "jax", "dask", "array_api_strict", "array_api_strict_device1"]
)
def test_asarray_from_another_library(backend, xp, source):
    data = np.array([[1.5, -2.0], [0.25, 4.0]])
    a = backend.asarray(_native(source, data), dtype="float64")
    assert array_api_compat.array_namespace(a).__name__ == xp.__name__
    assert array_api_compat.device(a) == array_api_compat.device(backend.asarray([0.0]))
    np.testing.assert_array_equal(backend.to_numpy(a), data)


def test_to_numpy_round_trip(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    x[0, :3] = [np.nan, np.inf, -0.0]
    host = backend.to_numpy(backend.asarray(x))
    assert isinstance(host, np.ndarray)
    assert host.dtype == np.float64
    np.testing.assert_array_equal(host, x)
    assert np.signbit(host[0, 2])
    # gradcore.to_numpy is the same function.
    np.testing.assert_array_equal(gradcore.to_numpy(backend.asarray(x)), x)


def test_to_numpy_of_host_objects():
    np.testing.assert_array_equal(gradcore.to_numpy([1, 2]), np.array([1, 2]))
    assert gradcore.to_numpy(3.0).shape == ()
    x = np.ones(3)
    assert gradcore.to_numpy(x) is x


def test_to_numpy_dask_is_computed():
    da = pytest.importorskip("dask.array")
    x = da.arange(6, chunks=2).reshape(2, 3) * 2.0
    host = gradcore.to_numpy(x)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.arange(6).reshape(2, 3) * 2.0)


def test_to_numpy_array_api_strict_device1():
    xps = pytest.importorskip("array_api_strict")
    x = xps.asarray([[1.0, 2.0], [3.0, 4.0]], device=xps.Device("device1"))
    host = gradcore.to_numpy(x)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, [[1.0, 2.0], [3.0, 4.0]])


def test_torch_bfloat16():
    torch = pytest.importorskip("torch")
    values = [1.0, -0.5, 3.0, 0.0078125]  # exactly representable in bfloat16
    host = gradcore.to_numpy(torch.tensor(values, dtype=torch.bfloat16))
    assert host.dtype == np.float32
    np.testing.assert_array_equal(host, values)

    b = gradcore.backend("torch")
    for dtype in ("bfloat16", torch.bfloat16):
        a = b.asarray(np.array(values, dtype=np.float32), dtype=dtype)
        assert a.dtype == torch.bfloat16
        np.testing.assert_array_equal(b.to_numpy(a), values)


def test_torch_asarray_copies_and_never_wraps_read_only_memory(monkeypatch):
    torch = pytest.importorskip("torch")
    # torch.from_numpy warns (once per process) when handed read-only memory, and a
    # tensor over such memory is undefined behaviour when written; check that gradcore
    # never does it, rather than rely on a warning that may already have been spent.
    real_from_numpy = torch.from_numpy
    seen = []

    def from_numpy(a):
        seen.append(a.flags.writeable)
        return real_from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", from_numpy)
    b = gradcore.backend("torch")
    for writeable in (False, True):
        src = np.arange(4.0)
        src.flags.writeable = writeable
        t = b.asarray(src)
        t[0] = 10.0
        assert src[0] == 0.0, "the tensor shares memory with its source"
        np.testing.assert_array_equal(b.to_numpy(t), [10.0, 1.0, 2.0, 3.0])
    assert seen
    assert all(seen)


def test_synchronize_runs(backend):
    a = backend.asarray(np.ones(4))
    b = backend.xp.sum(a * 2.0)
    assert backend.synchronize() is None
    assert float(backend.to_numpy(b)) == 8.0


def test_synchronize_blocks_on_the_given_jax_arrays():
    pytest.importorskip("jax")
    b = gradcore.backend("jax")
    blocked = []

    class Pending:
        def block_until_ready(self):
            blocked.append(self)
            return self

    arrays = [Pending(), Pending()]
    b.synchronize(*arrays)
    assert blocked == arrays
