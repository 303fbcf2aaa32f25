r"""Layers and models made of gradcore's kernels.

A layer is a forward map and its VJP, the pair written by :mod:`gradcore.linear` and
:mod:`gradcore.activations`. :meth:`Module.forward` keeps only what the VJP needs (the
input of :class:`Linear`, the output of :class:`ReLU`, :class:`Sigmoid`, :class:`Tanh`
and :class:`LeakyReLU`, the input of :class:`GELU`); :meth:`Module.backward` takes the
gradient of the loss with respect to the output, stores the gradients of the parameters
by name and returns the gradient with respect to the input. Backpropagation through a
:class:`Sequential` is the chain rule: the layers' VJPs applied in reverse order.

Parameters are plain arrays of one backend, held by name (``"0.W"``, ``"0.b"``, ...).
:meth:`Module.state_dict` and :meth:`Module.load_state_dict` read and write them, and
:meth:`Module.to` moves them to another backend. Initial values are drawn in float64
from a seeded NumPy generator and then cast and moved, so one seed gives the same
model on NumPy, CuPy, PyTorch, JAX, ...

Examples
--------
>>> import numpy as np, gradcore
>>> from gradcore import nn
>>> model = nn.MLP([2, 16, 3], activation="relu", seed=0, dtype="float64")
>>> X = np.random.default_rng(0).standard_normal((8, 2))
>>> logits = model.forward(X)
>>> loss, g = gradcore.softmax_cross_entropy(logits, np.zeros(8, dtype=np.int64))
>>> dx = model.backward(g)
>>> sorted(model.grads())
['0.W', '0.b', '2.W', '2.b']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import activations as _act
from ._checks import astype, compute_dtype
from ._namespace import Backend, check_array_argument, get_namespace, to_numpy
from ._namespace import backend as _make_backend
from .data import check_seed
from .linear import linear as _checked_linear
from .linear import linear_vjp as _checked_linear_vjp
from .linear_xent import linear_cross_entropy as _linear_cross_entropy

__all__ = [
    "ACTIVATIONS",
    "GELU",
    "MLP",
    "LeakyReLU",
    "Linear",
    "LinearCrossEntropy",
    "Module",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "activation",
    "from_config",
    "param_shapes",
    "resolve_backend",
    "with_fused_head",
]

_FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


def _unchecked(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` without its argument-type checks (still dispatched to fast paths).

    Layers call kernels on arrays they made or checked on the way in
    (:meth:`Module.forward`, :meth:`Module.backward`), at every step.
    """
    return getattr(kernel, "__gradcore_unchecked__", kernel)


_linear = _unchecked(_checked_linear)
_linear_vjp = _unchecked(_checked_linear_vjp)


def resolve_backend(backend: Backend | str | None = None, device: Any = None) -> Backend:
    """A :class:`gradcore.Backend` from a Backend, a name ("torch") or None (NumPy).

    Parameters
    ----------
    backend : Backend or str or None
        A backend, or its name; None means NumPy.
    device : optional
        A device of that library ("cuda:1", "gpu:0"); with a :class:`Backend` it
        replaces the Backend's device.
    """
    if backend is None:
        return _make_backend("numpy", device)
    if isinstance(backend, Backend):
        if device is None:
            return backend
        return _make_backend(backend.name, device)
    if isinstance(backend, str):
        return _make_backend(backend, device)
    raise TypeError(
        f"backend must be a gradcore.Backend, a backend name or None, got {type(backend).__name__}"
    )


def _check_dtype(dtype: str) -> str:
    name = str(np.dtype(dtype).name) if dtype != "bfloat16" else "bfloat16"
    if name not in _FLOAT_DTYPES:
        raise ValueError(
            f"dtype must be a floating-point type ({', '.join(_FLOAT_DTYPES)}), got {dtype!r}"
        )
    return name


def _check_backend_dtype(backend: Backend, dtype: str) -> None:
    if backend.name == "jax" and dtype == "float64":
        import jax

        if not getattr(jax.config, "jax_enable_x64", False):
            # JAX would silently truncate to float32.
            raise ValueError(
                "float64 on JAX needs 64-bit mode: call "
                "jax.config.update('jax_enable_x64', True) first, or use dtype='float32'"
            )


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(0 if seed is None else check_seed(seed))


class Module:
    r"""Base class of layers and models.

    A module holds its parameters by name in one backend (:attr:`backend`). Subclasses
    implement ``_forward(x, keep, xp)`` and ``_backward(g, xp, need_dx)``.

    Attributes
    ----------
    backend : Backend
        Where the parameters live (NumPy unless moved with :meth:`to`).
    dtype : str
        The floating-point type of the parameters ("float32", "float64", ...).
    """

    def __init__(self, *, dtype: str = "float32", backend: Backend | str | None = None) -> None:
        self.dtype = _check_dtype(dtype)
        self.backend = resolve_backend(backend)
        _check_backend_dtype(self.backend, self.dtype)
        self._params: dict[str, Any] = {}
        self._grads: dict[str, Any] = {}
        self._xp_seen: Any = None

    # --- forward and backward ------------------------------------------------------

    def forward(self, x: Any) -> Any:
        r"""The output for input ``x``, keeping what :meth:`backward` needs.

        Parameters
        ----------
        x : array, shape (N, in_features)
            An array of the module's backend (see :meth:`to`); a NumPy array is moved
            to it.
        """
        x, xp = self._input(x)
        self._xp_seen = xp
        return self._forward(x, True, xp)

    __call__ = forward

    def backward(self, g: Any = None, *, need_input_grad: bool = True) -> Any:
        r"""The gradient with respect to the last :meth:`forward`'s input.

        Parameters
        ----------
        g : array, shape of the output, or None
            The gradient of a scalar loss with respect to the output; None after
            :meth:`forward_loss`, whose loss head already holds it.
        need_input_grad : bool, default True
            ``False`` lets the first layer skip the gradient of the input (for a
            ``Linear`` layer, one matrix product), when only the parameters'
            gradients are wanted, as in training.

        Returns
        -------
        array, shape of the input, or None
            The gradient with respect to the input (None when ``need_input_grad`` is
            False and the first layer skipped it). The parameters' gradients are
            stored by name and read with :meth:`grads`; each call overwrites them.
        """
        xp = self._xp_seen
        if xp is None:
            raise RuntimeError(
                "backward() needs a forward() (or forward_loss()) first (each forward "
                "allows one backward)"
            )
        if g is not None or not _holds_fused_gradient(self):
            # None is taken only after forward_loss(), whose head holds the gradient.
            check_array_argument(g, "g")
        self._xp_seen = None
        return self._backward(g, xp, need_input_grad)

    def forward_loss(self, x: Any, labels: Any, *, check_labels: bool | None = None) -> Any:
        r"""The loss of a model whose last layer is a :class:`LinearCrossEntropy` head.

        The layers before the head run :meth:`forward`; the head computes the loss and
        every gradient it needs without materialising the logits. Call
        :meth:`backward` with no gradient afterwards: it returns the gradient with
        respect to ``x`` and leaves the parameters' gradients in :meth:`grads`.

        Parameters
        ----------
        x : array, shape (N, in_features)
        labels : array, shape (N,) of class indices (or (N, classes) probabilities)
        check_labels : bool or None
            As in :func:`gradcore.softmax_cross_entropy`.

        Returns
        -------
        array
            The loss (0-d, the head's reduction).
        """
        x, xp = self._input(x)
        self._xp_seen = xp
        return self._forward_loss(x, labels, xp, True, check_labels)

    def _forward_loss(
        self, x: Any, labels: Any, xp: Any, need_dx: bool, check_labels: bool | None
    ) -> Any:
        raise TypeError(
            f"{type(self).__name__} has no fused loss head: forward_loss() needs a model "
            "whose last layer is gradcore.nn.LinearCrossEntropy"
        )

    def predict(self, x: Any, *, batch_size: int | None = None) -> Any:
        """The output for ``x`` without keeping anything for a backward pass.

        ``batch_size`` splits large inputs into chunks to bound the memory used.
        """
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        x, xp = self._input(x)
        n = int(x.shape[0])
        if batch_size is None or n <= batch_size:
            return self._forward(x, False, xp)
        parts = [
            self._forward(x[i : min(i + batch_size, n), ...], False, xp)
            for i in range(0, n, batch_size)
        ]
        return xp.concat(parts, axis=0)

    def _input(self, x: Any) -> tuple[Any, Any]:
        xp = self.backend.xp
        if isinstance(x, np.ndarray) and self.backend.name != "numpy":
            return self.backend.asarray(x, dtype=self.dtype), xp
        if isinstance(x, (list, tuple)):
            return self.backend.asarray(np.asarray(x), dtype=self.dtype), xp
        check_array_argument(x, "x")
        found = get_namespace(x)
        if found is not xp:
            raise TypeError(
                f"the input is a {type(x).__module__}.{type(x).__name__} but the model is on "
                f"backend {self.backend.name!r}; move one of them (model.to(...) or "
                "backend.asarray(...))"
            )
        if x.dtype != getattr(xp, self.dtype):
            x = xp.astype(x, getattr(xp, self.dtype))
        return x, xp

    def _forward(self, x: Any, keep: bool, xp: Any) -> Any:
        raise NotImplementedError

    def _backward(self, g: Any, xp: Any, need_dx: bool = True) -> Any:
        raise NotImplementedError

    # --- parameters ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The parameters by name (the arrays themselves, not copies)."""
        return dict(self._params)

    def grads(self) -> dict[str, Any]:
        """The parameters' gradients by name, from the last :meth:`backward`."""
        if self._params and not self._grads:
            raise RuntimeError("no gradients yet: call forward() and backward() first")
        return dict(self._grads)

    def _collect_grads(self) -> dict[str, Any]:
        return dict(self._grads)

    def num_parameters(self) -> int:
        """The number of scalar parameters."""
        return sum(math.prod(int(s) for s in p.shape) for p in self.state_dict().values())

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> Module:
        r"""Copy parameters from ``state`` (arrays of any backend) into this module.

        The arrays are copied, cast to the module's dtype and moved to its backend.

        Raises
        ------
        ValueError
            If names are missing or unexpected (with ``strict``), or a shape differs;
            the message lists them.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if strict and missing:
            problems.append(f"missing {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected {', '.join(unexpected)}")
        for name in sorted(set(own) & set(state)):
            want = tuple(int(s) for s in own[name].shape)
            got = tuple(int(s) for s in getattr(state[name], "shape", np.shape(state[name])))
            if want != got:
                problems.append(f"{name} has shape {got}, expected {want}")
        if problems:
            raise ValueError(
                f"state dict does not fit {type(self).__name__}: {'; '.join(problems)}"
            )
        new = {}
        for name in own:
            if name in state:
                host = np.array(to_numpy(state[name]), copy=True)
                if host.dtype.kind not in "fiu":
                    raise ValueError(
                        f"state dict entry {name!r} must hold real numbers, got dtype {host.dtype}"
                    )
                if not np.all(np.isfinite(host)):
                    raise ValueError(f"state dict entry {name!r} contains NaN or infinity")
                with np.errstate(over="ignore"):  # overflow is reported below, by name
                    cast = self.backend.asarray(host, dtype=self.dtype)
                if not np.all(np.isfinite(to_numpy(cast))):
                    # 1e300 is finite in float64 and inf in float32.
                    raise ValueError(
                        f"state dict entry {name!r} overflows the model's dtype {self.dtype} "
                        f"(largest magnitude {float(np.max(np.abs(host))):.3g})"
                    )
                new[name] = cast
        self._assign(new)
        return self

    def _assign(self, params: Mapping[str, Any]) -> None:
        # No copy and no checks: the training loop hands back updated arrays each step.
        self._params.update(params)

    def _set_grads(self, grads: Mapping[str, Any]) -> None:
        # For a compiled training step, which returns the gradients instead of
        # leaving them in the layers.
        if self._params:
            self._grads = dict(grads)

    def to(self, backend: Backend | str, device: Any = None, *, dtype: str | None = None) -> Module:
        r"""Move the parameters to ``backend`` (a :class:`Backend` or a name), in place.

        Parameters
        ----------
        backend : Backend or str
            "numpy", "cupy", "torch", "jax", "dask", "array_api_strict" or a Backend.
        device : optional
            A device of that library ("cuda:1").
        dtype : str, optional
            Also cast the parameters ("float32", "float64").

        Returns
        -------
        Module
            ``self``, so that ``model = MLP(...).to("cupy")`` works.
        """
        target = resolve_backend(backend, device)
        _check_backend_dtype(target, _check_dtype(dtype or self.dtype))
        if target == self.backend and (dtype is None or _check_dtype(dtype) == self.dtype):
            return self  # already there: keep the arrays (and any gradients)
        if dtype is not None:
            self._set_dtype(_check_dtype(dtype))
        self._move(target)
        return self

    def _set_dtype(self, dtype: str) -> None:
        self.dtype = dtype

    def _move(self, target: Backend) -> None:
        moved = {}
        for name, p in self._params.items():
            moved[name] = target.asarray(np.array(to_numpy(p), copy=True), dtype=self.dtype)
        self._params = moved
        self._grads = {}
        self._xp_seen = None
        self.backend = target

    # --- description ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description from which :func:`from_config` rebuilds it."""
        return {"type": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linear(Module):
    r"""Affine layer ``y = x @ W + b`` with ``W`` of shape (in_features, out_features).

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output.
    bias : bool
        Whether to add the bias ``b`` (shape (out_features,), initialised to zero).
    init : {"he", "xavier", "zeros"}
        He (Kaiming) normal, :math:`W_{ij} \sim \mathcal N(0, 2/\text{in})`, suits
        ReLU-like activations; Xavier (Glorot) uniform,
        :math:`W_{ij} \sim U(-a, a)` with :math:`a = \sqrt{6/(\text{in}+\text{out})}`,
        suits tanh and sigmoid; "zeros" is for convex models (linear regression).
    seed : int or numpy.random.Generator
        Seed of the NumPy generator the weights are drawn from (in float64).
    dtype : str
        Floating-point type of the parameters.
    backend : Backend or str, optional
        Where the parameters live (default NumPy).

    Notes
    -----
    Parameters: ``"W"`` and ``"b"``. ``forward`` keeps ``x``; ``backward`` calls
    :func:`gradcore.linear_vjp`, which gives :math:`dx = g W^\top`,
    :math:`dW = x^\top g` and :math:`db = \sum_n g_n`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        init: str = "he",
        seed: int | np.random.Generator | None = 0,
        dtype: str = "float32",
        backend: Backend | str | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(dtype=dtype, backend=resolve_backend(backend, device))
        for label, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = bool(bias)
        self.init = init
        W = _draw_weights(_rng(seed), self.in_features, self.out_features, init)
        params = {"W": W}
        if self.bias:
            params["b"] = np.zeros(self.out_features)
        for key, array in params.items():
            self._params[key] = self.backend.asarray(array, dtype=self.dtype)
        self._x: Any = None

    def _forward(self, x: Any, keep: bool, xp: Any) -> Any:
        if keep:
            self._x = x
        return _linear(x, self._params["W"], self._params.get("b"), xp=xp)

    def _backward(self, g: Any, xp: Any, need_dx: bool = True) -> Any:
        x, self._x = self._x, None
        if x is None:
            raise RuntimeError(
                "backward() needs a forward() first (each forward allows one backward)"
            )
        dx, dW, db = _linear_vjp(g, x, self._params["W"], need_dx=need_dx, xp=xp)
        self._grads = {"W": dW, "b": db} if self.bias else {"W": dW}
        return dx

    def config(self) -> dict[str, Any]:
        return {
            "type": "Linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias,
            "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"


def _draw_weights(rng: np.random.Generator, fan_in: int, fan_out: int, init: str) -> np.ndarray:
    if init == "he":
        return rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
    if init == "xavier":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=(fan_in, fan_out))
    if init == "zeros":
        return np.zeros((fan_in, fan_out))
    raise ValueError(f"init must be 'he', 'xavier' or 'zeros', got {init!r}")


class LinearCrossEntropy(Linear):
    r"""An output layer fused with softmax cross-entropy: in training the logits of the
    whole batch never exist.

    :meth:`forward_loss` (used by :func:`gradcore.fit` for ``loss="cross_entropy"``)
    calls :func:`gradcore.linear_cross_entropy`, which works through the batch in
    chunks of rows and returns the loss with the gradients of ``x``, ``W`` and ``b``;
    :meth:`backward` (with no gradient) then hands ``dx`` to the layers before. Outside
    training, :meth:`forward` and :meth:`predict` return the logits (soft-capped when
    ``softcap`` is set), so evaluation and accuracy work as for :class:`Linear`, and
    ``backward(g)`` with a gradient of those logits works too.

    Parameters
    ----------
    in_features, num_classes : int
        Input width and number of classes (``W`` has shape (in_features, num_classes)).
    bias, init, seed, dtype, backend, device
        As for :class:`Linear`.
    label_smoothing, z_loss : float
        Options of the training loss (:func:`gradcore.softmax_cross_entropy`).
    softcap : float, optional
        Soft-cap the logits to ``softcap * tanh(z / softcap)`` (Gemma 2), in training
        and in :meth:`forward`.
    chunk_size : int, optional
        Rows per chunk; default :func:`gradcore.linear_xent.default_chunk_rows`.

    Notes
    -----
    Parameters ``"W"`` and ``"b"``, as for :class:`Linear` (:meth:`from_linear` turns a
    trained or freshly drawn :class:`Linear` into a head with the same weights).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        init: str = "he",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        seed: int | np.random.Generator | None = 0,
        dtype: str = "float32",
        backend: Backend | str | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            bias=bias,
            init=init,
            seed=seed,
            dtype=dtype,
            backend=backend,
            device=device,
        )
        from .losses import _check_softcap

        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.z_loss = float(z_loss)
        if not (self.z_loss >= 0.0 and math.isfinite(self.z_loss)):
            raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
        self.softcap = _check_softcap(softcap)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._tanh: Any = None
        self._fused_dx: Any = None
        self._fused = False

    @classmethod
    def from_linear(cls, layer: Linear, **options: Any) -> LinearCrossEntropy:
        """A head with ``layer``'s weights (copied), backend and dtype, and ``options``."""
        head = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias,
            init="zeros",
            dtype=layer.dtype,
            backend=layer.backend,
            **options,
        )
        head.load_state_dict(layer.state_dict())
        return head

    @property
    def num_classes(self) -> int:
        return self.out_features

    def _forward(self, x: Any, keep: bool, xp: Any) -> Any:
        self._fused = False
        z = super()._forward(x, keep, xp)
        if self.softcap is None:
            return z
        # In the loss's compute dtype (float32 for float16/bfloat16), as the fused
        # training loss caps: a cap past float16's range would round to inf (NaN logits).
        t = xp.tanh(astype(xp, z, compute_dtype(xp, z.dtype)) / self.softcap)
        if keep:
            self._tanh = t  # not the output: a loss may overwrite that in place
        return astype(xp, self.softcap * t, z.dtype)

    def _forward_loss(
        self, x: Any, labels: Any, xp: Any, need_dx: bool, check_labels: bool | None
    ) -> Any:
        loss, dx, dW, db = _linear_cross_entropy(
            x,
            self._params["W"],
            labels,
            bias=self._params.get("b"),
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            need_dx=need_dx,
            check_labels=check_labels,
            xp=xp,
        )
        self._grads = {"W": dW, "b": db} if self.bias else {"W": dW}
        self._fused_dx = dx
        self._fused = True
        self._x = self._tanh = None
        return loss

    def _backward(self, g: Any, xp: Any, need_dx: bool = True) -> Any:
        if g is None:
            if not self._fused:
                raise RuntimeError(
                    "backward() without a gradient needs forward_loss() first (each "
                    "forward_loss allows one backward)"
                )
            dx, self._fused_dx, self._fused = self._fused_dx, None, False
            return dx
        if self.softcap is not None:
            t, self._tanh = self._tanh, None
            if t is None:
                raise RuntimeError(
                    "backward() needs a forward() first (each forward allows one backward)"
                )
            g = g * astype(xp, 1.0 - t * t, g.dtype)
        return super()._backward(g, xp, need_dx)

    def _move(self, target: Backend) -> None:
        super()._move(target)
        self._x = self._tanh = self._fused_dx = None
        self._fused = False

    def config(self) -> dict[str, Any]:
        return {
            "type": "LinearCrossEntropy",
            "in_features": self.in_features,
            "num_classes": self.out_features,
            "bias": self.bias,
            "label_smoothing": self.label_smoothing,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
            "chunk_size": self.chunk_size,
            "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("label_smoothing", self.label_smoothing),
                ("z_loss", self.z_loss),
                ("softcap", self.softcap),
                ("chunk_size", self.chunk_size),
            )
            if v
        )
        return (
            f"LinearCrossEntropy({self.in_features}, {self.out_features}, bias={self.bias}{extra})"
        )


def _last_layer(model: Module) -> Module:
    """The layer that produces ``model``'s output, inside any nested Sequential."""
    while isinstance(model, Sequential):
        model = model.layers[-1]
    return model


def _holds_fused_gradient(model: Module) -> bool:
    """Whether ``model`` ends in a :class:`LinearCrossEntropy` head that ran forward_loss."""
    last = _last_layer(model)
    return isinstance(last, LinearCrossEntropy) and last._fused


def with_fused_head(model: Module, **options: Any) -> Sequential:
    r"""``model`` with its last :class:`Linear` layer turned into a
    :class:`LinearCrossEntropy` head of the same weights (``options`` go to the head).

    The other layers are the same objects; the result trains with :func:`gradcore.fit`
    and ``loss="cross_entropy"`` without materialising the batch's logits.
    """
    layers = list(model.layers) if isinstance(model, Sequential) else [model]
    last = layers[-1]
    if isinstance(last, Sequential):
        layers[-1] = with_fused_head(last, **options)
        return Sequential(*layers)
    if not isinstance(last, Linear):
        raise TypeError(
            f"the model's last layer must be a Linear layer to become a fused head, "
            f"got {type(last).__name__}"
        )
    layers[-1] = LinearCrossEntropy.from_linear(last, **options)
    return Sequential(*layers)


class _Activation(Module):
    """An elementwise activation: no parameters, keeps one array for its VJP."""

    name = ""

    def __init__(self) -> None:
        super().__init__()
        self._saved: Any = None

    def _backward(self, g: Any, xp: Any, need_dx: bool = True) -> Any:
        saved, self._saved = self._saved, None
        if saved is None:
            raise RuntimeError(
                "backward() needs a forward() first (each forward allows one backward)"
            )
        return self._vjp(g, saved, xp)

    #: The kernel pair from :mod:`gradcore.activations` (set by each subclass).
    _kernel: Callable[..., Any]
    _kernel_vjp: Callable[..., Any]
    #: Whether the VJP needs the input (GELU) rather than the output (the others).
    _saves_input = False

    def _options(self) -> dict[str, Any]:
        """Keyword options passed to both kernels."""
        return {}

    def _forward(self, x: Any, keep: bool, xp: Any) -> Any:
        y = type(self)._kernel(x, xp=xp, **self._options())
        if keep:
            self._saved = x if self._saves_input else y
        return y

    def _vjp(self, g: Any, saved: Any, xp: Any) -> Any:
        return type(self)._kernel_vjp(g, saved, xp=xp, **self._options())

    def _input(self, x: Any) -> tuple[Any, Any]:
        # Parameter-free layers follow their input's backend.
        return x, get_namespace(x)

    def _move(self, target: Backend) -> None:
        self.backend = target
        self._saved = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReLU(_Activation):
    r"""``max(x, 0)``; keeps the output ``y`` for :func:`gradcore.relu_vjp`."""

    name = "relu"
    _kernel = staticmethod(_unchecked(_act.relu))
    _kernel_vjp = staticmethod(_unchecked(_act.relu_vjp))


class LeakyReLU(_Activation):
    r"""``x`` where positive, ``negative_slope * x`` elsewhere; keeps the output."""

    name = "leaky_relu"
    _kernel = staticmethod(_unchecked(_act.leaky_relu))
    _kernel_vjp = staticmethod(_unchecked(_act.leaky_relu_vjp))

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if not negative_slope > 0:
            # A non-positive slope makes the output's sign ambiguous for the VJP.
            raise ValueError(f"negative_slope must be positive, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def _options(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}

    def config(self) -> dict[str, Any]:
        return {"type": "LeakyReLU", "negative_slope": self.negative_slope}

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class Sigmoid(_Activation):
    r"""``1 / (1 + exp(-x))``; keeps the output ``y`` (the derivative is ``y(1-y)``)."""

    name = "sigmoid"
    _kernel = staticmethod(_unchecked(_act.sigmoid))
    _kernel_vjp = staticmethod(_unchecked(_act.sigmoid_vjp))


class Tanh(_Activation):
    r"""``tanh(x)``; keeps the output ``y`` (the derivative is ``1 - y**2``)."""

    name = "tanh"
    _kernel = staticmethod(_unchecked(_act.tanh))
    _kernel_vjp = staticmethod(_unchecked(_act.tanh_vjp))


class GELU(_Activation):
    r"""GELU, tanh approximation; keeps the input ``x`` for :func:`gradcore.gelu_vjp`."""

    name = "gelu"
    _kernel = staticmethod(_unchecked(_act.gelu))
    _kernel_vjp = staticmethod(_unchecked(_act.gelu_vjp))
    _saves_input = True


#: Activation names accepted by :class:`MLP` and :func:`activation`.
ACTIVATIONS: dict[str, type[_Activation]] = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "gelu": GELU,
}


def activation(name: str) -> Module:
    """The activation layer called ``name`` (one of :data:`ACTIVATIONS`)."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a name, one of {', '.join(ACTIVATIONS)}; got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[key]()


class Sequential(Module):
    r"""Layers applied one after the other; backward applies their VJPs in reverse.

    Parameters are named ``"<index>.<name>"`` after the layer's position
    (``"0.W"``, ``"2.b"``). All layers must share one backend and dtype; build the
    layers on NumPy and move the whole model with :meth:`to`.
    """

    def __init__(self, *layers: Module) -> None:
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for layer in layers:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes gradcore.nn modules, got {type(layer).__name__}")
        with_params = [layer for layer in layers if layer._params or isinstance(layer, Sequential)]
        first = with_params[0] if with_params else layers[0]
        super().__init__(dtype=first.dtype, backend=first.backend)
        for layer in with_params:
            if layer.backend != first.backend or layer.dtype != first.dtype:
                raise ValueError(
                    "all layers of a Sequential must share one backend and dtype; got "
                    f"{first.backend}/{first.dtype} and {layer.backend}/{layer.dtype}"
                )
        self.layers: list[Module] = list(layers)
        for layer in self.layers:
            if isinstance(layer, _Activation):
                layer.backend = self.backend

    def _forward(self, x: Any, keep: bool, xp: Any) -> Any:
        for layer in self.layers:
            x = layer._forward(x, keep, xp)
        return x

    def _forward_loss(
        self, x: Any, labels: Any, xp: Any, need_dx: bool, check_labels: bool | None
    ) -> Any:
        for layer in self.layers[:-1]:
            x = layer._forward(x, True, xp)
        # The head's input gradient feeds the layers before it, if there are any.
        head_dx = need_dx or len(self.layers) > 1
        return self.layers[-1]._forward_loss(x, labels, xp, head_dx, check_labels)

    def _backward(self, g: Any, xp: Any, need_dx: bool = True) -> Any:
        last = len(self.layers) - 1
        for i, layer in enumerate(reversed(self.layers)):
            # Only the first layer may skip its input gradient (a matrix product for
            # a Linear layer): every other layer's input gradient feeds the next VJP.
            g = layer._backward(g, xp, need_dx or i != last)
        return g

    def _named(self, attr: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, layer in enumerate(self.layers):
            values = layer.state_dict() if attr == "params" else layer._collect_grads()
            for name, value in values.items():
                out[f"{i}.{name}"] = value
        return out

    def _collect_grads(self) -> dict[str, Any]:
        return self._named("grads")

    def state_dict(self) -> dict[str, Any]:
        return self._named("params")

    def grads(self) -> dict[str, Any]:
        out = self._named("grads")
        if len(out) != len(self.state_dict()):
            raise RuntimeError("no gradients yet: call forward() and backward() first")
        return out

    def _assign(self, params: Mapping[str, Any]) -> None:
        per_layer: dict[int, dict[str, Any]] = {}
        for name, value in params.items():
            prefix, _, local = name.partition(".")
            per_layer.setdefault(int(prefix), {})[local] = value
        for index, values in per_layer.items():
            self.layers[index]._assign(values)

    def _set_grads(self, grads: Mapping[str, Any]) -> None:
        per_layer: dict[int, dict[str, Any]] = {}
        for name, value in grads.items():
            prefix, _, local = name.partition(".")
            per_layer.setdefault(int(prefix), {})[local] = value
        for index, values in per_layer.items():
            self.layers[index]._set_grads(values)

    def _set_dtype(self, dtype: str) -> None:
        self.dtype = dtype
        for layer in self.layers:
            layer._set_dtype(dtype)

    def _move(self, target: Backend) -> None:
        for layer in self.layers:
            layer._move(target)
        self.backend = target
        self._xp_seen = None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> Module:
        return self.layers[index]

    def config(self) -> dict[str, Any]:
        return {"type": "Sequential", "layers": [layer.config() for layer in self.layers]}

    def __repr__(self) -> str:
        inner = ",\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"{type(self).__name__}(\n{inner}\n)"


class MLP(Sequential):
    r"""Multilayer perceptron: ``Linear, activation, Linear, ..., Linear``.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths from input to output, e.g. ``[64, 128, 10]``: a 64-128 layer, the
        activation, and a 128-10 layer producing logits. Two sizes give one
        :class:`Linear` (softmax regression with cross-entropy, linear regression with
        MSE).
    activation : str
        One of :data:`ACTIVATIONS` ("relu", "leaky_relu", "sigmoid", "tanh", "gelu").
    init : {"he", "xavier", "zeros"}, optional
        Weight initialisation; default He for ReLU-like activations and GELU, Xavier
        for sigmoid and tanh.
    seed : int
        Seed of the NumPy generator all weights are drawn from, layer by layer.
    dtype : str
        Floating-point type of the parameters.
    backend, device : optional
        Where the parameters live (default NumPy on the CPU).

    Examples
    --------
    >>> from gradcore.nn import MLP
    >>> MLP([64, 128, 10], seed=0).num_parameters()
    9610
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        *,
        bias: bool = True,
        init: str | None = None,
        seed: int = 0,
        dtype: str = "float32",
        backend: Backend | str | None = None,
        device: Any = None,
    ) -> None:
        sizes = _check_sizes(sizes)
        if not isinstance(activation, str):
            raise TypeError(
                f"activation must be a name, one of {', '.join(ACTIVATIONS)}; got {activation!r}"
            )
        key = activation.strip().lower().replace("-", "_")
        if key not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}"
            )
        if init is None:
            init = "xavier" if key in ("sigmoid", "tanh") else "he"
        rng = np.random.default_rng(check_seed(seed))
        target = resolve_backend(backend, device)
        layers: list[Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(
                Linear(fan_in, fan_out, bias=bias, init=init, seed=rng, dtype=dtype, backend=target)
            )
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[key]())
        super().__init__(*layers)
        self.sizes = sizes
        self.activation = key
        self.bias = bias
        self.init = init

    def config(self) -> dict[str, Any]:
        return {
            "type": "MLP",
            "sizes": list(self.sizes),
            "activation": self.activation,
            "bias": self.bias,
            "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        if len(self.sizes) == 2:  # one Linear layer: no activation is applied
            return f"MLP({self.sizes}, dtype={self.dtype!r})"
        return f"MLP({self.sizes}, activation={self.activation!r}, dtype={self.dtype!r})"


def _check_sizes(sizes: Any) -> list[int]:
    """Layer widths as Python ints; 2.7 or True is refused, not rounded."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of layer widths, got {sizes!r}")
    if len(sizes) < 2 or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in sizes
    ):
        raise ValueError(f"sizes must list at least two positive integer widths, got {sizes!r}")
    return [int(w) for w in sizes]


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    r"""The parameters' names and shapes of the module :meth:`Module.config` describes.

    Nothing is allocated, so a description can be checked against stored arrays (a
    checkpoint) before the model is built.

    Raises
    ------
    ValueError
        If the description is malformed (wrong types, unknown layer or activation,
        non-positive or fractional widths, nesting deeper than 100 levels).
    """
    return _param_shapes(config, 0)


def _param_shapes(config: Any, depth: int) -> dict[str, tuple[int, ...]]:
    if not isinstance(config, Mapping):
        raise ValueError(
            f"malformed model description: expected a dict, got {type(config).__name__}"
        )
    if depth > 100:
        raise ValueError("malformed model description: nested more than 100 levels deep")
    kind = config.get("type")
    dtype = config.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"malformed model description: dtype must be one of {_FLOAT_DTYPES}, got {dtype!r}"
        )
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"malformed model description: bias must be true or false, got {bias!r}")
    try:
        if kind == "MLP":
            sizes = _check_sizes(config.get("sizes"))
            act = config.get("activation")
            if not isinstance(act, str) or act not in ACTIVATIONS:
                raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
            shapes: dict[str, tuple[int, ...]] = {}
            for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
                shapes[f"{2 * i}.W"] = (fan_in, fan_out)
                if bias:
                    shapes[f"{2 * i}.b"] = (fan_out,)
            return shapes
        if kind in ("Linear", "LinearCrossEntropy"):
            width = "out_features" if kind == "Linear" else "num_classes"
            fan_in, fan_out = _check_sizes([config.get("in_features"), config.get(width)])
            return {"W": (fan_in, fan_out), **({"b": (fan_out,)} if bias else {})}
        if kind == "LeakyReLU":
            slope = config.get("negative_slope")
            if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not slope > 0:
                raise ValueError(f"negative_slope must be a positive number, got {slope!r}")
            return {}
        if isinstance(kind, str) and kind in {c.__name__ for c in ACTIVATIONS.values()}:
            return {}
        if kind == "Sequential":
            layers = config.get("layers")
            if not isinstance(layers, list) or not layers:
                raise ValueError("layers must be a non-empty list")
            shapes = {}
            for i, layer in enumerate(layers):
                for name, shape in _param_shapes(layer, depth + 1).items():
                    shapes[f"{i}.{name}"] = shape
            return shapes
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed model description of type {kind!r}: {exc}") from None
    raise ValueError(f"unknown model type {kind!r} in model description")


def from_config(
    config: Mapping[str, Any],
    *,
    dtype: str | None = None,
    backend: Backend | str | None = None,
    device: Any = None,
) -> Module:
    r"""Rebuild a module from :meth:`Module.config` (weights freshly initialised).

    Raises
    ------
    ValueError
        If the description is not one gradcore wrote.
    """
    param_shapes(config)  # a malformed description is refused before anything is built
    try:
        kind = config["type"]
        dt = dtype or config.get("dtype", "float32")
        if kind == "MLP":
            return MLP(
                config["sizes"],
                config["activation"],
                bias=bool(config.get("bias", True)),
                dtype=dt,
                backend=backend,
                device=device,
            )
        if kind == "Linear":
            return Linear(
                int(config["in_features"]),
                int(config["out_features"]),
                bias=bool(config.get("bias", True)),
                dtype=dt,
                backend=backend,
                device=device,
            )
        if kind == "LinearCrossEntropy":
            return LinearCrossEntropy(
                int(config["in_features"]),
                int(config["num_classes"]),
                bias=bool(config.get("bias", True)),
                label_smoothing=float(config.get("label_smoothing", 0.0)),
                z_loss=float(config.get("z_loss", 0.0)),
                softcap=config.get("softcap"),
                chunk_size=config.get("chunk_size"),
                dtype=dt,
                backend=backend,
                device=device,
            )
        if kind == "LeakyReLU":
            return LeakyReLU(float(config["negative_slope"]))
        for layer_cls in ACTIVATIONS.values():
            if kind == layer_cls.__name__:
                return layer_cls()
        if kind == "Sequential":
            layers = [
                from_config(c, dtype=dtype, backend=backend, device=device)
                for c in config["layers"]
            ]
            return Sequential(*layers)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed model description {dict(config)!r}: {exc}") from None
    raise ValueError(f"unknown model type {kind!r} in model description")
