"""Build a ``.cu`` specialisation into a shared library that runs on the CPU.

``build(source, options)`` preprocesses the CUDA source with the ``-D`` options that
NVRTC would get, rewrites what g++ cannot compile (inline PTX, static ``__shared__``),
appends a table of the kernels (parameter sizes and kinds, ``__launch_bounds__``,
``__cluster_dims__``), and compiles it with ``shim.h`` forced in. Libraries are cached
by the hash of everything that goes into them.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
SHIM = HERE / "shim.h"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-fPIC", "-w", "-D_FORTIFY_SOURCE=0", "-fno-strict-aliasing"]
#: Bump when the rewriter changes what it emits.
VERSION = "1"

# --- inline PTX ------------------------------------------------------------------------
# Each instruction the kernels use, by its opcode and operand pattern ("%" an operand,
# "[%]" an address operand, "%name" a special register), and the shim call for it;
# {0}, {1}... are the operands in order. Anything else is refused.
PTX: dict[str, str] = {
    "cvt.f32.f16 %,%": "{0} = sim::cvt_f32_f16({1})",
    "cvt.rn.f16.f32 %,%": "{0} = sim::cvt_rn_f16_f32({1})",
    "barrier.cluster.arrive": "sim::cluster_arrive(__LINE__)",
    "barrier.cluster.arrive.release": "sim::cluster_arrive(__LINE__)",
    "barrier.cluster.arrive.aligned": "sim::cluster_arrive(__LINE__)",
    "barrier.cluster.arrive.release.aligned": "sim::cluster_arrive(__LINE__)",
    "barrier.cluster.wait": "sim::cluster_wait(__LINE__)",
    "barrier.cluster.wait.acquire": "sim::cluster_wait(__LINE__)",
    "barrier.cluster.wait.aligned": "sim::cluster_wait(__LINE__)",
    "barrier.cluster.wait.acquire.aligned": "sim::cluster_wait(__LINE__)",
    "mov.u32 %,%cluster_ctarank": "{0} = sim::cluster_ctarank()",
    "mapa.shared::cluster.u32 %,%,%": "{0} = sim::mapa({1}, {2})",
    "ld.shared::cluster.f32 %,[%]": "{0} = sim::ld_cluster<float>({1})",
    "ld.shared::cluster.f64 %,[%]": "{0} = sim::ld_cluster<double>({1})",
    "ld.shared::cluster.u32 %,[%]": "{0} = sim::ld_cluster<unsigned int>({1})",
    "st.shared::cluster.f32 [%],%": "sim::st_cluster<float>({0}, {1})",
    "st.shared::cluster.u32 [%],%": "sim::st_cluster<unsigned int>({0}, {1})",
}


class RewriteError(ValueError):
    """Something in the CUDA source that the simulator does not know how to run."""


def _skip_string(text: str, i: int) -> int:
    """Index just past the string or char literal starting at ``text[i]``."""
    quote = text[i]
    i += 1
    while text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _matching_paren(text: str, i: int) -> int:
    """Index of the ``)`` matching the ``(`` at ``text[i]``."""
    depth = 0
    while True:
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses and string literals."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_string(text, i)
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _string_value(literals: str) -> str:
    """The value of adjacent C string literals."""
    out = []
    for body in re.findall(r'"((?:[^"\\]|\\.)*)"', literals):
        out.append(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body))
    return "".join(out)


def _operand_exprs(section: str) -> list[str]:
    exprs = []
    for item in _split_top(section, ","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r'(?:\[\w+\]\s*)?"[^"]*"\s*\((.*)\)', item, re.S)
        if m is None:
            raise RewriteError(f"cannot parse asm operand {item!r}")
        exprs.append(m.group(1).strip())
    return exprs


def _translate_asm(template: str, operands: list[str], where: str) -> str:
    calls = []
    for raw in re.split(r"[;\n]", template.replace("%%", "\x00")):
        ins = raw.strip()
        if not ins:
            continue
        parts = ins.split(None, 1)
        opcode, args = parts[0], (parts[1] if len(parts) > 1 else "")
        pattern, used = [], []
        for arg in (a.strip() for a in args.split(",") if a.strip()):
            m = re.fullmatch(r"(\[)?%(\d+)(\])?", arg)
            if m:
                pattern.append("[%]" if m.group(1) else "%")
                used.append(operands[int(m.group(2))])
            elif arg.startswith("\x00"):
                pattern.append("%" + arg[1:])
            else:
                raise RewriteError(f"{where}: unsupported PTX operand {arg!r} in {ins!r}")
        key = opcode + (" " + ",".join(pattern) if pattern else "")
        if key not in PTX:
            raise RewriteError(
                f"{where}: inline PTX {ins.replace(chr(0), '%')!r} is not known to the CUDA "
                f"simulator (pattern {key!r}); add it to PTX in tests/cuda_sim/build.py and a "
                "function for it to shim.h"
            )
        calls.append(PTX[key].format(*(f"({e})" for e in used)))
    return "{ " + "; ".join(calls) + "; }"


def _rewrite_asm(text: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s*(?:volatile\s*)?(?:__volatile__\s*)?\(", text):
        if m.start() < pos:
            continue
        open_at = m.end() - 1
        close = _matching_paren(text, open_at)
        semi = text.index(";", close)
        sections = _split_top(text[open_at + 1 : close], ":")
        template = _string_value(sections[0])
        operands = []
        for section in sections[1:3]:
            operands += _operand_exprs(section)
        line = _line_of(text, m.start())
        out.append(text[pos : m.start()])
        out.append(_translate_asm(template, operands, f"line {line}"))
        pos = semi + 1
    out.append(text[pos:])
    return "".join(out)


def _line_of(text: str, index: int) -> str:
    """The source line at ``index`` of preprocessed text (from its # line markers)."""
    before = text[:index]
    marks = list(re.finditer(r'^# (\d+) "([^"]*)"', before, re.M))
    if not marks:
        return str(before.count("\n") + 1)
    last = marks[-1]
    return (
        f"{Path(last.group(2)).name}:{int(last.group(1)) + before.count(chr(10), last.end()) - 1}"
    )


_SHARED = re.compile(r"\b__shared__\s+([A-Za-z_][\w:<>, ]*?[\w>*])\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")
_SHARED_DYNAMIC = re.compile(
    r"\bextern\s+__shared__\s+([A-Za-z_][\w:<>, ]*?[\w>*])\s+(\w+)\s*\[\s*\]\s*;"
)


def _rewrite_shared(text: str) -> str:
    text = _SHARED_DYNAMIC.sub(lambda m: f"SIM_SHARED_DYNAMIC({m.group(1)}, {m.group(2)});", text)
    counter = iter(range(1, 1 << 30))
    text = _SHARED.sub(
        lambda m: f"SIM_SHARED({m.group(1)}, {m.group(2)}, {m.group(3)}, {next(counter)});", text
    )
    if re.search(r"\b__shared__\b", text):
        raise RewriteError("a __shared__ declaration the simulator cannot rewrite")
    return text


_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+')


@dataclass(frozen=True)
class KernelDecl:
    name: str
    max_threads: int
    min_blocks: int
    cluster: tuple[int, int, int]


def _kernels(text: str) -> list[KernelDecl]:
    found = []
    for m in _KERNEL.finditer(text):
        i, attrs = m.end(), {}
        while True:  # attributes like __launch_bounds__(...), then the kernel's name
            a = re.compile(r"\s*(\w+)\s*").match(text, i)
            if a is None:
                raise RewriteError(f"cannot parse the kernel declared at {_line_of(text, i)}")
            i = a.end()
            if text[i] != "(":
                continue  # an attribute without arguments
            close = _matching_paren(text, i)
            if a.group(1).startswith("__") and a.group(1).endswith("__"):
                attrs[a.group(1)] = [int(v) for v in text[i + 1 : close].split(",")]
                i = close + 1
                continue
            name = a.group(1)
            break
        lb = attrs.get("__launch_bounds__", [1024, 0])
        cd = [*attrs.get("__cluster_dims__", []), 1, 1, 1][:3]
        found.append(KernelDecl(name, lb[0], lb[1] if len(lb) > 1 else 0, tuple(cd)))  # type: ignore[arg-type]
    return found


def rewrite(text: str) -> tuple[str, list[KernelDecl]]:
    """Preprocessed CUDA source -> C++ for g++ with shim.h, and its kernels."""
    kernels = _kernels(text)
    text = _rewrite_shared(_rewrite_asm(text))
    table = []
    for k in kernels:
        table.append(
            f'    sim::info("{k.name}", &{k.name}, &sim_invoke_{k.name}, {k.max_threads}, '
            f"{k.min_blocks}, {k.cluster[0]}, {k.cluster[1]}, {k.cluster[2]}),"
        )
    glue = "\n".join(
        f"static void sim_invoke_{k.name}(void** a) {{ sim::invoke(&{k.name}, a); }}"
        for k in kernels
    )
    text += (
        f"\n{glue}\nstatic const sim::KernelInfo sim_table[] = {{\n"
        + "\n".join(table)
        + '\n};\nextern "C" const sim::KernelInfo* sim_kernel_table(int* n) {\n'
        f"    *n = {len(kernels)};\n    return sim_table;\n}}\n"
    )
    return text, kernels


# --- building and caching ----------------------------------------------------------------


def cache_dir() -> Path:
    path = os.environ.get("GRADCORE_CUDA_SIM_CACHE")
    if path:
        d = Path(path)
    else:
        d = Path(tempfile.gettempdir()) / f"gradcore-cuda-sim-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


_pch_lock = threading.Lock()


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RewriteError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def _precompiled_shim() -> Path:
    """shim.h and its precompiled .gch in the cache (keyed by the header's hash)."""
    key = hashlib.sha256((SHIM.read_text() + " ".join(CXXFLAGS) + CXX).encode()).hexdigest()[:16]
    d = cache_dir() / f"shim-{key}"
    header = d / "shim.h"
    with _pch_lock:
        if not (d / "shim.h.gch").exists():
            d.mkdir(exist_ok=True)
            tmp = d / f"shim.h.gch.{os.getpid()}"
            header.write_text(SHIM.read_text())
            _run([CXX, *CXXFLAGS, "-x", "c++-header", str(header), "-o", str(tmp)])
            os.replace(tmp, d / "shim.h.gch")
    return header


class SimKernelInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("invoke", ctypes.c_void_p),
        ("nparams", ctypes.c_int),
        ("sizes", ctypes.c_int * 24),
        ("kinds", ctypes.c_int * 24),
        ("max_threads", ctypes.c_int),
        ("min_blocks", ctypes.c_int),
        ("cluster", ctypes.c_int * 3),
    ]


@dataclass
class Kernel:
    index: int
    name: str
    sizes: tuple[int, ...]
    kinds: tuple[int, ...]  # 0 pointer, 1 signed int, 2 unsigned int, 3 float, 4 other
    max_threads: int
    min_blocks: int
    cluster: tuple[int, int, int]


class Library:
    """A compiled specialisation: its kernels, and ``launch``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        n = ctypes.c_int()
        get = self.lib.sim_kernel_table
        get.restype = ctypes.POINTER(SimKernelInfo)
        get.argtypes = [ctypes.POINTER(ctypes.c_int)]
        table = get(ctypes.byref(n))
        self.kernels: dict[str, Kernel] = {}
        for i in range(n.value):
            k = table[i]
            self.kernels[k.name.decode()] = Kernel(
                i,
                k.name.decode(),
                tuple(k.sizes[: k.nparams]),
                tuple(k.kinds[: k.nparams]),
                k.max_threads,
                k.min_blocks,
                tuple(k.cluster),  # type: ignore[arg-type]
            )
        self._launch = self.lib.sim_launch
        self._launch.restype = ctypes.c_int

    def launch(
        self,
        kernel: Kernel,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        args: list[ctypes._SimpleCData | ctypes.Array],  # type: ignore[type-arg]
        *,
        shared_mem: int = 0,
        order: int = 0,
        seed: int = 0,
    ) -> str | None:
        """Run the kernel; the error report, or None."""
        u3 = ctypes.c_uint * 3
        ptrs = (ctypes.c_void_p * max(1, len(args)))(
            *(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args)
        )
        err = ctypes.create_string_buffer(8192)
        rc = self._launch(
            ctypes.c_int(kernel.index),
            u3(*grid),
            u3(*block),
            u3(*kernel.cluster),
            ctypes.c_ulonglong(shared_mem),
            ptrs,
            ctypes.c_int(order),
            ctypes.c_ulonglong(seed),
            err,
            ctypes.c_ulonglong(len(err)),
        )
        return err.value.decode(errors="replace") if rc else None


_libraries: dict[str, Library] = {}
_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}


def build(source: str, options: tuple[str, ...] = (), *, name: str = "kernel.cu") -> Library:
    """Compile CUDA ``source`` with NVRTC-style ``-D`` ``options``; cached by content."""
    defines = [o for o in options if o.startswith("-D")]
    unknown = [o for o in options if not o.startswith("-D")]
    if unknown:
        raise RewriteError(f"options the simulator does not understand: {unknown}")
    build_py = Path(__file__).read_text()
    key = hashlib.sha256(
        "\0".join([VERSION, source, *defines, SHIM.read_text(), build_py, *CXXFLAGS]).encode()
    ).hexdigest()[:24]
    with _lock:
        lib = _libraries.get(key)
        if lib is not None:
            return lib
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        if key in _libraries:
            return _libraries[key]
        d = cache_dir()
        so = d / f"{Path(name).stem}-{key}.so"
        if not so.exists():
            header = _precompiled_shim()
            with tempfile.TemporaryDirectory(dir=d) as tmp:
                cu = Path(tmp) / name
                cu.write_text(source)
                pre = subprocess.run(
                    [
                        CXX,
                        "-E",
                        "-x",
                        "c++",
                        "-D__CUDACC__",
                        "-D__CUDA_ARCH__=900",
                        *defines,
                        str(cu),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if pre.returncode != 0:
                    raise RewriteError(f"preprocessing {name} failed:\n{pre.stderr}")
                text, _ = rewrite(pre.stdout)
                cpp = Path(tmp) / (Path(name).stem + ".sim.cpp")
                cpp.write_text(text)
                out = Path(tmp) / "k.so"
                _run([CXX, *CXXFLAGS, "-shared", "-include", str(header), str(cpp), "-o", str(out)])
                os.replace(out, so)
        lib = Library(so)
        with _lock:
            _libraries[key] = lib
        return lib
