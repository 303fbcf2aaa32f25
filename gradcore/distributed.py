r"""Data-parallel training over many processes: a communicator for :func:`gradcore.train.fit`.

gradcore scales out the way the systems that train large models do: one process per
node or GPU runs the same kernels on its own slice of every batch (SPMD), and a
collective sums the gradients, with no scheduler in the loop. Launch the same script
with ``mpiexec -n 4 python train.py`` (``pip install "gradcore[mpi]"`` brings mpi4py and
an MPI whose ``mpiexec`` is on the path), get a communicator with :func:`init` and pass
it as ``fit(..., comm=comm)``::

    comm = gradcore.distributed.init()      # the MPI world, or a size-1 communicator
    history = fit(model, X, y, loss="cross_entropy", optimizer="adam", epochs=10,
                  batch_size=256, comm=comm)
    if comm.rank == 0:
        save("model.npz", model, history.optimizer_state)

The same script runs unchanged without ``mpiexec`` (``comm.size == 1``). ``mpiexec -n 4
gradcore train ...`` does the same from the command line.

The update
----------
Every rank draws the same permutation (same seed) and cuts the same global batches
:math:`B`; rank :math:`r` of :math:`p` takes the contiguous rows :math:`B_r` (sizes
differ by at most one; a rank may get none). The mean loss of the global batch is

.. math::

    L = \frac{1}{D} \sum_{r=1}^{p} \sum_{i \in B_r} \ell_i, \qquad
    D = \sum_{r=1}^{p} D_r, \qquad
    \nabla L = \frac{1}{D} \sum_{r=1}^{p} \nabla \Big( \sum_{i \in B_r} \ell_i \Big),

where :math:`D_r` is rank :math:`r`'s share of the mean's divisor: the number of its
non-ignored rows, or the sum of their class weights :math:`\sum_{i} w_{y_i}`
(cross-entropy), or its number of elements (MSE). A rank cannot divide by its own
:math:`D_r`: it backpropagates the gradient of its *sum* loss, and one all-reduce sums
the parameter gradients together with the sum loss, :math:`D_r` and the correct
predictions; every rank then divides by the same :math:`D` and applies the same
update, the one a single process makes on :math:`B`.

How arrays travel
-----------------
- NumPy arrays go through MPI buffers directly (no pickling), packed into one flat
  buffer per call, the way PyTorch's DDP buckets its gradients: one all-reduce of the
  whole model costs one latency, not one per parameter.
- CuPy arrays are packed into one flat device buffer and summed with NCCL
  (``cupy.cuda.nccl``; the NCCL unique id is sent from rank 0 over MPI, and the NCCL
  communicator is built on the current device on first use). Set the device of each
  rank first, e.g. ``cupy.cuda.Device(comm.local_rank % n_gpus).use()``. With a
  CUDA-aware MPI, ``GRADCORE_CUDA_AWARE_MPI=1`` hands the device buffer to MPI instead.
- Other libraries (PyTorch, JAX, Dask, array-api-strict) go through a host copy. Writable
  NumPy, CuPy and PyTorch arrays are updated in place; the others are immutable, so the
  methods return the results: always use the returned list.

Failures
--------
A rank that fails while the others wait in a collective would leave them waiting
forever. Under ``mpiexec`` with more than one rank, :func:`init` installs an exception
hook, and :func:`~gradcore.train.fit` with ``comm=`` catches what it raises: an
exception on one rank prints a message naming the rank and calls ``MPI_Abort``, which
ends every rank of the job with a non-zero exit status within seconds. Errors that every
rank raises at the same step because they come from reduced values (the loss becoming
NaN: ``NonFiniteLossError``) are raised normally.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["Communicator", "init"]

#: Environment variables that process managers set for each rank they start
#: (MPICH/Hydra and Intel MPI, PMIx launchers, Open MPI, MVAPICH).
_LAUNCHER_VARIABLES = (
    "PMI_SIZE",
    "PMI_RANK",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
)

_world: Communicator | None = None


def _launched_by_mpi() -> bool:
    forced = os.environ.get("GRADCORE_MPI", "").strip().lower()
    if forced in ("0", "no", "false", "off"):
        return False
    if forced in ("1", "yes", "true", "on"):
        return True
    return any(v in os.environ for v in _LAUNCHER_VARIABLES)


def init() -> Communicator:
    r"""The communicator of this process: the MPI world under ``mpiexec``, else size 1.

    The MPI world is used when a process manager started this process (``mpiexec``,
    ``srun`` with PMI) or when ``GRADCORE_MPI=1``; ``GRADCORE_MPI=0`` forces a single
    process. Only then is :mod:`mpi4py` imported. Calling it again returns the same
    communicator.

    With more than one rank it also

    - installs a :data:`sys.excepthook` that aborts the whole job (``MPI_Abort``) when an
      exception goes uncaught on any rank, after printing it with the rank's number;
    - divides this node's cores among the ranks running on it: for the CPU fast paths
      (:func:`gradcore.set_num_threads`) unless ``GRADCORE_NUM_THREADS`` is set, and for
      BLAS (through threadpoolctl, when installed) unless ``OMP_NUM_THREADS``,
      ``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set.

    Returns
    -------
    Communicator

    Raises
    ------
    ImportError
        Under ``mpiexec`` without mpi4py installed (``pip install "gradcore[mpi]"``).
    """
    global _world
    if _world is not None:
        return _world
    if not _launched_by_mpi():
        _world = Communicator()
        return _world
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError(
            "this process was started by an MPI launcher, but mpi4py is not installed: "
            'pip install "gradcore[mpi]" (or set GRADCORE_MPI=0 to run alone)'
        ) from None
    comm = Communicator(MPI.COMM_WORLD)
    if comm.size > 1:
        _install_excepthook(comm)
        _share_cores(comm)
    _world = comm
    return comm


class Communicator:
    r"""What data-parallel training needs from a collective library, and no more.

    Get one from :func:`init`. A communicator of size 1 (no MPI) makes every method a
    no-op that returns its input, so code written for many ranks runs alone unchanged.

    Attributes
    ----------
    rank : int
        This process's number, from 0.
    size : int
        The number of processes.
    local_rank : int
        This process's number among those on the same node (to choose a GPU).
    """

    def __init__(self, mpi_comm: Any = None) -> None:
        self._comm = mpi_comm
        if mpi_comm is None:
            self.rank, self.size, self.local_rank, self._local_size = 0, 1, 0, 1
        else:
            self.rank = int(mpi_comm.Get_rank())
            self.size = int(mpi_comm.Get_size())
            node = mpi_comm.Split_type(_mpi().COMM_TYPE_SHARED, key=self.rank)
            self.local_rank, self._local_size = int(node.Get_rank()), int(node.Get_size())
            node.Free()
        self._host_buffers: dict[np.dtype[Any], np.ndarray] = {}
        self._device_buffers: dict[tuple[int, str], Any] = {}
        self._nccl: dict[int, Any] = {}

    def __repr__(self) -> str:
        kind = "MPI" if self._comm is not None else "single process"
        return f"Communicator(rank={self.rank}, size={self.size}, {kind})"

    # --- collectives --------------------------------------------------------------------

    def allreduce_(self, arrays: Sequence[Any]) -> list[Any]:
        r"""Sum each array over all ranks, in place where the library allows it.

        The arrays are packed into one flat buffer (of their common dtype), summed by
        one collective call and unpacked, so the cost is one latency however many
        arrays there are.

        Parameters
        ----------
        arrays : sequence of arrays
            Same shapes and dtypes, in the same order, on every rank; real numbers.

        Returns
        -------
        list of arrays
            The sums: the same array objects for writable NumPy, CuPy and PyTorch
            arrays, new arrays for immutable ones (JAX, Dask).
        """
        return self._collective(arrays, "sum", 0)

    def broadcast_(self, arrays: Sequence[Any], root: int = 0) -> list[Any]:
        r"""Overwrite each array with rank ``root``'s (one flat buffer, as :meth:`allreduce_`).

        Returns
        -------
        list of arrays
            As for :meth:`allreduce_`.
        """
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.size:
            raise ValueError(f"root must be a rank in [0, {self.size}), got {root!r}")
        return self._collective(arrays, "bcast", root)

    def barrier(self) -> None:
        """Wait until every rank has called it."""
        if self._comm is not None and self.size > 1:
            self._comm.Barrier()

    # --- internals used by fit and the command line ---------------------------------------

    def _allgather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small Python objects only, pickled: set-up checks)."""
        if self._comm is None or self.size == 1:
            return [obj]
        return list(self._comm.allgather(obj))

    def _abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` on stderr and end every rank of the job."""
        with contextlib.suppress(Exception):  # a closed stdout must not hide the message
            sys.stdout.flush()
        sys.stderr.write(message.rstrip("\n") + "\n")
        sys.stderr.flush()
        if self._comm is not None and self.size > 1:
            self._comm.Abort(code)
        raise SystemExit(code)  # pragma: no cover - Abort does not return

    def _collective(self, arrays: Sequence[Any], op: str, root: int) -> list[Any]:
        arrays = list(arrays)
        if self._comm is None or self.size == 1 or not arrays:
            return arrays
        for k, a in enumerate(arrays):
            if not array_api_compat.is_array_api_obj(a):
                raise TypeError(f"arrays[{k}] must be an array, got {type(a).__name__}")
        if all(array_api_compat.is_cupy_array(a) for a in arrays):
            return self._device_collective(arrays, op, root)
        return self._host_collective(arrays, op, root)

    def _host_collective(self, arrays: list[Any], op: str, root: int) -> list[Any]:
        from ._namespace import to_numpy

        host = [np.asarray(to_numpy(a)) for a in arrays]
        dtype = _buffer_dtype([h.dtype for h in host])
        sizes = [h.size for h in host]
        total = sum(sizes)
        buf = self._host_buffers.get(dtype)
        if buf is None or buf.size < total:
            buf = np.empty(max(total, 1), dtype=dtype)
            self._host_buffers[dtype] = buf
        flat = buf[:total]
        offset = 0
        for h, n in zip(host, sizes, strict=True):
            flat[offset : offset + n] = h.reshape(-1)
            offset += n
        if op == "sum":
            self._comm.Allreduce(_mpi().IN_PLACE, flat, op=_mpi().SUM)
        else:
            self._comm.Bcast(flat, root=root)
        out = []
        offset = 0
        for a, h, n in zip(arrays, host, sizes, strict=True):
            out.append(_write_back(a, flat[offset : offset + n].reshape(h.shape)))
            offset += n
        return out

    def _device_collective(self, arrays: list[Any], op: str, root: int) -> list[Any]:
        import cupy

        dtype = _buffer_dtype([np.dtype(a.dtype) for a in arrays])
        sizes = [int(a.size) for a in arrays]
        total = sum(sizes)
        device = cupy.cuda.Device().id
        key = (device, dtype.str)
        buf = self._device_buffers.get(key)
        if buf is None or buf.size < total:
            buf = cupy.empty(max(total, 1), dtype=dtype)
            self._device_buffers[key] = buf
        flat = buf[:total]
        offset = 0
        for a, n in zip(arrays, sizes, strict=True):
            flat[offset : offset + n] = a.reshape(-1)
            offset += n
        stream = cupy.cuda.get_current_stream()
        if os.environ.get("GRADCORE_CUDA_AWARE_MPI", "") == "1":
            # mpi4py reads __cuda_array_interface__; MPI must see finished data.
            stream.synchronize()
            if op == "sum":
                self._comm.Allreduce(_mpi().IN_PLACE, flat, op=_mpi().SUM)
            else:
                self._comm.Bcast(flat, root=root)
        else:
            from cupy.cuda import nccl

            comm = self._nccl_comm(device)
            nccl_type = _nccl_dtype(nccl, dtype)
            if op == "sum":
                comm.allReduce(
                    flat.data.ptr, flat.data.ptr, total, nccl_type, nccl.NCCL_SUM, stream.ptr
                )
            else:
                comm.bcast(flat.data.ptr, total, nccl_type, root, stream.ptr)
        out = []
        offset = 0
        for a, n in zip(arrays, sizes, strict=True):
            a[...] = flat[offset : offset + n].reshape(a.shape)  # CuPy arrays are writable
            out.append(a)
            offset += n
        return out

    def _nccl_comm(self, device: int) -> Any:
        """The NCCL communicator of ``device`` (made on first use, collectively)."""
        comm = self._nccl.get(device)
        if comm is None:
            from cupy.cuda import nccl

            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self._comm.bcast(uid, root=0)
            comm = nccl.NcclCommunicator(self.size, uid, self.rank)
            self._nccl[device] = comm
        return comm


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI


def _buffer_dtype(dtypes: Sequence[np.dtype[Any]]) -> np.dtype[Any]:
    for d in dtypes:
        if d.kind not in "iuf":
            raise TypeError(f"only real numeric arrays can be reduced or broadcast, got {d}")
    return np.dtype(np.result_type(*dtypes))


def _nccl_dtype(nccl: Any, dtype: np.dtype[Any]) -> int:
    table = {
        "float16": "NCCL_FLOAT16",
        "float32": "NCCL_FLOAT32",
        "float64": "NCCL_FLOAT64",
        "int8": "NCCL_INT8",
        "uint8": "NCCL_UINT8",
        "int32": "NCCL_INT32",
        "uint32": "NCCL_UINT32",
        "int64": "NCCL_INT64",
        "uint64": "NCCL_UINT64",
    }
    try:
        return int(getattr(nccl, table[dtype.name]))
    except (KeyError, AttributeError):
        raise TypeError(f"NCCL cannot reduce arrays of dtype {dtype}") from None


def _write_back(a: Any, part: np.ndarray) -> Any:
    """Put the collective's result ``part`` into ``a``, or a new array like it."""
    if isinstance(a, np.ndarray):
        if a.flags.writeable:
            a[...] = part
            return a
        return part.astype(a.dtype, copy=True)
    if array_api_compat.is_torch_array(a):
        import torch

        with torch.no_grad():
            a.copy_(torch.from_numpy(np.array(part, copy=True)))
        return a
    from ._namespace import Backend, backend_name, get_namespace

    xp = get_namespace(a)
    target = Backend(backend_name(xp), xp, array_api_compat.device(a))
    return target.asarray(np.array(part, copy=True), dtype=a.dtype)


def _install_excepthook(comm: Communicator) -> None:
    previous = sys.excepthook

    def abort_job(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        try:
            previous(kind, value, tb)
        finally:
            comm._abort(
                f"gradcore: uncaught {kind.__name__} on rank {comm.rank} of {comm.size}; "
                "aborting every rank of the job"
            )

    sys.excepthook = abort_job


_BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_blas_limits: Any = None


def _share_cores(comm: Communicator) -> None:
    """Give each rank its share of the node's cores, unless the user chose already.

    Ranks that each start one thread per core would run ``ranks x cores`` threads that
    wait for one another (the fast paths' pool, BLAS) on ``cores`` cores.
    """
    global _blas_limits
    from . import _dispatch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, comm._local_size))
    if not os.environ.get("GRADCORE_NUM_THREADS") and _dispatch._num_threads is None:
        _dispatch.set_num_threads(share)
    if not any(os.environ.get(v) for v in _BLAS_VARIABLES):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # then BLAS keeps its own default; OMP_NUM_THREADS sets it
            return
        _blas_limits = threadpool_limits(limits=share, user_api="blas")


# --- data-parallel training: what fit(..., comm=) runs --------------------------------------


def _shard(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of the global rows ``[start, stop)``: contiguous, balanced."""
    n = stop - start
    return start + rank * n // size, start + (rank + 1) * n // size


class _DataParallel:
    r"""The distributed parts of one :func:`~gradcore.train.fit` call.

    Every rank draws the same permutation (same seed), cuts the same global batches and
    takes its contiguous slice of each. A step computes the gradient of the slice's
    *sum* loss and the slice's share of the mean's divisor (the count of non-ignored
    rows, or the sum of their class weights, for cross-entropy; the number of
    elements for MSE), sums gradients, loss, divisor and correct predictions in one
    all-reduce, and divides by the global divisor: the update of the mean loss over the
    global batch, the same on every rank.
    """

    def __init__(
        self,
        comm: Communicator,
        *,
        loss: Any,
        classification: bool,
        loss_kwargs: dict[str, Any],
        label_dtype: Any,
        checks: dict[str, Any],
    ) -> None:
        self.comm = comm
        self.loss = loss
        self.classification = classification
        self.loss_kwargs = loss_kwargs
        self.label_dtype = label_dtype
        self._agree(checks)

    def _agree(self, checks: dict[str, Any]) -> None:
        # A rank with other data or options would silently train another model (or
        # wait forever in a collective): compare, and fail on every rank alike.
        every = self.comm._allgather(checks)
        for name, value in every[0].items():
            for rank, theirs in enumerate(every):
                if theirs.get(name) != value:
                    raise ValueError(
                        f"fit(comm=...): rank {rank} has {name} = {theirs.get(name)!r} but "
                        f"rank 0 has {value!r}; every rank must pass the same data, model "
                        "and options"
                    )

    def rows(self, start: int, stop: int) -> tuple[int, int]:
        return _shard(start, stop, self.comm.rank, self.comm.size)

    def start(self, params: dict[str, Any], state: dict[str, Any], buffers: Sequence[str]) -> Any:
        """Give every rank rank 0's parameters and optimizer state (as DDP does)."""
        names = list(params)
        slots = [(buf, name) for buf in buffers for name in names]
        arrays = [params[k] for k in names] + [state[buf][name] for buf, name in slots]
        synced = self.comm.broadcast_(arrays, root=0)
        params = dict(zip(names, synced[: len(names)], strict=True))
        state = dict(state)
        for buf in buffers:
            state[buf] = dict(state[buf])
        for (buf, name), value in zip(slots, synced[len(names) :], strict=True):
            state[buf][name] = value
        step = self.comm._allgather(int(state["step"]))
        if len(set(step)) != 1:
            raise ValueError(f"fit(comm=...): the ranks' optimizer states are at steps {step}")
        return params, state

    def _sum_loss(self, out: Any, yb: Any, xp: Any, options: dict[str, Any]) -> Any:
        """(sum loss, its gradient, divisor) of this rank's rows."""
        dtype = out.dtype
        device = array_api_compat.device(out)
        if self.loss == "cross_entropy":
            ignore = int(self.loss_kwargs.get("ignore_index", -100))
            weight = self.loss_kwargs.get("weight")
            active = yb != ignore
            if weight is None:
                divisor = xp.sum(xp.astype(active, dtype))
            else:
                safe = xp.where(active, yb, xp.zeros_like(yb))
                w_y = xp.astype(xp.take(weight, safe, axis=0), dtype)
                divisor = xp.sum(xp.where(active, w_y, xp.zeros_like(w_y)))
            value, grad = self._loss_fn(out, yb, xp=xp, reduction="sum", **options)
        elif self.loss == "mse":
            divisor = xp.asarray(float(math.prod(out.shape)), dtype=dtype, device=device)
            value, grad = self._loss_fn(out, yb, xp=xp, reduction="sum", **options)
        else:
            # A callable loss is taken to be a mean over the batch's rows.
            rows = float(out.shape[0])
            value, grad = self._loss_fn(out, yb, xp=xp, **options)
            value, grad = value * rows, grad * rows
            divisor = xp.asarray(rows, dtype=dtype, device=device)
        return value, grad, divisor

    def step(
        self,
        model: Any,
        xb: Any,
        yb: Any,
        xp: Any,
        loss_fn: Callable[..., Any],
        options: dict[str, Any],
    ) -> tuple[Any, dict[str, Any], Any]:
        """One rank's share of a step: (global mean loss, global gradients, global hits)."""
        self._loss_fn = loss_fn
        params = model.state_dict()
        dtype = next(iter(params.values())).dtype
        device = array_api_compat.device(next(iter(params.values())))
        zero = xp.zeros((), dtype=dtype, device=device)
        if int(xb.shape[0]) == 0:
            # A global batch smaller than the number of ranks leaves some ranks idle:
            # they still take part in the sum, with nothing.
            grads = {k: xp.zeros_like(v) for k, v in params.items()}
            value = divisor = hits = zero
        else:
            out = model._forward(xb, True, xp)
            hits = zero
            if self.classification:
                # Before the loss, which may write its gradient over the logits.
                hits = xp.sum(xp.astype(xp.argmax(out, axis=-1) == yb, dtype))
            value, grad, divisor = self._sum_loss(out, yb, xp, options)
            model._backward(grad, xp, False)
            grads = model._collect_grads()
        names = list(grads)
        extras = xp.stack([xp.astype(v, dtype) for v in (value, divisor, hits)])
        summed = self.comm.allreduce_([grads[k] for k in names] + [extras])
        extras = summed[-1]
        total, divisor, hits = extras[0], extras[1], extras[2]
        # All ignored (cross-entropy): a NaN loss and a zero gradient, as on one process.
        empty = divisor == 0
        safe = xp.where(empty, xp.ones_like(divisor), divisor)
        scale = 1.0 / safe
        reduced = {k: g * scale for k, g in zip(names, summed[:-1], strict=True)}
        value = xp.where(empty, xp.full_like(total, math.nan), total / safe)
        return value, reduced, xp.astype(xp.round(hits), self.label_dtype)

    def check_replicas(self, params: dict[str, Any], epoch: int) -> None:
        """Raise on every rank if the ranks' parameters are no longer bit for bit equal.

        They cannot drift apart unless the all-reduce gave ranks different sums (an MPI
        reduction that is not deterministic across ranks) or something changed one
        rank's model alone (a callback): a silent error worth a hash per epoch.
        """
        from ._namespace import to_numpy

        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(params):
            digest.update(np.ascontiguousarray(to_numpy(params[name])).tobytes())
        every = self.comm._allgather(digest.hexdigest())
        differ = [r for r, d in enumerate(every) if d != every[0]]
        if differ:
            raise RuntimeError(
                f"fit(comm=...): after epoch {epoch} the parameters of rank(s) "
                f"{', '.join(map(str, differ))} differ from rank 0's; the replicas diverged"
            )

    def evaluate(
        self,
        model: Any,
        X: Any,
        y: Any,
        xp: Any,
        loss_fn: Callable[..., Any],
        batch_size: int,
    ) -> dict[str, float | None]:
        """Mean loss and accuracy on ``X, y``: each rank evaluates its rows, then one sum.

        The loss is the sum of the rows' losses over the sum of their divisors, the mean
        one process computes over the whole set (with ``ignore_index`` and weights too).
        """
        from ._namespace import to_numpy

        self._loss_fn = loss_fn
        n = int(X.shape[0])
        lo, hi = self.rows(0, n)
        sums = np.zeros(3, dtype=np.float64)  # loss, divisor, correct predictions
        for i in range(lo, hi, batch_size):
            stop = min(i + batch_size, hi)
            yb = y[i:stop, ...]
            out = model._forward(X[i:stop, ...], False, xp)
            if self.classification:
                hits = xp.sum(xp.astype(xp.argmax(out, axis=-1) == yb, self.label_dtype))
                sums[2] += float(to_numpy(hits))
            value, _, divisor = self._sum_loss(out, yb, xp, {})
            sums[0] += float(to_numpy(value))
            sums[1] += float(to_numpy(divisor))
        sums = self.comm.allreduce_([sums])[0]
        loss = float(sums[0] / sums[1]) if sums[1] != 0 else math.nan
        return {"loss": loss, "accuracy": float(sums[2]) / n if self.classification else None}


def _fail_job(comm: Communicator, exc: BaseException, where: str) -> None:
    """End every rank of the job for ``exc``, raised on this rank in ``where``."""
    if comm.size == 1:
        return
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    first = str(exc).strip().splitlines()
    comm._abort(
        f"{text}gradcore: rank {comm.rank} of {comm.size} failed in {where} "
        f"({type(exc).__name__}{': ' + first[0] if first else ''}); aborting every rank of the job"
    )


def run_or_abort(comm: Communicator, func: Callable[..., Any], *args: Any) -> Any:
    """Call ``func(*args)``; if it raises on any rank of a multi-rank job, end the job.

    The message names the rank. For the command line, whose errors otherwise become an
    exit status that would leave the other ranks waiting.
    """
    if comm.size == 1:
        return func(*args)
    try:
        return func(*args)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        comm._abort(f"gradcore: rank {comm.rank} of {comm.size} exited with status {exc.code}")
    except BaseException as exc:
        first = str(exc).strip().splitlines()
        message = first[0] if first else type(exc).__name__
        if os.environ.get("GRADCORE_DEBUG"):
            traceback.print_exc()
        comm._abort(
            f"gradcore: error on rank {comm.rank} of {comm.size}: {message} "
            "(aborting every rank of the job)"
        )
    return None  # pragma: no cover
