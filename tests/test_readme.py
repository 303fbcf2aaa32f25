"""README's Python examples run as written (shortened where they train)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, pytester):
    block = BLOCKS[index]
    if "def test_" in block:
        # The plugin example is a test file: run it under pytest with two backends.
        pytester.makepyfile(test_example=block)
        result = pytester.runpytest_inprocess(
            "-p", "no:cacheprovider", "--gradcore-backends=numpy,torch"
        )
        result.assert_outcomes(passed=2)
        return
    pytest.importorskip("torch")
    code = block.replace("epochs=30", "epochs=2").replace(
        'backend="numpy",', 'backend="numpy", progress=False,'
    )
    exec(compile(code, f"README block {index}", "exec"), {})


def test_readme_has_examples():
    assert len(BLOCKS) >= 4
