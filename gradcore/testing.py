r"""Testing helpers and the gradcore pytest plugin.

Installing gradcore registers this module as a pytest plugin (entry point ``pytest11``),
so any project's tests can ask for these fixtures:

``backend``
    A :class:`gradcore.Backend`, parametrised over every installed array library:
    ``numpy``, ``numpy_readonly`` (NumPy arrays with the write flag off, so a kernel
    that mutates its input fails), ``array_api_strict`` and ``array_api_strict_device1``
    (its fake second device), ``torch`` (CPU), ``jax`` (CPU, 64-bit on during the test,
    restored after it), ``dask``, and
    ``cupy`` when a CUDA device is visible (marked ``gpu``). Make test inputs with
    ``backend.asarray(numpy_array)``.
``xp``
    ``backend.xp``, the namespace of the same parametrisation.

Choose backends with ``--gradcore-backends=numpy,torch`` (default: all installed).

Helpers: :func:`assert_close` (library, device, dtype and shape checked before values),
:func:`check_vjp` (the directional finite-difference check ⟨v, J u⟩ in float64) and
:func:`no_compute` (fails if Dask computes inside the block).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._namespace import Backend, backend, backend_name, to_numpy

__all__ = [
    "TEST_BACKENDS",
    "ReadOnlyNumPyBackend",
    "assert_close",
    "check_vjp",
    "jax_x64",
    "make_test_backend",
    "no_compute",
]

#: Every backend id the ``backend``/``xp`` fixtures know, in order.
TEST_BACKENDS = (
    "numpy",
    "numpy_readonly",
    "array_api_strict",
    "array_api_strict_device1",
    "torch",
    "jax",
    "dask",
    "cupy",
)


class ReadOnlyNumPyBackend(Backend):
    """NumPy, with every array it makes marked read-only (catches input mutation)."""

    def asarray(self, obj: Any, dtype: Any = None) -> Any:
        out = np.array(to_numpy(obj) if not isinstance(obj, np.ndarray) else obj, copy=True)
        if dtype is not None:
            out = out.astype(dtype if not isinstance(dtype, str) else np.dtype(dtype))
        out.flags.writeable = False
        return out


def make_test_backend(test_id: str) -> Backend:
    """The :class:`Backend` behind a fixture id of :data:`TEST_BACKENDS`.

    For ``"jax"`` this only builds the backend; the ``backend`` fixture also turns
    JAX's 64-bit mode on for the test (see :func:`jax_x64`), so call this inside
    ``with jax_x64():`` when you need float64 on JAX yourself.
    """
    if test_id == "numpy_readonly":
        b = backend("numpy")
        return ReadOnlyNumPyBackend(b.name, b.xp, b.device, b._module)
    if test_id == "array_api_strict_device1":
        return backend("array_api_strict", device="device1")
    if test_id == "jax":
        return backend("jax", device="cpu")
    return backend(test_id)


@contextlib.contextmanager
def jax_x64(enabled: bool = True) -> Iterator[None]:
    """Set JAX's ``jax_enable_x64`` inside the block and restore the previous value after.

    The ``backend``/``xp`` fixtures run their JAX tests inside this block, so 64-bit
    mode never leaks into tests that do not ask for it.
    """
    import jax

    previous = bool(jax.config.read("jax_enable_x64"))
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


#: The importable top-level module behind each backend id.
_MODULES = {
    "numpy": "numpy",
    "numpy_readonly": "numpy",
    "array_api_strict": "array_api_strict",
    "array_api_strict_device1": "array_api_strict",
    "torch": "torch",
    "jax": "jax",
    "dask": "dask",
    "cupy": "cupy",
}


def _installed(test_id: str) -> bool:
    """Whether the backend's library is installed, found without importing it.

    Importing torch, JAX or Dask takes seconds; the plugin is loaded in every project
    where gradcore is installed, so a backend is imported only when a test asks for it.
    """
    module = _MODULES[test_id]
    if module in sys.modules:
        return sys.modules[module] is not None  # None: a blocked import
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_visible() -> bool:
    from ._namespace import _cuda_device_count

    return _cuda_device_count() > 0


# --- assertions ------------------------------------------------------------------------


def _dtype_name(x: Any) -> str:
    dtype = x.dtype
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]


def _default_rtol(dtype_name: str) -> float:
    return {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}.get(
        dtype_name, 1e-7
    )


def assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    xp: Any = None,
    check_dtype: bool = True,
    err_msg: str = "",
) -> None:
    r"""Assert that ``actual`` equals ``desired`` in library, device, dtype, shape and value.

    Parameters
    ----------
    actual : array
        The result under test.
    desired : array
        The expected value: an array of the same library (then library and device must
        match), or a NumPy array as an independent reference (then only ``xp``, if
        given, fixes the library of ``actual``). Cast a float64 reference to the dtype
        you expect before comparing.
    rtol, atol : float
        Tolerances of :func:`numpy.testing.assert_allclose`; ``rtol`` defaults to one
        suited to the dtype (1e-12 for float64, 1e-5 for float32, 2e-3 for float16).
    xp : namespace, optional
        The library ``actual`` must belong to.
    check_dtype : bool
        Compare dtypes by name (``float32``) across libraries.

    Raises
    ------
    AssertionError
        Naming the first property that differs.
    """
    prefix = f"{err_msg}: " if err_msg else ""
    if not array_api_compat.is_array_api_obj(actual):
        raise AssertionError(f"{prefix}expected an array, got {type(actual).__name__}")
    actual_ns = array_api_compat.array_namespace(actual)
    if xp is not None and backend_name(actual_ns) != backend_name(xp):
        raise AssertionError(
            f"{prefix}library: got a {backend_name(actual_ns)} array, expected {backend_name(xp)}"
        )
    desired_is_array = array_api_compat.is_array_api_obj(desired)
    if (desired_is_array and not isinstance(desired, np.ndarray)) or (
        isinstance(desired, np.ndarray) and isinstance(actual, np.ndarray)
    ):
        desired_ns = array_api_compat.array_namespace(desired)
        if backend_name(desired_ns) != backend_name(actual_ns):
            raise AssertionError(
                f"{prefix}library: got {backend_name(actual_ns)}, "
                f"expected {backend_name(desired_ns)}"
            )
        dev_a, dev_d = array_api_compat.device(actual), array_api_compat.device(desired)
        if dev_a != dev_d:
            raise AssertionError(f"{prefix}device: got {dev_a!r}, expected {dev_d!r}")
    if not desired_is_array:
        desired = np.asarray(desired)
    name_a = _dtype_name(actual)
    name_d = _dtype_name(desired)
    if check_dtype and name_a != name_d:
        raise AssertionError(f"{prefix}dtype: got {name_a}, expected {name_d}")
    shape_a, shape_d = tuple(actual.shape), tuple(desired.shape)
    if shape_a != shape_d:
        raise AssertionError(f"{prefix}shape: got {shape_a}, expected {shape_d}")
    if rtol is None:
        rtol = max(_default_rtol(name_a), _default_rtol(name_d))
    np.testing.assert_allclose(
        to_numpy(actual).astype(np.float64) if name_a == "bfloat16" else to_numpy(actual),
        to_numpy(desired),
        rtol=rtol,
        atol=atol,
        err_msg=err_msg,
        equal_nan=True,
    )


def _as_float64(a: Any) -> Any:
    """``a`` in float64, or in the widest float its library has (JAX without x64)."""
    if not array_api_compat.is_array_api_obj(a):
        return a
    ns = array_api_compat.array_namespace(a)
    if not ns.isdtype(a.dtype, "real floating"):
        return a
    from .jacobian import _widest_float

    widest = _widest_float(ns, a)
    return a if a.dtype == widest else ns.astype(a, widest)


def check_vjp(
    f: Callable[..., Any],
    f_vjp: Callable[..., Any],
    *args: Any,
    argnum: int = 0,
    eps: float | None = None,
    rtol: float | None = None,
    atol: float = 1e-9,
    seed: int = 0,
    vjp_takes: str = "input",
) -> None:
    r"""Check a VJP against central finite differences along a random direction.

    For random ``u`` (shaped like the input) and ``v`` (shaped like the output),
    the VJP must satisfy :math:`\langle v, J u\rangle = \langle J^\top v, u\rangle`,
    where :math:`J u \approx (f(x + \epsilon u) - f(x - \epsilon u)) / 2\epsilon`.
    One scalar identity checks the whole Jacobian for any shape, in float64.

    Parameters
    ----------
    f : callable
        ``f(*args) -> y``, one array out.
    f_vjp : callable
        ``f_vjp(v, *args) -> grad`` with the gradient of ``<v, f(*args)>`` with respect
        to ``args[argnum]`` (return a tuple and the ``argnum``-th element is used).
        With ``vjp_takes="output"`` it is called as ``f_vjp(v, f(*args))`` instead.
    *args : array
        The point; ``args[argnum]`` is perturbed. Arrays of any library; floating
        arrays are cast to float64 in their own library first, so that the finite
        differences are meaningful whatever the input dtype.
    argnum : int
        Which argument to perturb.
    eps : float, optional
        The step :math:`\epsilon`; default 1e-6 in float64. A library without float64
        (JAX without ``jax_enable_x64``) works in float32, where the default step is the
        cube root of float32's machine epsilon (about 5e-3).
    rtol, atol : float
        Tolerances on the two inner products; ``rtol`` defaults to 1e-6 in float64 and
        1e-3 in float32 (which only catches gross errors).
    seed : int
        Seed of the random directions.
    vjp_takes : {"input", "output"}
        What ``f_vjp`` takes after ``v``: the inputs ``*args`` (default), or the output
        ``y = f(*args)``, as gradcore's ``relu_vjp``, ``sigmoid_vjp``, ``tanh_vjp``,
        ``softmax_vjp`` and ``log_softmax_vjp`` do. Wrap other signatures in a lambda
        (``lambda v, x: f_vjp(v, x, W)``).

    Raises
    ------
    AssertionError
        When the two inner products differ, with both values.
    ValueError
        For an unknown ``vjp_takes``.

    Examples
    --------
    >>> import numpy as np, gradcore
    >>> from gradcore.testing import check_vjp
    >>> x = np.linspace(-2.0, 2.0, 7)
    >>> check_vjp(gradcore.sigmoid, gradcore.sigmoid_vjp, x, vjp_takes="output")
    >>> check_vjp(gradcore.gelu, gradcore.gelu_vjp, x)  # gelu_vjp(g, x) takes the input
    """
    if vjp_takes not in ("input", "output"):
        raise ValueError(f"vjp_takes must be 'input' or 'output', got {vjp_takes!r}")
    args = tuple(_as_float64(a) for a in args)
    xp = array_api_compat.array_namespace(args[argnum])
    x = args[argnum]
    double = x.dtype == xp.float64
    if eps is None:
        eps = 1e-6 if double else float(np.cbrt(xp.finfo(x.dtype).eps))
    if rtol is None:
        rtol = 1e-6 if double else 1e-3
    rng = np.random.default_rng(seed)
    y = f(*args)
    u_np = rng.standard_normal(tuple(x.shape))
    v_np = rng.standard_normal(tuple(y.shape))
    device = array_api_compat.device(x)
    u = xp.asarray(u_np, dtype=x.dtype, device=device)
    v = xp.asarray(v_np, dtype=y.dtype, device=device)

    def at(t: float) -> np.ndarray:
        shifted = list(args)
        shifted[argnum] = x + t * u
        return to_numpy(f(*shifted)).astype(np.float64)

    jvp = (at(eps) - at(-eps)) / (2 * eps)
    grad = f_vjp(v, y) if vjp_takes == "output" else f_vjp(v, *args)
    if isinstance(grad, tuple):
        grad = grad[argnum]
    lhs = float(np.sum(v_np * jvp))
    rhs = float(np.sum(to_numpy(grad).astype(np.float64) * u_np))
    if not np.isclose(lhs, rhs, rtol=rtol, atol=atol):
        raise AssertionError(
            f"VJP check failed: <v, J u> by finite differences = {lhs!r}, "
            f"<J^T v, u> by the VJP = {rhs!r} (difference {abs(lhs - rhs):.3g}, "
            f"rtol={rtol}, atol={atol})"
        )


@contextlib.contextmanager
def no_compute() -> Iterator[None]:
    """Fail if any Dask graph is computed inside the block (kernels must stay lazy)."""
    try:
        import dask
    except ImportError:
        yield
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a Dask compute was forced inside a gradcore kernel")

    with dask.config.set(scheduler=refuse):
        yield


# --- the pytest plugin -----------------------------------------------------------------


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("gradcore")
    group.addoption(
        "--gradcore-backends",
        action="store",
        default=None,
        help=(
            "comma-separated backends for the xp/backend fixtures "
            f"(from: {', '.join(TEST_BACKENDS)}; default: all installed)"
        ),
    )


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when none is visible)")
    try:
        _selected_backends(config)
    except ValueError as exc:
        # A usage error at start-up (one line, exit code 4) rather than a collection
        # error with a traceback in every module that uses the fixtures.
        import pytest

        raise pytest.UsageError(str(exc)) from None


def _selected_backends(config: Any) -> Sequence[str]:
    option = config.getoption("--gradcore-backends", default=None)
    if option:
        names = [n.strip() for n in option.split(",") if n.strip()]
        unknown = [n for n in names if n not in TEST_BACKENDS]
        if unknown:
            raise ValueError(
                f"--gradcore-backends: unknown {', '.join(unknown)}; "
                f"expected some of {', '.join(TEST_BACKENDS)}"
            )
        return names
    return [n for n in TEST_BACKENDS if _installed(n)]


def pytest_generate_tests(metafunc: Any) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    import pytest

    params = []
    for name in _selected_backends(metafunc.config):
        marks = [pytest.mark.gpu] if name == "cupy" else []
        params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("backend", params, indirect=True)


def pytest_runtest_setup(item: Any) -> None:
    if item.get_closest_marker("gpu") is not None and not _cuda_visible():
        import pytest

        pytest.skip("needs a CUDA device")


_backend_cache: dict[str, Backend] = {}


def _backend_fixture(request: Any) -> Iterator[Backend]:
    import pytest

    name = request.param
    if name not in _backend_cache:
        if not _installed(name):
            pytest.skip(f"{name} is not installed")
        if name == "cupy" and not _cuda_visible():
            pytest.skip("needs a CUDA device")
        try:
            _backend_cache[name] = make_test_backend(name)
        except (ImportError, ValueError) as exc:  # installed but broken or blocked
            pytest.skip(f"{name} cannot be used here: {exc}")
    if name == "jax":
        # 64-bit for this test only: a test that does not use the fixture keeps the
        # user's setting (float32 by default), whatever ran before it.
        with jax_x64():
            yield _backend_cache[name]
        return
    yield _backend_cache[name]


def _xp_fixture(backend: Backend) -> Any:
    return backend.xp


def _register_fixtures() -> tuple[Any, Any]:
    import pytest

    return (
        pytest.fixture(name="backend")(_backend_fixture),
        pytest.fixture(name="xp")(_xp_fixture),
    )


with contextlib.suppress(ImportError):  # without pytest the helpers above still work
    backend_fixture, xp_fixture = _register_fixtures()
