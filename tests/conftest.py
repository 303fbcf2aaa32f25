"""Shared test configuration; the gradcore plugin itself comes in through its entry point."""

import contextlib
import importlib

pytest_plugins = ["pytester"]

# The plugin imports an array library only when a test asks for it. In this suite,
# though, pytester's inner sessions run in this process and drop every module first
# imported inside them when they end; a library with C extensions (torch) cannot be
# imported a second time in one process. So the libraries installed here are imported
# once, up front; those that are missing are simply skipped by the tests that need them.
for _name in ("torch", "jax", "jax.numpy", "dask.array", "array_api_strict"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_name)
