"""Tests of gradcore._dispatch: the fast-path registry, lazy backend imports, threads."""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading

import array_api_compat
import array_api_compat.numpy
import numpy as np
import pytest

import gradcore
from gradcore import _dispatch
from gradcore._dispatch import (
    dispatchable,
    fast_path_for,
    fast_paths_enabled,
    register_fast_path,
    use_fast_paths,
)
from gradcore._namespace import get_namespace

OP = "_gradcore_test_toy"
NP = array_api_compat.numpy


@pytest.fixture(autouse=True)
def _restore_dispatch_state():
    """Leave the registry, the cache and the lazy-import bookkeeping as they were.

    The real fast-path modules are imported first, so that their registrations are in
    the snapshot: restoring a snapshot taken before them would silently drop the NumPy
    fast paths for the rest of the session.
    """
    for module in _dispatch._BACKEND_MODULES.values():
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    registry = dict(_dispatch._registry)
    imported = set(_dispatch._imported)
    modules = dict(_dispatch._BACKEND_MODULES)
    yield
    _dispatch._registry.clear()
    _dispatch._registry.update(registry)
    _dispatch._imported.clear()
    _dispatch._imported.update(imported)
    _dispatch._BACKEND_MODULES.clear()
    _dispatch._BACKEND_MODULES.update(modules)
    _dispatch._cache.clear()


def _gradcore_test_toy(x, /, *, weight=None, out=None, scale=1.0, xp=None):
    """A toy kernel: reports that the generic body ran, and with which namespace."""
    xp = get_namespace(x, weight, out, xp=xp)
    return ("generic", xp.__name__)


toy = dispatchable(_gradcore_test_toy)


def _register_recording_fast_path(backend="numpy", result="fast"):
    calls = []

    @register_fast_path(backend, OP)
    def fast(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    return fast, calls


def _torch():
    return pytest.importorskip("torch")


# --- registry and dispatch ---------------------------------------------------------------


def test_generic_body_without_fast_path():
    assert toy(np.ones(3)) == ("generic", "array_api_compat.numpy")
    assert fast_path_for(OP, NP) is None


def test_wrapper_keeps_name_doc_and_generic():
    assert toy.__name__ == OP
    assert "toy kernel" in toy.__doc__
    assert toy.__gradcore_generic__ is _gradcore_test_toy
    assert toy.__wrapped__ is _gradcore_test_toy


def test_fast_path_taken_on_numpy_only():
    fast, calls = _register_recording_fast_path("numpy")
    x = np.ones(3)
    assert toy(x, scale=2.0) == "fast"
    assert fast_path_for(OP, NP) is fast
    # The fast path gets the caller's arguments, without xp.
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] is x
    assert kwargs == {"scale": 2.0}

    torch = _torch()
    assert toy(torch.ones(3)) == ("generic", "array_api_compat.torch")
    assert len(calls) == 1


def test_fast_path_not_taken_on_other_backends(backend):
    _, calls = _register_recording_fast_path("numpy")
    result = toy(backend.asarray(np.ones(2)))
    if backend.name == "numpy":
        assert result == "fast"
        assert len(calls) == 1
    else:
        assert result == ("generic", backend.xp.__name__)
        assert calls == []


def test_fast_path_for_another_backend_only():
    torch = _torch()
    _, calls = _register_recording_fast_path("torch", result="torch-fast")
    assert toy(torch.ones(2)) == "torch-fast"
    assert toy(np.ones(2)) == ("generic", "array_api_compat.numpy")
    assert len(calls) == 1


def test_not_implemented_falls_back_to_generic():
    _, calls = _register_recording_fast_path("numpy", result=NotImplemented)
    assert toy(np.ones(3)) == ("generic", "array_api_compat.numpy")
    assert len(calls) == 1  # it was asked, and declined


def test_fast_path_may_decline_per_call():
    @register_fast_path("numpy", OP)
    def fast(x, /, **kwargs):
        return "fast" if x.dtype == np.float64 else NotImplemented

    assert toy(np.ones(2)) == "fast"
    assert toy(np.ones(2, dtype=np.float32)) == ("generic", "array_api_compat.numpy")
    assert toy(np.ones(2)) == "fast"


def test_fast_path_errors_propagate():
    @register_fast_path("numpy", OP)
    def fast(*args, **kwargs):
        raise ValueError("weight: expected shape (3,)")

    with pytest.raises(ValueError, match="weight"):
        toy(np.ones(3))


# --- use_fast_paths ----------------------------------------------------------------------


def test_use_fast_paths_off_and_restored():
    _, calls = _register_recording_fast_path("numpy")
    x = np.ones(2)
    assert fast_paths_enabled()
    with use_fast_paths(False):
        assert not fast_paths_enabled()
        assert toy(x) == ("generic", "array_api_compat.numpy")
    assert fast_paths_enabled()
    assert toy(x) == "fast"
    assert len(calls) == 1  # not even asked while off


def test_use_fast_paths_nested():
    _register_recording_fast_path("numpy")
    x = np.ones(2)
    with use_fast_paths(False):
        with use_fast_paths(True):
            assert toy(x) == "fast"
            with use_fast_paths(False):
                assert toy(x)[0] == "generic"
            assert toy(x) == "fast"
        assert toy(x)[0] == "generic"
        with use_fast_paths():  # the default argument turns them on
            assert toy(x) == "fast"
    assert toy(x) == "fast"


def test_use_fast_paths_restored_after_an_exception():
    _register_recording_fast_path("numpy")
    with pytest.raises(RuntimeError, match="boom"), use_fast_paths(False):
        raise RuntimeError("boom")
    assert fast_paths_enabled()
    assert toy(np.ones(2)) == "fast"


def test_use_fast_paths_is_per_thread():
    _register_recording_fast_path("numpy")
    x = np.ones(2)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        with use_fast_paths(False):
            seen["worker"] = toy(x)
            inside.set()
            release.wait(10)
        seen["worker_after"] = toy(x)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert inside.wait(10)
        # The other thread switched them off for itself only.
        assert fast_paths_enabled()
        assert toy(x) == "fast"
    finally:
        release.set()
        thread.join(10)
    assert seen["worker"][0] == "generic"
    assert seen["worker_after"] == "fast"


def test_use_fast_paths_follows_a_copied_context():
    _register_recording_fast_path("numpy")
    x = np.ones(2)
    with use_fast_paths(False):
        ctx = contextvars.copy_context()
    # Work handed on with the context (as asyncio and executors that copy it do) keeps
    # the setting of the block it was created in.
    assert ctx.run(toy, x)[0] == "generic"
    assert toy(x) == "fast"

    results = []
    thread = threading.Thread(target=lambda: results.append(ctx.run(toy, x)))
    thread.start()
    thread.join(10)
    assert results[0][0] == "generic"


# --- the cache ---------------------------------------------------------------------------


def test_cache_per_op_and_namespace():
    torch = _torch()
    toy(np.ones(2))
    toy(torch.ones(2))
    assert (OP, NP) in _dispatch._cache
    assert _dispatch._cache[(OP, NP)] is None
    assert (OP, get_namespace(torch.ones(1))) in _dispatch._cache


def test_registering_invalidates_the_cache():
    x = np.ones(2)
    assert toy(x)[0] == "generic"  # caches "no fast path" for (op, numpy)
    assert _dispatch._cache[(OP, NP)] is None

    _register_recording_fast_path("numpy", result="first")
    assert toy(x) == "first"

    # Replacing a fast path takes effect at once too.
    _register_recording_fast_path("numpy", result="second")
    assert toy(x) == "second"
    assert fast_path_for(OP, NP)() == "second"


def test_cached_lookup_does_not_reimport(monkeypatch):
    toy(np.ones(2))
    calls = []
    monkeypatch.setattr(_dispatch, "_import_backend", lambda name: calls.append(name))
    toy(np.ones(2))
    assert calls == []


# --- which arguments decide the namespace ------------------------------------------------


def test_keyword_arrays_take_part_in_namespace_checks():
    torch = _torch()
    logits = np.ones((2, 3))
    with pytest.raises(TypeError, match="two different libraries") as info:
        toy(logits, weight=torch.ones(3))
    assert "numpy" in str(info.value)
    assert "torch" in str(info.value)
    with pytest.raises(TypeError, match="two different libraries"):
        toy(logits, out=torch.ones((2, 3)))
    with pytest.raises(TypeError, match="two different libraries"):
        toy(torch.ones((2, 3)), weight=np.ones(3))
    # Same library, and non-array keywords, are fine.
    assert toy(torch.ones((2, 3)), weight=torch.ones(3), scale=3.0)[0] == "generic"
    assert toy(logits, weight=None, out=None, scale=0.5)[0] == "generic"


def test_keyword_arrays_checked_before_a_fast_path_runs():
    torch = _torch()
    _, calls = _register_recording_fast_path("numpy")
    with pytest.raises(TypeError, match="two different libraries"):
        toy(np.ones(3), weight=torch.ones(3))
    assert calls == []


def test_keyword_arrays_on_two_devices():
    xps = pytest.importorskip("array_api_strict")
    x = xps.ones(3)
    w = xps.ones(3, device=xps.Device("device1"))
    with pytest.raises(ValueError, match="two different devices"):
        toy(x, weight=w)


def test_explicit_xp_skips_the_lookup():
    # With xp= the arguments are not inspected (a list would otherwise be rejected).
    with pytest.raises(TypeError, match="expected an array"):
        toy([1.0, 2.0])
    assert toy([1.0, 2.0], xp=NP) == ("generic", "array_api_compat.numpy")
    _, calls = _register_recording_fast_path("numpy")
    assert toy([1.0, 2.0], xp=NP) == "fast"
    assert "xp" not in calls[0][1]


# --- lazy import of backend modules -------------------------------------------------------


def _write_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_backend_module_imported_on_first_use(tmp_path, monkeypatch):
    name = "_gradcore_test_lazy_fast_paths"
    _write_module(
        tmp_path,
        name,
        f"""
        from gradcore._dispatch import register_fast_path

        @register_fast_path("numpy", {OP!r})
        def fast(*args, **kwargs):
            return "lazy-fast"
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_dispatch._BACKEND_MODULES, "numpy", name)
    monkeypatch.delitem(sys.modules, name, raising=False)
    _dispatch._imported.discard("numpy")
    _dispatch._cache.clear()
    try:
        assert name not in sys.modules
        if importlib.util.find_spec("torch") is not None:
            import torch

            toy(torch.ones(2))  # another library does not import the NumPy module
            assert name not in sys.modules
        # The very first NumPy call imports the module and already takes its fast path.
        assert toy(np.ones(2)) == "lazy-fast"
        assert name in sys.modules
        assert "numpy" in _dispatch._imported
    finally:
        sys.modules.pop(name, None)


def test_missing_backend_module_means_no_fast_paths(monkeypatch):
    monkeypatch.setitem(_dispatch._BACKEND_MODULES, "numpy", "_gradcore_test_no_such_module")
    _dispatch._imported.discard("numpy")
    _dispatch._cache.clear()
    for _ in range(2):
        assert toy(np.ones(2)) == ("generic", "array_api_compat.numpy")
    assert "numpy" in _dispatch._imported


def test_broken_backend_module_fails_loudly_every_time(tmp_path, monkeypatch):
    name = "_gradcore_test_broken_fast_paths"
    _write_module(tmp_path, name, "import _gradcore_test_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_dispatch._BACKEND_MODULES, "numpy", name)
    _dispatch._imported.discard("numpy")
    _dispatch._cache.clear()
    try:
        for _ in range(2):  # not once and then silently without fast paths
            with pytest.raises(ModuleNotFoundError, match="_gradcore_test_missing_dependency"):
                toy(np.ones(2))
        assert "numpy" not in _dispatch._imported
        with use_fast_paths(False):
            assert toy(np.ones(2))[0] == "generic"
    finally:
        sys.modules.pop(name, None)


def test_import_gradcore_alone_imports_no_backend_module():
    code = textwrap.dedent(
        """
        import importlib.util, json, sys
        import numpy as np
        import gradcore
        from gradcore._dispatch import dispatchable

        before = sorted(m for m in sys.modules
                        if m.startswith("gradcore.backends.")
                        or m.split(".")[0] in ("torch", "jax", "dask", "cupy"))

        @dispatchable
        def probe(x, /, *, xp=None):
            return x

        probe(np.ones(2))
        print(json.dumps({
            "before": before,
            "after": "gradcore.backends.numpy" in sys.modules,
            "exists": importlib.util.find_spec("gradcore.backends.numpy") is not None,
        }))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "GRADCORE_NUM_THREADS"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["before"] == []
    if report["exists"]:
        assert report["after"], "the NumPy fast paths were not imported on first use"


# --- threads -----------------------------------------------------------------------------


@pytest.fixture
def clean_threads(monkeypatch):
    monkeypatch.delenv("GRADCORE_NUM_THREADS", raising=False)
    gradcore.set_num_threads(None)
    yield monkeypatch
    gradcore.set_num_threads(None)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
def test_num_threads_default_is_the_affinity(clean_threads):
    assert gradcore.get_num_threads() == len(os.sched_getaffinity(0))
    clean_threads.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert gradcore.get_num_threads() == 3


def test_num_threads_default_without_affinity(clean_threads):
    clean_threads.delattr(os, "sched_getaffinity", raising=False)
    clean_threads.setattr(os, "cpu_count", lambda: 7)
    assert gradcore.get_num_threads() == 7


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("1", 1), (" 12 ", 12)])
def test_num_threads_from_environment(clean_threads, value, expected):
    clean_threads.setenv("GRADCORE_NUM_THREADS", value)
    assert gradcore.get_num_threads() == expected


def test_num_threads_empty_environment_means_default(clean_threads):
    clean_threads.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    clean_threads.setenv("GRADCORE_NUM_THREADS", "")
    assert gradcore.get_num_threads() == 2


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "4 threads"])
def test_num_threads_bad_environment(clean_threads, value):
    clean_threads.setenv("GRADCORE_NUM_THREADS", value)
    with pytest.raises(ValueError, match="GRADCORE_NUM_THREADS") as info:
        gradcore.get_num_threads()
    assert repr(value) in str(info.value)


def test_set_num_threads_and_restore(clean_threads):
    clean_threads.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    clean_threads.setenv("GRADCORE_NUM_THREADS", "5")
    assert gradcore.get_num_threads() == 5
    gradcore.set_num_threads(2)
    assert gradcore.get_num_threads() == 2  # an explicit setting beats the environment
    gradcore.set_num_threads(1)
    assert gradcore.get_num_threads() == 1
    gradcore.set_num_threads(None)
    assert gradcore.get_num_threads() == 5
    clean_threads.delenv("GRADCORE_NUM_THREADS")
    assert gradcore.get_num_threads() == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, False, 2.0])
def test_set_num_threads_rejects_bad_values(clean_threads, bad):
    gradcore.set_num_threads(3)
    with pytest.raises(ValueError, match="num_threads"):
        gradcore.set_num_threads(bad)
    assert gradcore.get_num_threads() == 3  # unchanged by the failed call
