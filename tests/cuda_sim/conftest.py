"""Fixtures of the CUDA simulator tests: ``sim`` installs the CuPy stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from . import fakecupy


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The simulated ``cupy`` module, installed for the test (fresh configuration)."""
    with fakecupy.installed(monkeypatch) as cp:
        yield cp
