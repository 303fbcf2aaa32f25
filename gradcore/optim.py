r"""Optimizers as ``(init, update)`` pairs over dicts of arrays, and learning-rate schedules.

An optimizer never holds arrays itself. ``state = opt.init(params)`` makes its state
(buffers shaped like the parameters, and the step count), and
``params, state = opt.update(params, grads, state)`` returns new parameters and a new
state. The generic update uses only array-API arithmetic, so it runs on every backend;
with ``inplace=True`` NumPy, CuPy and PyTorch arrays are updated in place instead
(fewer temporary arrays, the same numbers).

The update rules are PyTorch's (``torch.optim.SGD``, ``Adam``, ``AdamW``), operation
for operation, so a model trained here follows the same loss curve as one trained by
PyTorch from the same weights and batches.

Examples
--------
>>> import numpy as np
>>> from gradcore import optim
>>> opt = optim.Adam(lr=1e-3)
>>> params = {"W": np.ones((2, 2))}
>>> state = opt.init(params)
>>> params, state = opt.update(params, {"W": np.full((2, 2), 0.5)}, state)
>>> state["step"]
1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from ._namespace import Backend, get_namespace

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "Optimizer",
    "Schedule",
    "constant",
    "cosine",
    "get",
    "state_to",
    "step",
]

Params = dict[str, Any]
State = dict[str, Any]


# --- learning-rate schedules ------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    r"""A learning rate as a function of the number of updates already made.

    Use :func:`constant`, :func:`step` or :func:`cosine` to make one.

    Attributes
    ----------
    kind : {"constant", "step", "cosine"}
    lr : float
        The initial learning rate.
    step_size : int
        ("step") Updates between two decays.
    gamma : float
        ("step") The decay factor.
    total_steps : int
        ("cosine") Updates over which the rate falls from ``lr`` to ``min_lr``.
    min_lr : float
        ("cosine") The final rate, kept after ``total_steps``.
    start : int
        The update count at which the schedule begins (its ``t = 0``); before it the
        rate is the initial one. Continuing a run from a checkpoint whose optimizer
        made ``k`` updates, ``start=k`` runs the schedule afresh.
    """

    kind: str
    lr: float
    step_size: int = 1
    gamma: float = 0.1
    total_steps: int = 1
    min_lr: float = 0.0
    start: int = 0

    def __call__(self, t: int) -> float:
        t = max(t - self.start, 0)
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            if t >= self.total_steps:
                return self.min_lr
            return (
                self.min_lr
                + (self.lr - self.min_lr) * (1 + math.cos(math.pi * t / self.total_steps)) / 2
            )
        raise ValueError(f"unknown schedule kind {self.kind!r}")

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "total_steps": self.total_steps,
            "min_lr": self.min_lr,
            "start": self.start,
        }


def _check_lr(lr: float, label: str = "lr") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0 or math.isinf(lr):
        raise ValueError(f"{label} must be a finite non-negative number, got {lr!r}")
    return float(lr)


def constant(lr: float) -> Schedule:
    """The same learning rate at every update."""
    return Schedule("constant", _check_lr(lr))


def step(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    r"""``lr * gamma ** (t // step_size)`` at update ``t`` (``torch.optim.lr_scheduler.StepLR``)."""
    if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
        raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
    return Schedule("step", _check_lr(lr), step_size=step_size, gamma=_check_lr(gamma, "gamma"))


def cosine(lr: float, total_steps: int, min_lr: float = 0.0) -> Schedule:
    r"""Cosine annealing from ``lr`` to ``min_lr`` over ``total_steps`` updates.

    :math:`\eta_t = \eta_{min} + (\eta - \eta_{min})(1 + \cos(\pi t / T)) / 2` for
    :math:`t < T` (``torch.optim.lr_scheduler.CosineAnnealingLR`` over its first half
    period), then ``min_lr``.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return Schedule(
        "cosine", _check_lr(lr), total_steps=total_steps, min_lr=_check_lr(min_lr, "min_lr")
    )


def _as_schedule(lr: float | Schedule | Callable[[int], float]) -> Callable[[int], float]:
    if isinstance(lr, Schedule) or callable(lr):
        return lr
    return constant(lr)


# --- optimizers ---------------------------------------------------------------------------


def _inplace_ok(
    params: Mapping[str, Any], state: Mapping[str, Any], buffers: tuple[str, ...]
) -> bool:
    """Whether the parameters and buffers are writable NumPy, CuPy or PyTorch arrays."""
    arrays = list(params.values())
    for buf in buffers:
        arrays.extend(state[buf].values())
    for p in arrays:
        if array_api_compat.is_numpy_array(p):
            if not p.flags.writeable:
                return False
        elif not (array_api_compat.is_cupy_array(p) or array_api_compat.is_torch_array(p)):
            return False
    return True


class Optimizer:
    r"""Base class: ``init(params) -> state`` and ``update(params, grads, state)``.

    The state is a dict with the number of updates made (``"step"``, a Python int) and
    one dict of arrays per buffer (``"momentum"``; ``"m"`` and ``"v"``), keyed like the
    parameters.
    """

    #: Names of the per-parameter buffers in the state.
    buffers: tuple[str, ...] = ()
    name = "optimizer"

    def __init__(self, lr: float | Schedule | Callable[[int], float]) -> None:
        if not callable(lr):
            lr = _check_lr(lr)
        self.lr = lr
        self._schedule = _as_schedule(lr)

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        """``init, update = optimizer``: the optimizer as its two functions."""
        return iter((self.init, self.update))

    def lr_at(self, t: int) -> float:
        """The learning rate of update number ``t`` (counted from 0)."""
        return float(self._schedule(t))

    def init(self, params: Mapping[str, Any]) -> State:
        """The initial state for ``params``: zero buffers and step 0."""
        state: State = {"step": 0}
        for buf in self.buffers:
            state[buf] = {}
            for name, p in params.items():
                xp = get_namespace(p)
                state[buf][name] = xp.zeros(
                    p.shape, dtype=p.dtype, device=array_api_compat.device(p)
                )
        return state

    def check_state(self, state: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        r"""Raise ValueError if ``state`` was not made for these parameters by this optimizer."""
        if not isinstance(state, Mapping) or "step" not in state:
            raise ValueError("optimizer state must be a dict with a 'step' entry")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"optimizer state 'step' must be an integer >= 0, got {step!r}")
        got = sorted(k for k in state if k != "step")
        if got != sorted(self.buffers):
            raise ValueError(
                f"optimizer state has buffers {got} but {self!r} needs {sorted(self.buffers)}; "
                "was it saved with another optimizer?"
            )
        for buf in self.buffers:
            if not isinstance(state[buf], Mapping):
                raise ValueError(
                    f"optimizer state buffer {buf!r} must map parameter names to arrays, "
                    f"got {type(state[buf]).__name__}"
                )
            names = set(state[buf])
            if names != set(params):
                raise ValueError(
                    f"optimizer state buffer {buf!r} is for parameters {sorted(names)}, "
                    f"but the model has {sorted(params)}"
                )
            for name, p in params.items():
                got_shape = tuple(int(s) for s in state[buf][name].shape)
                want = tuple(int(s) for s in p.shape)
                if got_shape != want:
                    raise ValueError(
                        f"optimizer state {buf}[{name!r}] has shape {got_shape}, expected {want}"
                    )
                arr = state[buf][name]
                sxp = get_namespace(arr)
                if not sxp.isdtype(arr.dtype, "real floating") or not bool(
                    sxp.all(sxp.isfinite(arr))
                ):
                    raise ValueError(
                        f"optimizer state {buf}[{name!r}] must be finite real numbers "
                        f"(dtype {arr.dtype})"
                    )

    def update(
        self,
        params: Mapping[str, Any],
        grads: Mapping[str, Any],
        state: Mapping[str, Any],
        *,
        inplace: bool = False,
    ) -> tuple[Params, State]:
        r"""One update: new parameters and new state.

        Parameters
        ----------
        params, grads : dict of str to array
            The parameters and their gradients, with the same names.
        state : dict
            From :meth:`init` or the previous update.
        inplace : bool
            Write into ``params`` and the state's buffers when they are writable
            NumPy, CuPy or PyTorch arrays (the generic update runs otherwise). The
            returned dicts then hold the same arrays.

        Returns
        -------
        params, state : dict
        """
        if set(grads) != set(params):
            raise ValueError(f"grads are for {sorted(grads)} but params are {sorted(params)}")
        t = int(state["step"])
        lr = self.lr_at(t)
        new_state: State = {"step": t + 1}
        fast = inplace and _inplace_ok(params, state, self.buffers)
        new_params, buffers = self._apply(
            params, grads, state, t == 0, self._scalars(t, lr), inplace=fast
        )
        new_state.update(buffers)
        return new_params, new_state

    def _scalars(self, t: int, lr: float) -> dict[str, float]:
        """The update's step-dependent numbers, computed on the host in float64.

        Kept apart from the array arithmetic so that a compiled update (``jax.jit``)
        can take them as arguments and see the same values as the eager one.
        """
        return {"lr": lr}

    def _apply(
        self,
        params: Mapping[str, Any],
        grads: Mapping[str, Any],
        state: Mapping[str, Any],
        first: bool,
        scalars: Mapping[str, Any],
        *,
        inplace: bool = False,
    ) -> tuple[Params, dict[str, dict[str, Any]]]:
        """The array part of :meth:`update`: new parameters and buffers."""
        rule = self._rule_inplace if inplace else self._rule
        new_params: Params = {}
        buffers: dict[str, dict[str, Any]] = {buf: {} for buf in self.buffers}
        for name, p in params.items():
            bufs = {buf: state[buf][name] for buf in self.buffers}
            new_p, new_bufs = rule(p, grads[name], bufs, first, scalars)
            new_params[name] = new_p
            for buf, value in new_bufs.items():
                buffers[buf][name] = value
        return new_params, buffers

    def _rule(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def _rule_inplace(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        return self._rule(p, g, bufs, first, s)

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description (``lr`` as a schedule's config if scheduled)."""
        lr = self.lr.config() if isinstance(self.lr, Schedule) else self.lr
        return {"name": self.name, "lr": lr}


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay.

    Parameters
    ----------
    lr : float or Schedule or callable
        Learning rate, or a function of the update count.
    momentum : float
        Momentum factor :math:`\mu` (0 disables the buffer).
    dampening : float
        Dampening :math:`\tau` of the momentum.
    nesterov : bool
        Use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
    weight_decay : float
        L2 penalty :math:`\lambda` added to the gradient.

    Notes
    -----
    With :math:`g \leftarrow g + \lambda p`, the momentum buffer is :math:`b_1 = g` at
    the first update and :math:`b_t = \mu b_{t-1} + (1 - \tau) g` afterwards; the step
    direction is :math:`d = g + \mu b_t` (Nesterov) or :math:`d = b_t`, and
    :math:`p \leftarrow p - \eta d` — ``torch.optim.SGD``'s rule.
    """

    name = "sgd"

    def __init__(
        self,
        lr: float | Schedule | Callable[[int], float] = 0.01,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr)
        self.momentum = _check_lr(momentum, "momentum")
        self.dampening = _check_lr(dampening, "dampening")
        self.weight_decay = _check_lr(weight_decay, "weight_decay")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening == 0")
        self.buffers = ("momentum",) if self.momentum else ()

    def _rule(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        lr = s["lr"]
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not self.momentum:
            return p - lr * g, {}
        if first:
            buf = g
        elif self.dampening:
            buf = self.momentum * bufs["momentum"] + (1 - self.dampening) * g
        else:
            buf = bufs["momentum"] * self.momentum + g
        d = g + self.momentum * buf if self.nesterov else buf
        return p - lr * d, {"momentum": buf}

    def _rule_inplace(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        lr = s["lr"]
        if self.weight_decay:
            g = g + self.weight_decay * p
        if not self.momentum:
            p -= lr * g
            return p, {}
        buf = bufs["momentum"]
        if first:
            buf[...] = g
        else:
            buf *= self.momentum
            if self.dampening:
                buf += (1 - self.dampening) * g
            else:
                buf += g
        if self.nesterov:
            d = g + self.momentum * buf
            d *= lr
        else:
            d = lr * buf
        p -= d
        return p, {"momentum": buf}

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }

    def __repr__(self) -> str:
        return (
            f"SGD(lr={self.lr!r}, momentum={self.momentum}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay})"
        )


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), with L2 weight decay added to the gradient.

    Parameters
    ----------
    lr : float or Schedule or callable
        Learning rate :math:`\eta`.
    betas : (float, float)
        Decay rates :math:`\beta_1, \beta_2` of the first and second moments.
    eps : float
        Added to the denominator.
    weight_decay : float
        L2 penalty :math:`\lambda` added to the gradient (see :class:`AdamW` for the
        decoupled form).

    Notes
    -----
    At update :math:`t = 1, 2, \ldots`: :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2`, and
    :math:`p \leftarrow p - \frac{\eta}{1-\beta_1^t}\,
    \frac{m_t}{\sqrt{v_t} / \sqrt{1-\beta_2^t} + \epsilon}` — ``torch.optim.Adam``.
    """

    name = "adam"
    buffers = ("m", "v")
    _decoupled = False

    def __init__(
        self,
        lr: float | Schedule | Callable[[int], float] = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr)
        b1, b2 = (float(b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        self.betas = (b1, b2)
        self.eps = _check_lr(eps, "eps")
        self.weight_decay = _check_lr(weight_decay, "weight_decay")

    def _scalars(self, t: int, lr: float) -> dict[str, float]:
        b1, b2 = self.betas
        n = t + 1
        return {
            "decay": 1 - lr * self.weight_decay,
            "step_size": lr / (1 - b1**n),
            "bc2_sqrt": math.sqrt(1 - b2**n),
        }

    def _rule(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        b1, b2 = self.betas
        if self.weight_decay:
            if self._decoupled:
                p = p * s["decay"]
            else:
                g = g + self.weight_decay * p
        # m + (1-b1)(g-m) is torch's lerp, kept for bit-level agreement.
        m = bufs["m"] + (1 - b1) * (g - bufs["m"])
        v = bufs["v"] * b2 + (1 - b2) * (g * g)
        denom = get_namespace(v).sqrt(v) / s["bc2_sqrt"] + self.eps
        return p - s["step_size"] * (m / denom), {"m": m, "v": v}

    def _rule_inplace(
        self, p: Any, g: Any, bufs: dict[str, Any], first: bool, s: Mapping[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        b1, b2 = self.betas
        if self.weight_decay:
            if self._decoupled:
                p *= s["decay"]
            else:
                g = g + self.weight_decay * p
        m, v = bufs["m"], bufs["v"]
        delta = g - m
        delta *= 1 - b1
        m += delta
        v *= b2
        v += (1 - b2) * (g * g)
        step_size = s["step_size"]
        denom = get_namespace(v).sqrt(v)
        denom /= s["bc2_sqrt"]
        denom += self.eps
        ratio = m / denom
        ratio *= step_size
        p -= ratio
        return p, {"m": m, "v": v}

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr!r}, betas={self.betas}, eps={self.eps}, "
            f"weight_decay={self.weight_decay})"
        )


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter).

    Notes
    -----
    Before the Adam step the parameters shrink, :math:`p \leftarrow p(1 - \eta\lambda)`,
    instead of :math:`\lambda p` being added to the gradient — ``torch.optim.AdamW``.
    The default ``weight_decay`` is 0.01, as in PyTorch.
    """

    name = "adamw"
    _decoupled = True

    def __init__(
        self,
        lr: float | Schedule | Callable[[int], float] = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(lr, betas=betas, eps=eps, weight_decay=weight_decay)


_OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get(name: str | Optimizer, **kwargs: Any) -> Optimizer:
    r"""The optimizer called ``name`` ("sgd", "adam", "adamw"), made with ``kwargs``.

    An :class:`Optimizer` is returned as it is.
    """
    if isinstance(name, Optimizer):
        return name
    if not isinstance(name, str) or name.strip().lower() not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(_OPTIMIZERS)}")
    return _OPTIMIZERS[name.strip().lower()](**kwargs)


def state_to(state: Mapping[str, Any], backend: Backend, dtype: Any = None) -> State:
    r"""A copy of an optimizer state with every array moved to ``backend``.

    Use it to continue training on another backend (a checkpoint loads on NumPy).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"optimizer_state must be a dict, got {type(state).__name__}")
    out: State = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            out[key] = {name: backend.asarray(arr, dtype=dtype) for name, arr in value.items()}
        else:
            out[key] = value
    return out
