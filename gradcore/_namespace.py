r"""Array-API namespaces, devices and backends.

Every public kernel starts with ``xp = get_namespace(*arrays, xp=xp)``: the namespace
of its inputs as :mod:`array_api_compat` sees it (``array_api_compat.numpy`` for NumPy
arrays, ``jax.numpy`` for JAX, ...). Mixing libraries or devices is an error that names
both sides, raised before any work is done.

:func:`backend` turns a name ("numpy", "cupy", "torch", "jax", "dask",
"array_api_strict") into a :class:`Backend`: the namespace, a device, and the few
host-side helpers that training and benchmarking need (moving data in and out,
synchronising a GPU).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import array_api_compat
import numpy as np

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "available_backends",
    "backend",
    "backend_name",
    "get_namespace",
    "to_numpy",
]

#: Every backend name :func:`backend` understands, in the order they are listed.
BACKEND_NAMES = ("numpy", "cupy", "torch", "jax", "dask", "array_api_strict")

_SCALAR_TYPES = (bool, int, float, complex)

_NAMESPACE_TESTS: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("numpy", array_api_compat.is_numpy_namespace),
    ("cupy", array_api_compat.is_cupy_namespace),
    ("torch", array_api_compat.is_torch_namespace),
    ("jax", array_api_compat.is_jax_namespace),
    ("dask", array_api_compat.is_dask_namespace),
    ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
)


def backend_name(xp: Any) -> str:
    """The short name of an array-API namespace ("numpy", "torch", ...).

    Namespaces that gradcore has no name for get their module name, so that error
    messages stay readable for any compliant library.
    """
    for name, test in _NAMESPACE_TESTS:
        if test(xp):
            return name
    return str(getattr(xp, "__name__", type(xp).__name__))


_NUMPY_NAMESPACE = array_api_compat.array_namespace(np.empty(0))
_namespace_by_type: dict[type, Any] = {}


def _namespace_of(x: Any) -> Any:
    """The namespace of one array; cached per array type (kernels call this per array)."""
    cls = type(x)
    try:
        return _namespace_by_type[cls]
    except KeyError:
        pass
    try:
        ns = array_api_compat.array_namespace(x)
    except TypeError as exc:
        raise TypeError(f"expected an array, got {cls.__name__}") from exc
    _namespace_by_type[cls] = ns
    return ns


def get_namespace(*arrays: Any, xp: Any = None) -> Any:
    r"""The array-API namespace shared by ``arrays``.

    Parameters
    ----------
    *arrays : array or Python scalar or None
        The inputs of a kernel. Python scalars and ``None`` are skipped.
    xp : namespace, optional
        Returned as it is when given (the caller already knows the namespace).

    Returns
    -------
    namespace
        As returned by :func:`array_api_compat.array_namespace`.

    Raises
    ------
    TypeError
        If the arrays belong to two different libraries (both are named), or if no
        array is given and ``xp`` is None.
    ValueError
        If the arrays live on two different devices (both are named).
    """
    if xp is not None:
        return xp
    namespace = None
    first: Any = None
    first_device: Any = None
    for a in arrays:
        if a is None or isinstance(a, _SCALAR_TYPES):
            continue
        ns = _namespace_of(a)
        if namespace is None:
            namespace, first = ns, a
            continue
        if ns is not namespace:
            raise TypeError(
                "arrays from two different libraries: "
                f"{backend_name(namespace)} ({type(first).__name__}) and "
                f"{backend_name(ns)} ({type(a).__name__}); "
                "convert them to one library first"
            )
        if ns is _NUMPY_NAMESPACE:
            continue  # one device only: skip the device comparison on the hot path
        if first_device is None:
            first_device = array_api_compat.device(first)
        other_device = array_api_compat.device(a)
        # None is an unknown device (a JAX tracer under jit): it matches any device,
        # and the first known device becomes the one the others must match.
        if first_device is None:
            first_device = other_device
        elif other_device is not None and other_device != first_device:
            raise ValueError(
                f"arrays on two different devices: {first_device!r} and {other_device!r}; "
                "move them to one device first"
            )
    if namespace is None:
        raise TypeError("get_namespace needs at least one array (got only scalars or None)")
    return namespace


_F = TypeVar("_F", bound=Callable[..., Any])


def check_array_argument(value: Any, name: str, *, optional: bool = False) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is an array (or None if optional).

    Python scalars, lists and strings are refused: a kernel's array arguments decide
    its library and device, which a scalar cannot.
    """
    if type(value) is np.ndarray or (optional and value is None):
        return
    if not array_api_compat.is_array_api_obj(value):
        expected = "an array or None" if optional else "an array"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


def array_arguments(*names: str, optional: tuple[str, ...] = ()) -> Callable[[_F], _F]:
    """Check a kernel's array arguments by name before anything else sees them.

    ``names`` are the kernel's leading positional parameters in order; those listed in
    ``optional`` may also be None (or absent) and may be passed by keyword. Applied
    outside :func:`gradcore._dispatch.dispatchable`, so a fast path never sees a
    Python scalar where an array belongs.
    """

    def decorate(func: _F) -> _F:
        ndarray = np.ndarray

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # Kernels run per layer per step: NumPy arrays pass on one type test.
            for name, value in zip(names, args, strict=False):
                if type(value) is not ndarray:
                    check_array_argument(value, name, optional=name in optional)
            if kwargs and optional:
                for name in optional:
                    if name in kwargs:
                        check_array_argument(kwargs[name], name, optional=True)
            return func(*args, **kwargs)

        # Callers that pass only arrays they made themselves (the layers of gradcore.nn,
        # per step) skip the checks through this attribute.
        wrapper.__gradcore_unchecked__ = func  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def to_numpy(x: Any) -> np.ndarray:
    """Copy (or view) an array of any supported library as a NumPy array on the host.

    Dask arrays are computed; GPU arrays are copied to the host (a synchronisation).
    Python scalars and sequences go through :func:`numpy.asarray`.
    """
    if isinstance(x, np.ndarray):
        return x
    if not array_api_compat.is_array_api_obj(x):
        return np.asarray(x)
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_torch_array(x):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    if array_api_compat.is_dask_array(x):
        return np.asarray(x.compute())
    if array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x)):
        xps = array_api_compat.array_namespace(x)
        cpu = xps.Device("CPU_DEVICE")
        if x.device != cpu:
            x = x.to_device(cpu)
        return np.from_dlpack(x)
    return np.asarray(x)


def _dtype_of(xp: Any, dtype: Any) -> Any:
    """Resolve ``dtype`` (a name, a NumPy dtype, or a dtype of ``xp``) in ``xp``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            return dtype
    try:
        return getattr(xp, name)
    except AttributeError:
        raise TypeError(f"dtype {name!r} is not available in {backend_name(xp)}") from None


@dataclass(frozen=True)
class Backend:
    r"""An array library and a device, with host-side helpers.

    Attributes
    ----------
    name : str
        One of :data:`BACKEND_NAMES`.
    xp : namespace
        The array-API namespace (as :func:`get_namespace` would return it).
    device : object
        A device of that library, passed as ``device=`` to creation functions.
    """

    name: str
    xp: Any
    device: Any
    _module: ModuleType | None = field(default=None, repr=False, compare=False)

    def asarray(self, obj: Any, dtype: Any = None) -> Any:
        """Make an array of this backend on its device.

        ``obj`` may be anything :func:`numpy.asarray` accepts or an array of any
        supported library (it is moved through the host). ``dtype`` may be a name
        ("float32"), a NumPy dtype, or a dtype of this backend.
        """
        if (
            array_api_compat.is_array_api_obj(obj)
            and not isinstance(obj, np.ndarray)
            and array_api_compat.array_namespace(obj) is not self.xp
        ):
            obj = to_numpy(obj)
        if isinstance(obj, np.ndarray) and self.name == "array_api_strict":
            # array-api-strict refuses NumPy arrays as input; a plain copy through
            # a list would lose speed and dtype, so go through DLPack on the CPU.
            # (np.asarray, not np.ascontiguousarray: the latter turns 0-d into 1-d.)
            obj = np.asarray(obj, order="C")
            return self.xp.asarray(
                self.xp.from_dlpack(obj), dtype=_dtype_of(self.xp, dtype), device=self.device
            )
        if isinstance(obj, np.ndarray) and self.name == "torch":
            import torch

            obj = np.asarray(obj, order="C")
            if not obj.flags.writeable:
                # torch.from_numpy warns on read-only memory (a NumPy view of a JAX
                # array, a read-only test input); the copy below happens anyway.
                obj = obj.copy()
            t = torch.from_numpy(obj)
            return t.to(device=self.device, dtype=_dtype_of(self.xp, dtype), copy=True)
        return self.xp.asarray(obj, dtype=_dtype_of(self.xp, dtype), device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        """The array as a NumPy array on the host (see :func:`gradcore.to_numpy`)."""
        return to_numpy(x)

    def synchronize(self, *arrays: Any) -> None:
        """Wait until the work queued on this backend's device has finished.

        CuPy and PyTorch (CUDA) wait for the device's current stream. JAX has no
        device-wide barrier: pass the arrays whose computation must be complete and
        they are blocked on. On CPU-only libraries this returns at once.
        """
        if self.name == "cupy":
            import cupy

            with cupy.cuda.Device(self.device.id):
                cupy.cuda.get_current_stream().synchronize()
        elif self.name == "torch":
            import torch

            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        elif self.name == "jax":
            import jax

            for a in arrays:
                a.block_until_ready()
            jax.effects_barrier()

    def __str__(self) -> str:
        return f"{self.name}:{self.device}"


def _import_backend_module(name: str) -> ModuleType:
    module = {
        "numpy": "numpy",
        "cupy": "cupy",
        "torch": "torch",
        "jax": "jax",
        "dask": "dask.array",
        "array_api_strict": "array_api_strict",
    }[name]
    return importlib.import_module(module)


def _cuda_device_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, or no device: all mean "no GPU"
        return 0


def available_backends() -> list[str]:
    """Names of the backends that can be used here, in :data:`BACKEND_NAMES` order.

    A backend is listed when its library imports; CuPy only when a CUDA device is
    visible as well.
    """
    names = []
    for name in BACKEND_NAMES:
        if name == "cupy":
            if _cuda_device_count() > 0:
                names.append(name)
            continue
        try:
            _import_backend_module(name)
        except ImportError:
            continue
        names.append(name)
    return names


def _make_device(name: str, module: Any, device: Any) -> Any:
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"backend 'numpy' has only the device 'cpu', not {device!r}")
        return "cpu"
    if name == "dask":
        if device not in (None, "cpu"):
            raise ValueError(f"backend 'dask' has only the device 'cpu', not {device!r}")
        return "cpu"
    if name == "torch":
        try:
            dev = module.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"backend 'torch' has no device {device!r}: {exc}") from None
        if dev.type == "cpu" and dev.index not in (None, 0):
            # torch accepts "cpu:3" and ignores the index: there is one CPU device.
            raise ValueError(f"backend 'torch' has one CPU device, 'cpu'; got {device!r}")
        if dev.type == "cuda" and not module.cuda.is_available():
            raise ValueError(f"backend 'torch' has no device {device!r}: no CUDA device visible")
        if dev.type == "cuda":
            count = module.cuda.device_count()
            if (dev.index or 0) >= count:
                raise ValueError(
                    f"backend 'torch' has no device {device!r}: "
                    f"{count} CUDA device{'' if count == 1 else 's'} visible (cuda:0 to "
                    f"cuda:{count - 1})"
                )
        return dev
    if name == "cupy":
        if device is None:
            return module.cuda.Device()
        if isinstance(device, str):
            device = int(device.rsplit(":", 1)[-1]) if ":" in device else 0
        if isinstance(device, int):
            return module.cuda.Device(device)
        return device
    if name == "jax":
        if device is None:
            return module.devices()[0]
        if isinstance(device, str):
            platform, _, index = device.partition(":")
            try:
                found = module.devices(platform)
            except RuntimeError:
                platforms = sorted({d.platform for d in module.devices()})
                raise ValueError(
                    f"JAX has no device {device!r}: no {platform!r} platform here "
                    f"(platforms: {', '.join(platforms)})"
                ) from None
            try:
                return found[int(index or 0)]
            except (ValueError, IndexError):
                names = ", ".join(f"{platform}:{i}" for i in range(len(found)))
                raise ValueError(f"JAX has no device {device!r}; its devices are {names}") from None
        return device
    if name == "array_api_strict":
        if device is None:
            return module.Device("CPU_DEVICE")
        if isinstance(device, str):
            try:
                return module.Device(device)
            except ValueError:
                names = ", ".join(
                    str(getattr(d, "_device", d))
                    for d in module.__array_namespace_info__().devices()
                )
                raise ValueError(
                    f"backend 'array_api_strict' has no device {device!r}; its devices are {names}"
                ) from None
        return device
    raise AssertionError(name)  # pragma: no cover


def backend(name: str, device: Any = None) -> Backend:
    r"""The :class:`Backend` called ``name``, on ``device`` (its default device if None).

    Parameters
    ----------
    name : {"numpy", "cupy", "torch", "jax", "dask", "array_api_strict"}
        The array library ("array-api-strict" is accepted too).
    device : str or int or device, optional
        "cpu", "cuda:1", 1 (a CuPy device index), "gpu:0" (JAX), "device1"
        (array-api-strict's fake second device), or a device object of the library.

    Raises
    ------
    ValueError
        For an unknown name, an uninstalled library, or a device the library lacks;
        the message lists the backends available here.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"backend name must be a str, one of {', '.join(BACKEND_NAMES)}; got {name!r}"
        )
    key = name.strip().lower().replace("-", "_")
    if key not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)} "
            f"(available here: {', '.join(available_backends())})"
        )
    try:
        module = _import_backend_module(key)
    except ImportError as exc:
        raise ValueError(
            f"backend {key!r} is not installed ({exc}); "
            f"available here: {', '.join(available_backends())}"
        ) from None
    if key == "cupy" and _cuda_device_count() == 0:
        raise ValueError(
            "backend 'cupy' needs a CUDA device and none is visible; "
            f"available here: {', '.join(available_backends())}"
        )
    dev = _make_device(key, module, device)
    if key == "numpy":
        xp = array_api_compat.array_namespace(np.empty(0))
    elif key == "jax":
        import jax.numpy as jnp

        xp = jnp
    elif key == "dask":
        import array_api_compat.dask.array as dxp

        xp = dxp
    elif key == "torch":
        import array_api_compat.torch as txp

        xp = txp
    elif key == "cupy":
        import array_api_compat.cupy as cxp

        xp = cxp
    else:
        xp = module
    return Backend(key, xp, dev, module)
