"""README's Python examples run as written (shortened where they train).

A block that needs more than ``pip install .`` gives (NumPy, array-api-compat, tqdm)
says so on its first line (``# needs: torch``); every other block is run in a fresh
interpreter in which the optional libraries cannot be imported, as after the README's
own install.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)

#: Libraries that ``pip install .`` does not install.
OPTIONAL = ("torch", "jax", "jaxlib", "dask", "cupy", "sklearn", "matplotlib", "pytest")

#: What using each optional library looks like in an example.
USES = {
    "torch": r"import torch|backend\(\"torch\"\)|\.to\(\"torch\"\)|backend=\"torch\"",
    "jax": r"import jax|backend\(\"jax\"\)|\.to\(\"jax\"\)|backend=\"jax\"",
    "dask": r"import dask|backend\(\"dask\"\)|\.to\(\"dask\"\)|backend=\"dask\"",
    "sklearn": r"digits\(",
    "matplotlib": r"import matplotlib",
    "pytest": r"def test_|import pytest",
}

# Installs the import blocker in a fresh interpreter: the optional libraries are not
# found, exactly as when they are not installed (importlib.util.find_spec gives None).
BLOCKER = textwrap.dedent(
    f"""
    import importlib.machinery, sys

    class _Absent:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in {OPTIONAL!r}:
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        @classmethod
        def invalidate_caches(cls):
            importlib.machinery.PathFinder.invalidate_caches()

    sys.meta_path[:] = [
        _Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path
    ]
    """
)


def _needs(block: str) -> list[str]:
    first = block.splitlines()[0] if block.strip() else ""
    match = re.match(r"#\s*needs:\s*(.+)", first)
    return [n.strip() for n in match.group(1).split(",")] if match else []


def _shortened(block: str) -> str:
    return block.replace("epochs=30", "epochs=2").replace(
        'backend="numpy",', 'backend="numpy", progress=False,'
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_says_what_it_needs(index):
    block = BLOCKS[index]
    needs = _needs(block)
    for library, pattern in USES.items():
        if re.search(pattern, block):
            assert library in needs, (
                f"README block {index} uses {library} but does not say so on its first "
                f"line (# needs: {library})"
            )


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, pytester):
    block = BLOCKS[index]
    needs = _needs(block)
    for library in needs:
        pytest.importorskip(library)
    if "def test_" in block:
        # The plugin example is a test file: run it under pytest on the backends here.
        pytester.makepyfile(test_example=block)
        result = pytester.runpytest_inprocess(
            "-p", "no:cacheprovider", "--gradcore-backends=numpy,numpy_readonly"
        )
        result.assert_outcomes(passed=3)
        return
    if needs:
        exec(compile(_shortened(block), f"README block {index}", "exec"), {})
        return
    # Runs after `pip install .` alone: none of the optional libraries importable.
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + "\n" + _shortened(block)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"README block {index} failed:\n{proc.stderr}"


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


def test_readme_first_command_installs_and_trains_on_the_default_install():
    commands = re.findall(r"```bash\n(.*?)```", TEXT, re.S)
    assert commands[0].strip() == "pip install . && gradcore train"
    # `gradcore train` with no option uses NumPy and the built-in spirals only.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER + "\nimport sys\nfrom gradcore.cli import main\n"
            "sys.exit(main(['train', '--epochs', '1', '--no-progress']))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "spirals" in proc.stdout
