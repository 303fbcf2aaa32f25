r"""Fast-path dispatch: one generic body per kernel, optional native versions per backend.

A public kernel is decorated with :func:`dispatchable`. On each call the decorator
finds the namespace of the array arguments and looks up a *fast path* registered for
that backend and that kernel (``register_fast_path("numpy", "mse")``). The backend's
module (``gradcore.backends.<name>``) is imported lazily, the first time an array of
that library reaches any kernel, and the lookup is cached per (kernel, namespace), so
steady-state dispatch costs one dictionary read.

A fast path takes the generic signature minus ``xp``. It may return
:data:`NotImplemented` (an unsupported dtype, layout or option) and the generic body
then runs instead. :func:`use_fast_paths` switches fast paths off (or on) inside a
``with`` block, so tests can compare the two on the same inputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import array_api_compat

from ._namespace import backend_name, get_namespace

__all__ = [
    "dispatchable",
    "fast_path_for",
    "get_num_threads",
    "register_fast_path",
    "set_num_threads",
    "use_fast_paths",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Backends whose fast paths live in ``gradcore.backends.<name>``.
_BACKEND_MODULES = {
    "numpy": "gradcore.backends.numpy",
    "cupy": "gradcore.backends.cupy",
    "dask": "gradcore.backends.dask",
}

_registry: dict[tuple[str, str], Callable[..., Any]] = {}
_cache: dict[tuple[str, Any], Callable[..., Any] | None] = {}
_imported: set[str] = set()
_lock = threading.Lock()
_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("gradcore_fast_paths", default=True)


def register_fast_path(backend: str, op: str) -> Callable[[F], F]:
    r"""Register the decorated function as ``backend``'s fast path for kernel ``op``.

    Parameters
    ----------
    backend : str
        A backend name, as :func:`gradcore.backend_name` returns it ("numpy", "cupy").
    op : str
        The public kernel's name ("softmax_cross_entropy").

    Notes
    -----
    The fast path is called with the kernel's positional and keyword arguments, minus
    ``xp``. Returning ``NotImplemented`` falls back to the generic body.
    """

    def decorate(func: F) -> F:
        with _lock:
            _registry[(backend, op)] = func
            _cache.clear()
        return func

    return decorate


def _import_backend(name: str) -> None:
    if name in _imported:
        return
    module = _BACKEND_MODULES.get(name)
    if module is not None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a dependency of the backend module is missing: a bug
                raise
    # Only once the import has succeeded (or there is no module): a backend module that
    # fails must fail on every call, not once and then silently lose its fast paths.
    with _lock:
        _imported.add(name)


def fast_path_for(op: str, xp: Any) -> Callable[..., Any] | None:
    """The fast path registered for kernel ``op`` on namespace ``xp``, or None."""
    key = (op, xp)
    try:
        return _cache[key]
    except KeyError:
        pass
    name = backend_name(xp)
    _import_backend(name)
    with _lock:
        found = _registry.get((name, op))
        _cache[key] = found
    return found


@contextlib.contextmanager
def use_fast_paths(enabled: bool = True) -> Iterator[None]:
    """Turn backend fast paths on or off inside a ``with`` block.

    ``enabled`` must be ``True`` or ``False`` (``TypeError`` otherwise: ``"no"`` is not
    coerced to ``True``).

    Examples
    --------
    >>> import numpy as np, gradcore
    >>> x = np.zeros((2, 3)); y = np.array([0, 2])
    >>> with gradcore.use_fast_paths(False):
    ...     loss, grad = gradcore.softmax_cross_entropy(x, y)  # the generic body
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_fast_paths(enabled) must be True or False, got {enabled!r}")
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def fast_paths_enabled() -> bool:
    """Whether fast paths are on in the current context."""
    return _enabled.get()


def dispatchable(func: F) -> F:
    r"""Make a generic kernel dispatch to registered backend fast paths.

    The kernel's array arguments are its positional arguments and any keyword argument
    whose value is an array (``weight=``, ``out=``); together they decide the namespace.
    ``xp=`` given by the caller is respected and skips the lookup of the namespace.
    """
    op = func.__name__

    @functools.wraps(func)
    def wrapper(*args: Any, xp: Any = None, **kwargs: Any) -> Any:
        if xp is None:
            arrays = [*args, *(v for v in kwargs.values() if array_api_compat.is_array_api_obj(v))]
            xp = get_namespace(*arrays)
        if _enabled.get():
            fast = fast_path_for(op, xp)
            if fast is not None:
                result = fast(*args, **kwargs)
                if result is not NotImplemented:
                    return result
        return func(*args, xp=xp, **kwargs)

    wrapper.__gradcore_generic__ = func  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


# --- threads used by CPU fast paths ----------------------------------------------------

_num_threads: int | None = None
#: The last ``GRADCORE_NUM_THREADS`` string seen and what it gave (parsed once per value).
_env_cache: tuple[str, int] | None = None


def _env_num_threads() -> int | None:
    """``GRADCORE_NUM_THREADS`` as a positive int (None if unset or empty); parsed once
    per value, ``ValueError`` naming it when it is not a positive integer."""
    global _env_cache
    env = os.environ.get("GRADCORE_NUM_THREADS")
    if not env:
        return None
    cached = _env_cache
    if cached is not None and cached[0] == env:
        return cached[1]
    try:
        n = int(env)
    except ValueError:
        raise ValueError(f"GRADCORE_NUM_THREADS must be a positive integer, got {env!r}") from None
    if n < 1:
        raise ValueError(f"GRADCORE_NUM_THREADS must be a positive integer, got {env!r}")
    _env_cache = (env, n)
    return n


def check_thread_setting() -> None:
    """Raise now if the thread count would come from an invalid ``GRADCORE_NUM_THREADS``.

    Cheap (no system call): threaded CPU fast paths call it on every call, whatever the
    size of their input, so a bad value fails on first use, not only once an input is
    large enough to be split over threads.
    """
    if _num_threads is None:
        _env_num_threads()


def _default_num_threads() -> int:
    n = _env_num_threads()
    if n is not None:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(n: int | None) -> None:
    """Set how many threads the CPU fast paths use; None restores the default.

    The default is the ``GRADCORE_NUM_THREADS`` environment variable when set, else the
    number of cores this process may run on (its CPU affinity).
    """
    global _num_threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive integer or None, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """How many threads the CPU fast paths use (see :func:`set_num_threads`).

    Raises ``ValueError`` for an invalid ``GRADCORE_NUM_THREADS`` when no explicit
    setting overrides it.
    """
    return _num_threads if _num_threads is not None else _default_num_threads()
