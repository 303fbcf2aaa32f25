"""A stand-in for the parts of CuPy that ``backends/cupy.py`` uses, backed by the simulator.

Device memory is host memory with canaries on both sides of every allocation (checked
after each launch, as ``compute-sanitizer`` would check bounds); device pointers are
real addresses, so the compiled kernels dereference them directly. ``RawModule`` builds
the source with :mod:`build`; a ``RawKernel`` call packs its arguments as CuPy does
(arrays as device pointers, NumPy scalars as their bytes, Python ints as int64, Python
floats as float64) and, unlike CuPy, checks each argument's byte size and kind against
the kernel's parameter, every pointer against the live allocations of the current
device, and the launch limits. Each launch runs under several resume orders and fails
unless every buffer it could write ends bit-identical.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

import array_api_compat.numpy as np_compat
import numpy as np

from . import build

GUARD = 256  # canary bytes before and after every allocation
ALIGN = 256  # CuPy's allocations are 256-byte aligned (at least)
CANARY = 0xCD

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_ILLEGAL_ADDRESS = 700
CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_INVALID_CLUSTER_SIZE = 912

ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2, "warps": 3}


class SimError(AssertionError):
    """A defect the simulator found in a kernel (race, deadlock, out of bounds, ...)."""


class CUDADriverError(RuntimeError):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(f"CUDA driver error {status}: {msg}")
        self.status = status


class Config:
    """What the simulated machine looks like and how launches run (per test)."""

    def __init__(self) -> None:
        self.compute_capability = [90, 90]
        self.multiprocessors = 132
        self.orders: list[tuple[str, int]] = [("forward", 0), ("warps", 0)]
        self.fail_launches: list[tuple[str, int]] = []  # (kernel name, status), injected
        self.launches: list[dict[str, Any]] = []
        self.get_function_calls = 0
        self.current = 0


config = Config()
_allocations: weakref.WeakSet[_Allocation] = weakref.WeakSet()


class _Allocation:
    def __init__(self, nbytes: int, device: int) -> None:
        self.raw = np.full(nbytes + 2 * GUARD + ALIGN, CANARY, dtype=np.uint8)
        addr = self.raw.ctypes.data
        self.start = (-(addr + GUARD)) % ALIGN + GUARD  # data begins 256-aligned
        self.nbytes = nbytes
        self.device = device
        self.ptr = addr + self.start
        # Fresh device memory is not zero: fill with a NaN pattern.
        self.raw[self.start : self.start + nbytes] = 0xFF
        _allocations.add(self)

    def check(self) -> str | None:
        head = self.raw[: self.start]
        tail = self.raw[self.start + self.nbytes :]
        if (head != CANARY).any() or (tail != CANARY).any():
            bad_head = np.flatnonzero(head != CANARY)
            bad_tail = np.flatnonzero(tail != CANARY)
            where = []
            if bad_head.size:
                where.append(f"{self.start - bad_head[0]} bytes before the start")
            if bad_tail.size:
                where.append(f"{bad_tail[-1] + 1} bytes past the end")
            where_text = ", ".join(where)
            return f"out-of-bounds write into an allocation of {self.nbytes} bytes ({where_text})"
        return None

    def repair(self) -> None:
        self.raw[: self.start] = CANARY
        self.raw[self.start + self.nbytes :] = CANARY

    def data(self) -> np.ndarray:
        return self.raw[self.start : self.start + self.nbytes]


class _Flags:
    def __init__(self, a: ndarray) -> None:
        self.c_contiguous = a._host().flags.c_contiguous
        self.f_contiguous = a._host().flags.f_contiguous
        self.writeable = True


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = config.current if device is None else int(device)
        if not 0 <= self.id < len(config.compute_capability):
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE, f"no device {self.id}")
        self._previous: list[int] = []

    @property
    def compute_capability(self) -> str:
        return str(config.compute_capability[self.id])

    def __enter__(self) -> Device:
        self._previous.append(config.current)
        config.current = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        config.current = self._previous.pop()

    def use(self) -> None:
        config.current = self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"


class ndarray:
    """Just enough of cupy.ndarray: a view (shape, dtype, strides) of an allocation."""

    def __init__(
        self,
        shape: Any,
        dtype: Any = float,
        *,
        _alloc: _Allocation | None = None,
        _offset: int = 0,
        _strides: tuple[int, ...] | None = None,
    ) -> None:
        self.shape = tuple(
            int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,))
        )
        self.dtype = np.dtype(dtype)
        size = int(np.prod(self.shape, dtype=np.int64))
        self._alloc = (
            _alloc
            if _alloc is not None
            else _Allocation(size * self.dtype.itemsize, config.current)
        )
        self._offset = _offset
        self.strides = (
            _strides
            if _strides is not None
            else np.empty(self.shape, self.dtype).strides
            if size
            else (0,) * len(self.shape)
        )

    # -- host views
    def _host(self) -> np.ndarray:
        return np.ndarray(
            self.shape,
            self.dtype,
            buffer=self._alloc.data(),
            offset=self._offset,
            strides=self.strides,
        )

    def _wrap(self, host: np.ndarray) -> ndarray:
        """A view of this allocation if ``host`` is one, else a copy on the current device."""
        base = self._alloc.data()
        addr = host.__array_interface__["data"][0]
        start = base.__array_interface__["data"][0]
        if host.size and start <= addr < start + base.size and np.shares_memory(host, base):
            return ndarray(
                host.shape,
                host.dtype,
                _alloc=self._alloc,
                _offset=addr - start,
                _strides=host.strides,
            )
        return asarray(host)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def device(self) -> Device:
        return Device(self._alloc.device)

    @property
    def data(self) -> _Pointer:
        return _Pointer(self._alloc.ptr + self._offset)

    @property
    def flags(self) -> _Flags:
        return _Flags(self)

    @property
    def T(self) -> ndarray:
        return self._wrap(self._host().T)

    def get(self) -> np.ndarray:
        return self._host().copy()

    def copy(self) -> ndarray:
        return asarray(self._host())

    def astype(self, dtype: Any, copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return asarray(self._host().astype(dtype))  # on the current device, as CuPy does

    def view(self, dtype: Any) -> ndarray:
        return self._wrap(self._host().view(dtype))

    def reshape(self, *shape: Any) -> ndarray:
        return self._wrap(self._host().reshape(*shape))

    def ravel(self) -> ndarray:
        return self._wrap(self._host().ravel())

    def fill(self, value: Any) -> None:
        self._host().fill(value)

    def __getitem__(self, key: Any) -> ndarray:
        return self._wrap(self._host()[_host_key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._host()[_host_key(key)] = value._host() if isinstance(value, ndarray) else value

    def __len__(self) -> int:
        return self.shape[0]

    def __float__(self) -> float:
        return float(self._host())

    def __int__(self) -> int:
        return int(self._host())

    def __bool__(self) -> bool:
        return bool(self._host())

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed (use .get())")

    def __repr__(self) -> str:
        return f"sim-cupy array({self._host()!r}, device={self._alloc.device})"


def _host_key(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(k._host() if isinstance(k, ndarray) else k for k in key)
    return key._host() if isinstance(key, ndarray) else key


def asarray(a: Any, dtype: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    out = ndarray(host.shape, host.dtype)
    out._host()[...] = host
    return out


def ascontiguousarray(a: ndarray, dtype: Any = None) -> ndarray:
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return asarray(np.ascontiguousarray(a._host(), dtype=dtype))


def empty(shape: Any, dtype: Any = float) -> ndarray:
    return ndarray(shape, dtype)


def empty_like(a: ndarray, dtype: Any = None) -> ndarray:
    return ndarray(a.shape, a.dtype if dtype is None else dtype)


def zeros(shape: Any, dtype: Any = float) -> ndarray:
    out = ndarray(shape, dtype)
    out.fill(0)
    return out


def zeros_like(a: ndarray, dtype: Any = None) -> ndarray:
    return zeros(a.shape, a.dtype if dtype is None else dtype)


def full(shape: Any, value: Any, dtype: Any = None) -> ndarray:
    return asarray(np.full(shape, value, dtype=dtype))


# --- kernels -----------------------------------------------------------------------------


class RawModule:
    def __init__(
        self, code: str, options: tuple[str, ...] = (), name_expressions: Any = None, **kwargs: Any
    ) -> None:
        if kwargs.get("backend", "nvrtc") != "nvrtc":
            raise ValueError("the simulator compiles like NVRTC only")
        self.code = code
        self.options = tuple(options)
        self._lib: build.Library | None = None

    def get_function(self, name: str) -> RawKernel:
        config.get_function_calls += 1
        if self._lib is None:
            self._lib = build.build(self.code, self.options, name="module.cu")
        if name not in self._lib.kernels:
            raise CUDADriverError(500, f"named symbol not found: {name}")
        return RawKernel(self._lib, self._lib.kernels[name], config.current, self.options)


def _pack(arg: Any, size: int, kind: int, i: int, name: str) -> Any:
    where = f"{name}: argument {i}"
    if isinstance(arg, ndarray):
        if kind != 0:
            raise SimError(f"{where} is an array but the parameter is not a pointer")
        if arg._alloc.device != config.current:
            raise SimError(
                f"{where} lives on device {arg._alloc.device} but the launch is on device "
                f"{config.current} (an illegal address on a GPU)"
            )
        return ctypes.c_void_p(arg.data.ptr)
    if kind == 0:
        raise SimError(f"{where}: the parameter is a pointer, got {type(arg).__name__}")
    if isinstance(arg, bool):
        value = np.bool_(arg)
    elif isinstance(arg, int):
        value = np.int64(arg)  # CuPy passes Python ints as 64-bit integers
    elif isinstance(arg, float):
        value = np.float64(arg)
    elif isinstance(arg, np.generic):
        value = arg
    else:
        raise SimError(f"{where}: cannot pass {type(arg).__name__} to a kernel")
    if value.dtype.itemsize != size:
        raise SimError(
            f"{where} is {value.dtype} ({value.dtype.itemsize} bytes) but the kernel's parameter "
            f"has {size} bytes: a silent corruption on a GPU"
        )
    value_kind = 3 if value.dtype.kind == "f" else 1 if value.dtype.kind == "i" else 2
    if (value_kind == 3) != (kind == 3):
        raise SimError(f"{where} is {value.dtype} but the parameter is not of that kind")
    return (ctypes.c_char * size).from_buffer_copy(value.tobytes())


class RawKernel:
    def __init__(
        self, lib: build.Library, kernel: build.Kernel, device: int, options: tuple[str, ...] = ()
    ) -> None:
        self.options = options
        self.lib = lib
        self.kernel = kernel
        self.device = device
        self.max_dynamic_shared_size_bytes = 0

    def __call__(
        self, grid: Any, block: Any, args: Any, *, shared_mem: int = 0, stream: Any = None
    ) -> None:
        k = self.kernel
        if config.current != self.device:
            raise CUDADriverError(CUDA_ERROR_INVALID_HANDLE, "kernel loaded on another device")
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        threads = b[0] * b[1] * b[2]
        if min(g) < 1 or min(b) < 1 or g[0] > 2**31 - 1 or max(g[1:]) > 65535:
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE, f"grid {g}")
        if threads > 1024 or b[2] > 64:
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE, f"block {b}")
        if threads > k.max_threads:
            raise CUDADriverError(
                CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
                f"{threads} threads exceed __launch_bounds__({k.max_threads}) of {k.name}",
            )
        if shared_mem > 48 * 1024 and shared_mem > self.max_dynamic_shared_size_bytes:
            raise CUDADriverError(
                CUDA_ERROR_INVALID_VALUE,
                "dynamic shared memory above 48 KB needs max_dynamic_shared_size_bytes",
            )
        if shared_mem > 227 * 1024:
            raise CUDADriverError(CUDA_ERROR_INVALID_VALUE, "dynamic shared memory above 227 KB")
        c = k.cluster
        if c != (1, 1, 1):
            if config.compute_capability[config.current] < 90:
                raise CUDADriverError(CUDA_ERROR_NOT_SUPPORTED, "clusters need sm_90")
            if c[0] * c[1] * c[2] > 8 or any(gi % ci for gi, ci in zip(g, c, strict=True)):
                raise CUDADriverError(CUDA_ERROR_INVALID_CLUSTER_SIZE, f"cluster {c}, grid {g}")
        for name, status in list(config.fail_launches):
            if name in (k.name, "*"):
                config.fail_launches.remove((name, status))
                raise CUDADriverError(status, f"injected failure of {k.name}")
        if len(args) != len(k.sizes):
            raise SimError(f"{k.name} takes {len(k.sizes)} arguments, got {len(args)}")
        packed = [
            _pack(a, s, kind, i, k.name)
            for i, (a, s, kind) in enumerate(zip(args, k.sizes, k.kinds, strict=True))
        ]
        buffers = {id(a._alloc): a._alloc for a in args if isinstance(a, ndarray)}
        before = {key: al.data().copy() for key, al in buffers.items()}
        results = []
        for order, seed in config.orders:
            for key, al in buffers.items():
                al.data()[...] = before[key]
            err = self.lib.launch(
                k, g, b, packed, shared_mem=shared_mem, order=ORDERS[order], seed=seed
            )
            if err:
                raise SimError(f"{k.name} grid={g} block={b} ({order} order): {err}")
            for al in list(_allocations):
                bad = al.check()
                if bad:
                    al.repair()  # reported once, not again by every later launch
                    raise SimError(f"{k.name} grid={g} block={b} ({order} order): {bad}")
            results.append({key: al.data().copy() for key, al in buffers.items()})
        for other, (order, _) in zip(results[1:], config.orders[1:], strict=True):
            for key in buffers:
                if not np.array_equal(results[0][key], other[key]):
                    index = [
                        i
                        for i, a in enumerate(args)
                        if isinstance(a, ndarray) and id(a._alloc) == key
                    ]
                    first = int(np.flatnonzero(results[0][key] != other[key])[0])
                    raise SimError(
                        f"{k.name} grid={g} block={b}: a race: argument(s) {index} differ between "
                        f"the {config.orders[0][0]} and {order} orders (first at byte {first})"
                    )
        config.launches.append(
            {
                "kernel": k.name,
                "grid": g,
                "block": b,
                "cluster": c,
                "options": " ".join(self.options),
            }
        )


# --- the module objects --------------------------------------------------------------------


class Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.ptr = 0

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _device_properties(device: int) -> dict[str, Any]:
    return {
        "multiProcessorCount": config.multiprocessors,
        "maxThreadsPerBlock": 1024,
        "sharedMemPerBlock": 48 * 1024,
        "major": config.compute_capability[device] // 10,
        "minor": config.compute_capability[device] % 10,
    }


def _make_modules() -> tuple[types.ModuleType, types.ModuleType]:
    cp = types.ModuleType("cupy")
    cp.__dict__.update(
        ndarray=ndarray,
        asarray=asarray,
        ascontiguousarray=ascontiguousarray,
        empty=empty,
        empty_like=empty_like,
        zeros=zeros,
        zeros_like=zeros_like,
        full=full,
        RawModule=RawModule,
        RawKernel=RawKernel,
        __version__="13.0.0-sim",
        int8=np.int8,
        int16=np.int16,
        int32=np.int32,
        int64=np.int64,
        uint8=np.uint8,
        uint16=np.uint16,
        uint32=np.uint32,
        uint64=np.uint64,
        float16=np.float16,
        float32=np.float32,
        float64=np.float64,
        bool_=np.bool_,
        dtype=np.dtype,
        nan=np.nan,
    )
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.SimpleNamespace(
        getDeviceProperties=_device_properties,
        getDeviceCount=lambda: len(config.compute_capability),
        getDevice=lambda: config.current,
        memGetInfo=lambda: (1 << 30, 1 << 30),
    )
    driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)
    cuda.__dict__.update(
        Device=Device,
        runtime=runtime,
        driver=driver,
        Stream=Stream,
        get_current_stream=lambda: Stream(),
    )
    cp.cuda = cuda

    # The array-API namespace that array_api_compat would give for CuPy arrays: NumPy's,
    # with arrays moved to the host and back (enough for the argument validators).
    ns = types.ModuleType("array_api_compat.cupy")

    def wrap(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            dev = next((a._alloc.device for a in args if isinstance(a, ndarray)), config.current)
            host_args = [a._host() if isinstance(a, ndarray) else a for a in args]
            host_kw = {k: v._host() if isinstance(v, ndarray) else v for k, v in kwargs.items()}
            out = fn(*host_args, **host_kw)
            if isinstance(out, np.ndarray):
                with Device(dev):
                    return asarray(out)
            return out

        return call

    def ns_getattr(name: str) -> Any:
        value = getattr(np_compat, name)
        return wrap(value) if callable(value) and not isinstance(value, type) else value

    ns.__getattr__ = ns_getattr  # type: ignore[method-assign]
    return cp, ns


_MODULES = _make_modules()


@contextlib.contextmanager
def installed(monkeypatch: Any) -> Iterator[types.ModuleType]:
    """Install the stand-in as ``cupy`` (and its array-API namespace) inside the block,
    with a fresh :data:`config`, and point ``gradcore.backends.cupy`` at it."""
    global config, _allocations
    config = Config()
    _allocations = weakref.WeakSet()
    cp, ns = _MODULES
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "array_api_compat.cupy", ns)
    import array_api_compat

    monkeypatch.setattr(array_api_compat, "cupy", ns, raising=False)
    from gradcore.backends import cupy as gcp

    monkeypatch.setattr(gcp, "cupy", cp)
    monkeypatch.setattr(gcp, "_modules", {})
    monkeypatch.setattr(gcp, "_no_clusters", set())
    for name in ("_kernels",):
        if hasattr(gcp, name):
            monkeypatch.setattr(gcp, name, {})
    gcp._compute_capability.cache_clear()
    gcp._multiprocessors.cache_clear()
    try:
        yield cp
    finally:
        gcp._compute_capability.cache_clear()
        gcp._multiprocessors.cache_clear()
