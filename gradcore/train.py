r"""Minibatch training (:func:`fit`), evaluation and checkpoints.

:func:`fit` runs the loop every backprop lecture draws: for each minibatch, the model's
forward pass, the loss and its gradient with respect to the output (one fused kernel),
the model's backward pass (the layers' VJPs in reverse) and an optimizer update. The
same call trains on NumPy, CuPy, PyTorch or JAX: pass ``backend=`` or move the model
first with :meth:`gradcore.nn.Module.to`.

Checkpoints (:func:`save`, :func:`load`) are ``.npz`` files of NumPy arrays plus a JSON
description, so one saved on a GPU loads anywhere.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import array_api_compat
import numpy as np

from . import losses as _losses
from . import nn as _nn
from . import optim as _optim
from ._namespace import Backend, check_array_argument, get_namespace, to_numpy
from .data import check_dataset, check_seed, npz_headers

if TYPE_CHECKING:
    from .distributed import Communicator

__all__ = [
    "LOSSES",
    "Checkpoint",
    "History",
    "NonFiniteLossError",
    "checkpoint_path",
    "evaluate",
    "fit",
    "load",
    "save",
]

#: Loss names :func:`fit` accepts.
LOSSES = ("cross_entropy", "mse")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclass
class History:
    r"""What :func:`fit` measured, one entry per epoch (``step_loss``: per update).

    Attributes
    ----------
    epoch : list of int
        Epoch numbers, from 1.
    loss, accuracy : list of float
        Training loss (mean over the epoch's samples, as the model changed) and
        accuracy (classification only; ``None`` for regression).
    val_loss, val_accuracy : list of float or None
        On the ``validation`` set after each epoch (``None`` without one).
    step_loss : list of float
        The loss of every minibatch, in order.
    epoch_time : list of float
        Seconds per epoch, training only.
    samples_per_s : list of float
        Training throughput per epoch.
    optimizer_state : dict
        The optimizer's state after the last update (arrays of the training backend),
        for :func:`save` and to continue training.
    """

    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float | None] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    val_accuracy: list[float | None] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.epoch)

    def __repr__(self) -> str:
        # The per-step lists run to thousands of numbers: show where training ended.
        if not self.epoch:
            return "History(epochs=0)"
        parts = [f"epochs={len(self.epoch)}", f"loss={self.loss[-1]:.4g}"]
        for name in ("accuracy", "val_loss", "val_accuracy"):
            value = getattr(self, name)[-1]
            if value is not None:
                parts.append(f"{name}={value:.4g}")
        return f"History({', '.join(parts)})"

    def to_dict(self) -> dict[str, list[Any]]:
        """The measurements as JSON-serialisable lists (no optimizer state)."""
        return {
            "epoch": list(self.epoch),
            "loss": list(self.loss),
            "accuracy": list(self.accuracy),
            "val_loss": list(self.val_loss),
            "val_accuracy": list(self.val_accuracy),
            "step_loss": list(self.step_loss),
            "epoch_time": list(self.epoch_time),
            "samples_per_s": list(self.samples_per_s),
        }


# --- losses ------------------------------------------------------------------------------

LossFn = Callable[..., tuple[Any, Any]]


def _loss_fn(loss: str | LossFn) -> tuple[LossFn, bool]:
    """The loss kernel and whether it is a classification loss."""
    if callable(loss):
        return loss, False
    if loss == "cross_entropy":
        return _losses.softmax_cross_entropy, True
    if loss == "mse":
        return _losses.mse, False
    raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)} or a callable")


def _loss_kwargs(loss_kwargs: Mapping[str, Any] | None, b: Backend, dtype: str) -> dict[str, Any]:
    """Options for the loss kernel, with array values (``weight=``) moved to the backend."""
    if loss_kwargs is None:
        return {}
    if not isinstance(loss_kwargs, Mapping):
        raise TypeError(f"loss_kwargs must be a dict, got {type(loss_kwargs).__name__}")
    taken = sorted({"reduction", "out", "inplace", "xp"} & set(loss_kwargs))
    if taken:
        raise ValueError(
            f"loss_kwargs may not set {', '.join(taken)}: fit minimises the mean loss and "
            "manages the gradient's memory itself"
        )
    options = dict(loss_kwargs)
    for key, value in options.items():
        if isinstance(value, (np.ndarray, list, tuple)) or array_api_compat.is_array_api_obj(value):
            options[key] = b.asarray(np.asarray(to_numpy(value)), dtype=dtype)
    return options


def _labels_for_checks(y: Any, ignore_index: int | None) -> Any:
    """The labels with ``ignore_index`` entries replaced by class 0, for range checks."""
    if ignore_index is None:
        return y
    xp = get_namespace(y)
    return xp.where(y == ignore_index, xp.zeros_like(y), y)


def _prepare(
    X: Any,
    y: Any,
    *,
    classification: bool,
    model: _nn.Module,
    name: str,
    ignore_index: int | None = None,
) -> tuple[Any, Any]:
    """Validate ``X, y`` and move them to the model's backend with the right dtypes."""
    b = model.backend
    on_host = isinstance(X, (np.ndarray, list, tuple)) and isinstance(y, (np.ndarray, list, tuple))
    if on_host:
        X_np, y_np = check_dataset(X, y, name=name)
        if classification:
            if y_np.ndim != 1:
                raise ValueError(
                    f"{name}: cross_entropy needs 1-D integer class labels, "
                    f"got y of shape {y_np.shape}"
                )
            if y_np.dtype.kind == "f" and not np.all(y_np == np.round(y_np)):
                raise ValueError(
                    f"{name}: cross_entropy needs integer class labels, got fractions in y"
                )
            lowest = int(_labels_for_checks(y_np, ignore_index).min())
            if lowest < 0:
                raise ValueError(f"{name}: class labels must be >= 0, found {lowest}")
            y_np = y_np.astype(np.int64)
        else:
            y_np = y_np.astype(np.float64)
            if y_np.ndim == 1:
                y_np = y_np[:, None]
        return b.asarray(X_np, dtype=model.dtype), b.asarray(
            y_np, dtype=_label_dtype(b) if classification else model.dtype
        )
    # Arrays already on a device: check them there (one synchronisation).
    check_array_argument(X, f"{name}: X")
    check_array_argument(y, f"{name}: y")
    xp = get_namespace(X, y)
    if xp is not b.xp:
        X, y = b.asarray(X), b.asarray(y)
        xp = b.xp
    if X.ndim != 2 or int(X.shape[0]) != int(y.shape[0]):
        raise ValueError(
            f"{name}: X must be 2-D with one row per target; "
            f"got X {tuple(X.shape)}, y {tuple(y.shape)}"
        )
    if not bool(xp.all(xp.isfinite(X))):
        raise ValueError(f"{name}: X contains NaN or infinity")
    X = xp.astype(X, getattr(xp, model.dtype))
    if classification:
        _check_device_labels(xp, y, name)
        y = xp.astype(y, _label_dtype(b))
    else:
        if not bool(xp.all(xp.isfinite(y))):
            raise ValueError(f"{name}: y contains NaN or infinity")
        y = xp.astype(y, getattr(xp, model.dtype))
        if y.ndim == 1:
            y = xp.reshape(y, (-1, 1))
    return X, y


def _check_device_labels(xp: Any, y: Any, name: str) -> None:
    """The checks the NumPy path makes on class labels, made where the labels live.

    Casting to the index dtype would truncate 1.7 to 1 (and turn NaN into anything)
    without a word, so fractional and non-finite labels are refused first.
    """
    if y.ndim != 1:
        raise ValueError(
            f"{name}: cross_entropy needs 1-D integer class labels, got y of shape {tuple(y.shape)}"
        )
    if xp.isdtype(y.dtype, "real floating"):
        if not bool(xp.all(xp.isfinite(y))):
            raise ValueError(f"{name}: y contains NaN or infinity")
        if not bool(xp.all(y == xp.round(y))):
            raise ValueError(
                f"{name}: cross_entropy needs integer class labels, got fractions in y"
            )
    elif not xp.isdtype(y.dtype, ("integral", "bool")):
        raise ValueError(f"{name}: class labels must be integers, got y of dtype {y.dtype}")


def _label_dtype(b: Backend) -> Any:
    """The backend's default index dtype (int64, or int32 on JAX without 64-bit mode)."""
    try:
        return b.xp.__array_namespace_info__().default_dtypes(device=b.device)["indexing"]
    except (AttributeError, TypeError, KeyError):
        return b.xp.int64


def _positive_int(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return int(value)


def _check_outputs(
    model: _nn.Module,
    X: Any,
    y: Any,
    classification: bool,
    name: str,
    ignore_index: int | None = None,
) -> None:
    try:
        out = model.predict(X[:1, ...])
    except ValueError as exc:
        raise ValueError(
            f"{name}: X has {int(X.shape[1])} features per sample, which the model does not "
            f"take ({exc})"
        ) from None
    width = int(out.shape[-1])
    if classification:
        y = _labels_for_checks(y, ignore_index)
        yxp = get_namespace(y)
        bottom, top = int(to_numpy(yxp.min(y))), int(to_numpy(yxp.max(y)))
        if bottom < 0:
            raise ValueError(f"{name}: class labels must be >= 0, found {bottom}")
        if top >= width:
            raise ValueError(
                f"{name}: labels go up to {top} but the model has only {width} outputs"
            )
    elif tuple(int(s) for s in y.shape[1:]) != (width,):
        raise ValueError(
            f"{name}: targets have shape {tuple(y.shape[1:])} per sample but the model "
            f"outputs {width}"
        )


def _output_unsaved(model: _nn.Module) -> bool:
    """Whether no layer keeps the model's output for its backward pass."""
    return isinstance(_nn._last_layer(model), _nn.Linear)


def _last_layer_is_fused_head(model: _nn.Module) -> bool:
    """Whether the model ends in a :class:`~gradcore.nn.LinearCrossEntropy` head."""
    return isinstance(_nn._last_layer(model), _nn.LinearCrossEntropy)


def _check_fused_head_options(model: _nn.Module, loss_options: dict[str, Any], dp: bool) -> None:
    """Refuse what a fused head would silently leave out of the loss it trains on."""
    if loss_options:
        raise ValueError(
            f"loss_kwargs ({', '.join(sorted(loss_options))}) cannot be applied to a "
            "LinearCrossEntropy head: it computes its own loss (label_smoothing, z_loss and "
            "softcap are set when the head is built); use a Linear last layer for these options"
        )
    head: Any = _nn._last_layer(model)
    if dp and (head.label_smoothing or head.z_loss):
        raise ValueError(
            "data-parallel fit (comm=) with a LinearCrossEntropy head supports neither "
            "label_smoothing nor z_loss yet: the ranks would train on the plain loss"
        )


def _host_backend(b: Backend) -> bool:
    """Whether reading a loss value costs no device synchronisation worth avoiding."""
    if b.name in ("numpy", "array_api_strict", "dask"):
        return True
    if b.name == "torch":
        return str(getattr(b.device, "type", b.device)) == "cpu"
    if b.name == "jax":
        return str(getattr(b.device, "platform", "cpu")) == "cpu"
    return False


def _persist(b: Backend, tree: dict[str, Any]) -> dict[str, Any]:
    # Dask builds a graph per update; computing it keeps the graph from growing
    # with the number of steps.
    if b.name != "dask":
        return tree
    import dask

    keys = list(tree)
    values = dask.persist(*(tree[k] for k in keys))
    return dict(zip(keys, values, strict=True))


_JIT_LAYERS = (
    _nn.Linear,
    _nn.ReLU,
    _nn.LeakyReLU,
    _nn.Sigmoid,
    _nn.Tanh,
    _nn.GELU,
)


def _jittable(model: _nn.Module, loss: Any, opt: _optim.Optimizer | None) -> bool:
    """Whether every piece of a training step is gradcore's own (so traceable)."""
    if not isinstance(loss, str):
        return False
    if opt is not None and type(opt) not in (_optim.SGD, _optim.Adam, _optim.AdamW):
        return False
    stack = [model]
    while stack:
        m = stack.pop()
        if type(m) in (_nn.Sequential, _nn.MLP):
            stack.extend(m.layers)  # type: ignore[attr-defined]
        elif type(m) not in _JIT_LAYERS:
            return False
    return True


def _jax_step(
    model: _nn.Module,
    loss_fn: LossFn,
    loss_options: Mapping[str, Any],
    opt: _optim.Optimizer,
    classification: bool,
    label_dtype: Any,
) -> Callable[..., tuple[Any, Any, Any, Any]]:
    """One training step compiled with ``jax.jit``, used where the backend is JAX.

    Eager JAX compiles and dispatches every array operation on its own: a step of
    the spirals MLP is a few hundred of them, each compiled once per shape (seconds
    in the first epoch) and dispatched from Python at every step. Compiled as one
    program, the step runs the same operations on the same values (the optimizer's
    step-dependent numbers are still computed on the host and passed in).
    """
    import jax

    xp = model.backend.xp

    def step(params: Any, buffers: Any, scalars: Any, xb: Any, yb: Any, first: bool) -> Any:
        model._assign(params)
        out = model._forward(xb, True, xp)
        hits = (
            xp.sum(xp.astype(xp.argmax(out, axis=-1) == yb, label_dtype))
            if classification
            else None
        )
        value, grad = loss_fn(out, yb, xp=xp, **loss_options)
        model._backward(grad, xp, False)
        grads = model._collect_grads()
        new_params, new_buffers = opt._apply(params, grads, buffers, first, scalars)
        return new_params, new_buffers, value, hits, grads

    compiled = jax.jit(step, static_argnames=("first",))

    def run(params: Any, state: Any, xb: Any, yb: Any) -> tuple[Any, Any, Any, Any]:
        t = int(state["step"])
        buffers = {buf: state[buf] for buf in opt.buffers}
        try:
            new_params, new_buffers, value, hits, grads = compiled(
                params, buffers, opt._scalars(t, opt.lr_at(t)), xb, yb, first=t == 0
            )
        finally:
            model._assign(params)  # never leave tracers in the model
        model._assign(new_params)
        model._set_grads(grads)
        return new_params, {"step": t + 1, **new_buffers}, value, hits

    return run


# --- training ------------------------------------------------------------------------------


def evaluate(
    model: _nn.Module,
    X: Any,
    y: Any,
    *,
    loss: str | LossFn = "cross_entropy",
    batch_size: int = 1024,
) -> dict[str, float | None]:
    r"""Mean loss and accuracy (classification) of ``model`` on ``X, y``.

    Returns
    -------
    dict
        ``{"loss": float, "accuracy": float or None}``.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    loss_fn, classification = _loss_fn(loss)
    X, y = _prepare(X, y, classification=classification, model=model, name="evaluation data")
    return _evaluate(model, X, y, _batch_metrics(model, loss, loss_fn, classification), batch_size)


def _batch_metrics(
    model: _nn.Module, loss: Any, loss_fn: LossFn, classification: bool
) -> Callable[[Any, Any], tuple[Any, Any, Any]]:
    """``(xb, yb) -> (loss, correct predictions or None, the mean's divisor or None)``,
    compiled on JAX. The divisor (cross-entropy: the class weights of the non-ignored
    rows summed; None: the number of rows) lets batch means make the set's mean."""
    b = model.backend
    xp = b.xp
    label_dtype = _label_dtype(b)
    options = getattr(loss_fn, "keywords", None) or {}
    ignore_index = int(options.get("ignore_index", -100))
    weight = options.get("weight")

    def metrics(params: Any, xb: Any, yb: Any) -> tuple[Any, Any, Any]:
        model._assign(params)
        out = model._forward(xb, False, xp)
        value, _ = loss_fn(out, yb, xp=xp)
        hits = divisor = None
        if classification:
            hits = xp.sum(xp.astype(xp.argmax(out, axis=-1) == yb, label_dtype))
            active = yb != ignore_index
            if weight is None:
                divisor = xp.sum(xp.astype(active, out.dtype))
            else:
                w_y = xp.take(weight, xp.where(active, yb, xp.zeros_like(yb)), axis=0)
                w_y = xp.astype(w_y, out.dtype)
                divisor = xp.sum(xp.where(active, w_y, xp.zeros_like(w_y)))
        return value, hits, divisor

    if b.name != "jax" or not _jittable(model, loss, None):
        return lambda xb, yb: metrics(model.state_dict(), xb, yb)
    import jax

    compiled = jax.jit(metrics)

    def run(xb: Any, yb: Any) -> tuple[Any, Any, Any]:
        params = model.state_dict()
        try:
            return compiled(params, xb, yb)
        finally:
            model._assign(params)  # never leave tracers in the model

    return run


def _evaluate(
    model: _nn.Module,
    X: Any,
    y: Any,
    metrics: Callable[[Any, Any], tuple[Any, Any, Any]],
    batch_size: int,
) -> dict[str, float | None]:
    n = int(X.shape[0])
    total = 0.0
    divisor = 0.0
    correct = 0
    for i in range(0, n, batch_size):
        stop = min(i + batch_size, n)
        value, hits, share = metrics(X[i:stop, ...], y[i:stop, ...])
        # Each batch mean weighted by its own divisor: the mean over the whole set
        # (with ignored rows or class weights, batches' divisors differ).
        d = float(stop - i) if share is None else float(to_numpy(share))
        if d != 0.0:  # a batch with nothing counted (its mean is 0/0) adds nothing
            total += float(to_numpy(value)) * d
            divisor += d
        if hits is not None:
            correct += int(to_numpy(hits))
    loss = total / divisor if divisor != 0.0 else math.nan
    return {"loss": loss, "accuracy": correct / n if hits is not None else None}


def _one_rank_fails_all(func: Callable[..., History]) -> Callable[..., History]:
    """Under ``comm`` of several ranks, an exception from :func:`fit` ends the whole job.

    A rank that fails alone (bad data, a bug, an interrupt) would leave the others
    waiting in a collective forever: it prints the error with its rank and aborts every
    rank (``MPI_Abort``). A ``NonFiniteLossError`` comes from reduced losses, so every
    rank raises it at the same step: it is raised normally and may be caught.
    """

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> History:
        comm = kwargs.get("comm")
        if comm is None or comm.size == 1:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except NonFiniteLossError:
            raise
        except BaseException as exc:
            from .distributed import _fail_job

            _fail_job(comm, exc, "fit")
            raise

    return run


@_one_rank_fails_all
def fit(
    model: _nn.Module,
    X: Any,
    y: Any,
    *,
    loss: str | LossFn,
    optimizer: _optim.Optimizer | str,
    epochs: int,
    batch_size: int,
    backend: Backend | str | None = None,
    validation: tuple[Any, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    optimizer_state: Mapping[str, Any] | None = None,
    callback: Callable[[int, History], None] | None = None,
    inplace: bool = True,
    check_every: int | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    comm: Communicator | None = None,
) -> History:
    r"""Train ``model`` on ``X, y`` by minibatch gradient descent; return the history.

    Parameters
    ----------
    model : gradcore.nn.Module
        Trained in place: with ``inplace=True`` its NumPy, CuPy and PyTorch parameter
        arrays are overwritten each step (copy :meth:`~gradcore.nn.Module.state_dict`
        values first to keep them); on other backends they are replaced.
    X : array, shape (N, features)
        NumPy (moved to the backend) or an array of the backend.
    y : array, shape (N,) or (N, outputs)
        Integer class labels for ``"cross_entropy"``, targets for ``"mse"``.
    loss : {"cross_entropy", "mse"} or callable
        ``"cross_entropy"`` is :func:`gradcore.softmax_cross_entropy` on the model's
        logits; ``"mse"`` is :func:`gradcore.mse`. A callable must return
        ``(loss, grad_output)`` like them. A model whose last layer is a
        :class:`gradcore.nn.LinearCrossEntropy` head trains with ``"cross_entropy"``
        through :func:`gradcore.linear_cross_entropy` (the head's options apply), never
        holding a batch's logits; its training accuracy is then not measured
        (``None``), the validation accuracy is.
    optimizer : gradcore.optim.Optimizer or str
        ``optim.Adam(lr=1e-3)``, or a name with default settings.
    epochs, batch_size : int
        Passes over the data and samples per update (the last batch may be smaller).
    backend : Backend or str, optional
        Move the model there first (default: where the model is).
    validation : (X_val, y_val), optional
        Evaluated after each epoch.
    seed : int
        Seed of the NumPy generator that shuffles: each epoch uses the next
        ``rng.permutation(N)`` of ``numpy.random.default_rng(seed)``, cut into
        consecutive batches.
    progress : bool
        Show a tqdm bar (loss, samples per second) on stderr when it is a terminal.
    optimizer_state : dict, optional
        Continue from this state (e.g. from :func:`load`); moved to the backend.
    callback : callable, optional
        ``callback(epoch, history)`` after each epoch.
    inplace : bool
        Let the optimizer update NumPy, CuPy and PyTorch arrays in place, and the
        loss write its gradient over the logits when no layer keeps them.
    check_every : int, optional
        Read the loss on the host every this many steps to check it is finite and
        to update the bar; default every step on the CPU, every 50 on a GPU, and at
        the end of each epoch in any case.
    loss_kwargs : dict, optional
        Options of the loss kernel, e.g. ``{"weight": class_weights, "ignore_index": -1}``
        for ``"cross_entropy"`` (labels equal to ``ignore_index`` are then accepted and
        count in neither loss nor divisor). Array values are moved to the backend.
    comm : gradcore.distributed.Communicator, optional
        Train data-parallel over the ranks of ``comm`` (see :mod:`gradcore.distributed`):
        every rank passes the same ``X, y``, model and options; each computes the
        gradient of its slice of every global batch of ``batch_size`` rows, one
        all-reduce per step sums them with the mean's divisor, and every rank applies
        the update of the global batch's mean loss, the same as one process would.
        Rank 0's initial parameters are broadcast first; the history (losses,
        accuracies, validation metrics) is global and the same on every rank; only
        rank 0 shows progress; ``callback`` runs on every rank. A callable ``loss`` is
        taken to be a mean over the batch's rows. Any exception on any rank, data
        checks included, aborts the job with a message naming the rank (except a
        ``NonFiniteLossError``, which every rank raises alike at the same step).

    Returns
    -------
    History

    Raises
    ------
    ValueError
        For malformed data (before any training), or labels and targets that do not
        fit the model's outputs.
    NonFiniteLossError
        When the loss becomes NaN or infinite; the message names the step.
    """
    for label, value in (("epochs", epochs), ("batch_size", batch_size)):
        _positive_int(value, label)
    if check_every is not None:
        check_every = _positive_int(check_every, "check_every")
    if backend is not None:
        model.to(backend)
    b = model.backend
    xp = b.xp
    loss_fn, classification = _loss_fn(loss)
    user_loss_options = _loss_kwargs(loss_kwargs, b, model.dtype)
    if user_loss_options:
        loss_fn = functools.partial(loss_fn, **user_loss_options)
    ignore_index = user_loss_options.get("ignore_index") if classification else None
    opt = _optim.get(optimizer)
    X, y = _prepare(
        X,
        y,
        classification=classification,
        model=model,
        name="training data",
        ignore_index=ignore_index,
    )
    _check_outputs(model, X, y, classification, "training data", ignore_index)
    if validation is not None:
        if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
            raise ValueError("validation must be a pair (X_val, y_val)")
        X_val, y_val = _prepare(
            validation[0],
            validation[1],
            classification=classification,
            model=model,
            name="validation data",
            ignore_index=ignore_index,
        )
        _check_outputs(model, X_val, y_val, classification, "validation data", ignore_index)
        val_metrics = _batch_metrics(model, loss, loss_fn, classification)

    params = model.state_dict()
    if optimizer_state is None:
        state = opt.init(params)
    else:
        state = _optim.state_to(optimizer_state, b, dtype=model.dtype)
        opt.check_state(state, params)

    if check_every is None:
        check_every = 1 if _host_backend(b) else 50
    loss_options: dict[str, Any] = {}
    if isinstance(loss, str):
        if classification:
            # The labels were checked once above; a per-step check would cost a pass
            # over them (and a synchronisation on a GPU).
            loss_options["check_labels"] = False
        if inplace and b.name in ("numpy", "cupy", "torch") and _output_unsaved(model):
            # The logits are needed by nothing after the loss: let the loss write its
            # gradient over them instead of allocating another array.
            loss_options["inplace"] = True
    dp = None
    if comm is not None and comm.size > 1:
        from . import distributed as _distributed

        dp = _distributed._DataParallel(
            comm,
            loss=loss if isinstance(loss, str) else None,
            classification=classification,
            loss_kwargs=user_loss_options,
            label_dtype=_label_dtype(b),
            checks={
                "the number of training rows": int(X.shape[0]),
                "the number of validation rows": (
                    None if validation is None else int(X_val.shape[0])
                ),
                "epochs": int(epochs),
                "batch_size": int(batch_size),
                "seed": seed,
                "the backend": b.name,
                "the parameters' shapes": [
                    (k, tuple(int(d) for d in v.shape)) for k, v in params.items()
                ],
                "the model's dtype": str(model.dtype),
                "loss": loss if isinstance(loss, str) else "a callable",
                "the optimizer": repr(opt),
            },
        )
        params, state = dp.start(params, state, opt.buffers)
        model._assign(params)
    fused_head = loss == "cross_entropy" and _last_layer_is_fused_head(model)
    if fused_head:
        _check_fused_head_options(model, user_loss_options, dp is not None)
    jit_step = None
    if b.name == "jax" and _jittable(model, loss, opt) and dp is None:
        jit_step = _jax_step(model, loss_fn, loss_options, opt, classification, _label_dtype(b))
    n = int(X.shape[0])
    steps = math.ceil(n / batch_size)
    rng = np.random.default_rng(check_seed(seed))
    history = History()
    bar = _progress_bar(progress and (dp is None or dp.comm.rank == 0), epochs * n)
    step0 = int(state["step"])
    global_step = 0
    try:
        for epoch in range(1, epochs + 1):
            if bar is not None:
                bar.set_description(f"epoch {epoch}/{epochs}")
            perm = b.asarray(rng.permutation(n), dtype=_label_dtype(b))
            pending: list[Any] = []  # device losses not read yet
            sizes: list[int] = []
            correct: list[Any] = []
            epoch_losses: list[float] = []
            start = time.perf_counter()
            for s in range(steps):
                idx = perm[s * batch_size : min((s + 1) * batch_size, n)]
                if dp is not None:
                    # This rank's slice of the global batch.
                    lo, hi = dp.rows(0, int(idx.shape[0]))
                    idx = idx[lo:hi]
                xb = xp.take(X, idx, axis=0)
                yb = xp.take(y, idx, axis=0)
                if jit_step is not None:
                    params, state, value, hit_count = jit_step(params, state, xb, yb)
                    if classification:
                        correct.append(hit_count)
                elif dp is not None:
                    value, grads, hit_count = dp.step(model, xb, yb, xp, loss_fn, loss_options)
                    if classification:
                        correct.append(hit_count)
                    params, state = opt.update(params, grads, state, inplace=inplace)
                    if b.name == "dask":
                        params = _persist(b, params)
                    model._assign(params)
                else:
                    if fused_head:
                        # The head computes the loss and its gradients chunk by chunk;
                        # the batch's logits (needed for the accuracy) never exist.
                        value, grad = model._forward_loss(xb, yb, xp, False, False), None
                    else:
                        out = model._forward(xb, True, xp)
                        if classification:
                            hits = xp.astype(xp.argmax(out, axis=-1) == yb, _label_dtype(b))
                            correct.append(xp.sum(hits))
                        value, grad = loss_fn(out, yb, xp=xp, **loss_options)
                    model._backward(grad, xp, False)  # the data needs no gradient
                    grads = model._collect_grads()
                    params, state = opt.update(params, grads, state, inplace=inplace)
                    if b.name == "dask":
                        params = _persist(b, params)
                    model._assign(params)
                pending.append(value)
                sizes.append(min((s + 1) * batch_size, n) - s * batch_size)
                global_step += 1
                if global_step % check_every == 0 or s == steps - 1:
                    first = step0 + global_step - len(pending) + 1
                    read = _read_losses(pending, first, epoch)
                    epoch_losses.extend(read)
                    if bar is not None:
                        bar.update(sum(sizes[len(epoch_losses) - len(read) : len(epoch_losses)]))
                        bar.set_postfix(loss=f"{read[-1]:.4g}", refresh=False)
                    pending = []
            b.synchronize(*params.values())
            elapsed = time.perf_counter() - start
            if dp is not None:
                dp.check_replicas(params, epoch)
            history.epoch.append(epoch)
            history.step_loss.extend(epoch_losses)
            history.loss.append(float(np.dot(epoch_losses, sizes)) / n)
            if classification and correct:
                hits = int(to_numpy(xp.sum(xp.stack(correct))))
                history.accuracy.append(hits / n)
            else:
                history.accuracy.append(None)
            history.epoch_time.append(elapsed)
            history.samples_per_s.append(n / elapsed if elapsed > 0 else math.inf)
            if validation is not None:
                if dp is None:
                    metrics = _evaluate(model, X_val, y_val, val_metrics, max(batch_size, 1024))
                else:
                    metrics = dp.evaluate(model, X_val, y_val, xp, loss_fn, max(batch_size, 1024))
                history.val_loss.append(metrics["loss"])
                history.val_accuracy.append(metrics["accuracy"])
            else:
                history.val_loss.append(None)
                history.val_accuracy.append(None)
            history.optimizer_state = state
            if callback is not None:
                callback(epoch, history)
    finally:
        if bar is not None:
            bar.close()
    history.optimizer_state = state
    return history


def _read_losses(pending: list[Any], first_step: int, epoch: int) -> list[float]:
    if len(pending) == 1:
        values = [float(to_numpy(pending[0]))]
    else:
        # One transfer for all of them (a GPU synchronises once).
        values = [float(v) for v in to_numpy(get_namespace(pending[0]).stack(pending))]
    for k, v in enumerate(values):
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"the training loss became {v} at step {first_step + k} (epoch {epoch}); "
                "try a smaller learning rate, or check the data for extreme values"
            )
    return values


def _progress_bar(progress: bool, total: int) -> Any:
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", unit_scale=True, leave=False, dynamic_ncols=True)


# --- checkpoints ---------------------------------------------------------------------------

_FORMAT = "gradcore-checkpoint/1"


@dataclass
class Checkpoint:
    r"""The content of a checkpoint file, on the host.

    Attributes
    ----------
    params : dict of str to numpy.ndarray
        The model's parameters by name (for :meth:`gradcore.nn.Module.load_state_dict`).
    optimizer_state : dict or None
        The optimizer state, with NumPy arrays (``fit(..., optimizer_state=...)``
        moves them to the training backend).
    model_config : dict or None
        The model's :meth:`~gradcore.nn.Module.config`, to rebuild it.
    meta : dict
        Whatever was passed as ``meta`` to :func:`save`.
    """

    params: dict[str, np.ndarray]
    optimizer_state: dict[str, Any] | None
    model_config: dict[str, Any] | None
    meta: dict[str, Any]

    def build_model(
        self, backend: Backend | str | None = None, device: Any = None, *, dtype: str | None = None
    ) -> _nn.Module:
        """Rebuild the saved model with the saved weights, on ``backend``."""
        if self.model_config is None:
            raise ValueError("this checkpoint has no model description; build the model yourself")
        model = _nn.from_config(self.model_config, dtype=dtype, backend=backend, device=device)
        model.load_state_dict(self.params)
        return model


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The file :func:`save` writes for ``path``: ``.npz`` appended unless it ends so.

    The suffix is compared without regard to case (``x.NPZ`` stays ``x.NPZ``).
    :func:`load` reads ``path`` itself when it exists, else this file, so
    ``save("ck", ...)`` and ``load("ck")`` name the same checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() != ".npz":
        p = p.with_name(p.name + ".npz")
    return p


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save(
    path: str | os.PathLike[str],
    model: _nn.Module,
    optimizer_state: Mapping[str, Any] | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    r"""Write ``model``'s parameters (and an optimizer state) to an ``.npz`` file.

    Arrays are copied to the host, so the file loads on any backend. The file is
    written to a temporary name first and then renamed, so an interrupted save never
    leaves a half-written checkpoint behind.

    Parameters
    ----------
    path : str or path
        Where to write (``.npz`` is appended if missing, see :func:`checkpoint_path`).
        The file gets the mode the user's umask gives new files.
    model : gradcore.nn.Module
    optimizer_state : dict, optional
        From ``History.optimizer_state`` or an optimizer's ``update``.
    meta : dict, optional
        JSON-serialisable extra information (epochs done, dataset, ...).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    p = checkpoint_path(path)
    arrays: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        arrays[f"param/{name}"] = np.asarray(to_numpy(value))
    scalars: dict[str, Any] = {}
    if optimizer_state is not None:
        for key, value in optimizer_state.items():
            if isinstance(value, Mapping):
                for name, arr in value.items():
                    arrays[f"opt/{key}/{name}"] = np.asarray(to_numpy(arr))
            else:
                scalars[key] = value
    header = {
        "format": _FORMAT,
        "model": model.config(),
        "optimizer": None if optimizer_state is None else {"scalars": scalars},
        "meta": dict(meta or {}),
    }
    try:
        text = json.dumps(header)
    except TypeError as exc:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {exc}") from None
    arrays["__header__"] = np.asarray(text)
    directory = p.parent if str(p.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        # mkstemp makes the file private (0600); a checkpoint gets the mode any other
        # new file of the user gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load(path: str | os.PathLike[str]) -> Checkpoint:
    r"""Read a checkpoint written by :func:`save`.

    ``path`` is read as given when that file exists, else as :func:`save` would have
    named it (``"ck"`` reads ``ck.npz``). Every array's shape is read from the archive's
    headers and checked against the saved model description before any array is
    loaded, so a crafted file cannot make this allocate more than it holds.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ValueError
        If the file is not a readable gradcore checkpoint (corrupt, truncated, another
        kind of ``.npz``, a newer format, a malformed header, parameters that do not
        fit the saved model, or non-finite or non-real numbers).
    """
    p = Path(path)
    if not p.is_file():
        alt = checkpoint_path(p)
        if alt == p or not alt.is_file():
            raise FileNotFoundError(f"no such checkpoint: {str(p)!r}")
        p = alt
    try:
        entries = npz_headers(p)
    except ValueError as exc:
        text = str(exc).removeprefix(f"{p.name}: ")
        inner = text.removeprefix("not a readable .npz file (")
        reason = inner[:-1] if inner != text and inner.endswith(")") else text
        raise ValueError(f"{p.name} is not a readable checkpoint ({reason})") from None
    if "__header__" not in entries:
        raise ValueError(f"{p.name} is an .npz file but not a gradcore checkpoint (no header)")
    header_shape, header_dtype = entries.pop("__header__")
    if header_shape != () or header_dtype.kind != "U" or header_dtype.itemsize > 4 * 2**20:
        raise ValueError(f"{p.name}: corrupt checkpoint header (not a short text)")
    header = _read_header(p)
    model_config = header["model"]
    expected = _nn.param_shapes(model_config) if model_config is not None else None
    params_shapes: dict[str, tuple[int, ...]] = {}
    for key, (shape, dtype) in entries.items():
        kind, _, rest = key.partition("/")
        if kind not in ("param", "opt") or not rest or (kind == "opt" and "/" not in rest):
            raise ValueError(f"{p.name}: unexpected entry {key!r} in checkpoint")
        if kind == "opt" and header["optimizer"] is None:
            raise ValueError(f"{p.name}: optimizer entry {key!r} but the header has no optimizer")
        if dtype.kind != "f":
            raise ValueError(f"{p.name}: entry {key!r} must hold real floats, got dtype {dtype}")
        name = rest if kind == "param" else rest.partition("/")[2]
        if expected is not None:
            if name not in expected:
                raise ValueError(
                    f"{p.name}: entry {key!r} names no parameter of the saved model "
                    f"(expected {', '.join(expected)})"
                )
            if shape != expected[name]:
                raise ValueError(
                    f"{p.name}: entry {key!r} has shape {shape} but the saved model's "
                    f"{name!r} has shape {expected[name]}"
                )
        if kind == "param":
            params_shapes[name] = shape
    if not params_shapes:
        raise ValueError(f"{p.name}: checkpoint holds no parameters")
    if expected is not None and set(expected) != set(params_shapes):
        missing = sorted(set(expected) - set(params_shapes))
        raise ValueError(f"{p.name}: checkpoint lacks parameters {', '.join(missing)}")
    try:
        with np.load(p, allow_pickle=False) as f:
            contents = {k: f[k] for k in f.files if k != "__header__"}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{p.name} is not a readable checkpoint ({reason})") from None
    params: dict[str, np.ndarray] = {}
    opt_state: dict[str, Any] | None = None
    if header["optimizer"] is not None:
        opt_state = dict(header["optimizer"]["scalars"])
    for key, arr in contents.items():
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{p.name}: entry {key!r} contains NaN or infinity")
        kind, _, rest = key.partition("/")
        if kind == "param":
            params[rest] = arr
        elif opt_state is not None:
            buf, _, name = rest.partition("/")
            opt_state.setdefault(buf, {})[name] = arr
    return Checkpoint(params, opt_state, model_config, header["meta"])


def _read_header(p: Path) -> dict[str, Any]:
    """The checkpoint's JSON header, every field checked for its type."""
    try:
        with np.load(p, allow_pickle=False) as f:
            text = str(f["__header__"])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{p.name} is not a readable checkpoint ({reason})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p.name}: corrupt checkpoint header ({exc})") from None
    except RecursionError:
        raise ValueError(f"{p.name}: corrupt checkpoint header (nested too deeply)") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ValueError(f"{p.name}: unsupported checkpoint format {found!r} (expected {_FORMAT})")
    model = header.get("model")
    if model is not None and not isinstance(model, dict):
        raise ValueError(f"{p.name}: checkpoint header 'model' must be an object or null")
    if model is not None:
        try:
            _nn.param_shapes(model)
        except ValueError as exc:
            raise ValueError(f"{p.name}: {exc}") from None
    optimizer = header.get("optimizer")
    if optimizer is not None:
        scalars = optimizer.get("scalars", {}) if isinstance(optimizer, dict) else None
        if not isinstance(scalars, dict):
            raise ValueError(
                f"{p.name}: checkpoint header 'optimizer' must be null or an object with "
                f"'scalars', got {optimizer!r:.80}"
            )
        step = scalars.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"{p.name}: checkpoint optimizer 'step' must be an integer >= 0, got {step!r:.80}"
            )
        for key, value in scalars.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"{p.name}: checkpoint optimizer scalar {key!r} must be a number, "
                    f"got {value!r:.80}"
                )
        optimizer = {"scalars": scalars}
    meta = header.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"{p.name}: checkpoint header 'meta' must be an object, got {meta!r:.80}")
    return {"model": model, "optimizer": optimizer, "meta": meta}
