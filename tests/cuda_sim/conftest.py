"""Fixtures of the CUDA simulator tests: ``sim`` installs the CuPy stand-in."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from types import ModuleType

import pytest

from . import build, fakecupy


@pytest.fixture(scope="session", autouse=True)
def _build_cache(request: pytest.FixtureRequest) -> None:
    """Compiled specialisations live in the pytest cache (else a temporary directory)."""
    cache = getattr(request.config, "cache", None)
    if cache is not None and "GRADCORE_CUDA_SIM_CACHE" not in os.environ:
        os.environ["GRADCORE_CUDA_SIM_CACHE"] = str(cache.mkdir("cuda_sim"))


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The simulated ``cupy`` module, installed for the test (fresh configuration)."""
    if shutil.which(build.CXX) is None:
        pytest.skip(f"the CUDA simulator needs a C++ compiler ({build.CXX} is not on the PATH)")
    with fakecupy.installed(monkeypatch) as cp:
        yield cp
