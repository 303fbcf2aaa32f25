"""Optimizers and learning-rate schedules against torch.optim, update for update."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradcore
from gradcore import optim
from gradcore.testing import assert_close

torch = pytest.importorskip("torch")

SHAPES = {"W": (4, 3), "b": (3,)}

CONFIGS = [
    ("sgd", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    ),
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
    ),
    ("adam", {"lr": 0.01}, torch.optim.Adam, {"lr": 0.01}),
    (
        "adam",
        {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
        torch.optim.Adam,
        {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    ),
    ("adamw", {"lr": 0.01}, torch.optim.AdamW, {"lr": 0.01}),
    (
        "adamw",
        {"lr": 0.03, "weight_decay": 0.5},
        torch.optim.AdamW,
        {"lr": 0.03, "weight_decay": 0.5},
    ),
]
IDS = [f"{name}-{i}" for i, (name, *_rest) in enumerate(CONFIGS)]


def _problem(seed=0, steps=6):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]
    return params, grads


def _torch_trajectory(torch_cls, torch_kwargs, params, grads, scheduler=None):
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch_cls(list(tensors.values()), foreach=False, **torch_kwargs)
    sched = scheduler(opt) if scheduler else None
    out = []
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        opt.step()
        if sched is not None:
            sched.step()
        out.append({k: t.detach().numpy().copy() for k, t in tensors.items()})
    return out


@pytest.mark.parametrize(("name", "kwargs", "torch_cls", "torch_kwargs"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["generic", "inplace"])
def test_matches_torch_optim(name, kwargs, torch_cls, torch_kwargs, inplace):
    params, grads = _problem()
    expected = _torch_trajectory(torch_cls, torch_kwargs, params, grads)
    opt = optim.get(name, **kwargs)
    p = {k: v.copy() for k, v in params.items()}
    state = opt.init(p)
    for step, (g, want) in enumerate(zip(grads, expected, strict=True)):
        p, state = opt.update(p, g, state, inplace=inplace)
        assert state["step"] == step + 1
        for k in SHAPES:
            np.testing.assert_allclose(p[k], want[k], rtol=1e-13, atol=1e-15, err_msg=f"{k}@{step}")


@pytest.mark.parametrize("index", [1, 2, 5, 7], ids=[IDS[i] for i in (1, 2, 5, 7)])
def test_generic_update_on_every_backend(backend, index):
    name, kwargs, torch_cls, torch_kwargs = CONFIGS[index]
    params, grads = _problem(seed=1, steps=3)
    expected = _torch_trajectory(torch_cls, torch_kwargs, params, grads)
    opt = optim.get(name, **kwargs)
    p = {k: backend.asarray(v) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        # Read-only NumPy arrays prove the generic update never writes into them.
        p, state = opt.update(p, {k: backend.asarray(v) for k, v in g.items()}, state)
    for k in SHAPES:
        assert_close(p[k], expected[-1][k], xp=backend.xp, rtol=1e-12, atol=1e-15)


def test_inplace_writes_into_the_arrays_and_generic_does_not():
    params, grads = _problem(steps=1)
    opt = optim.Adam(lr=0.1)
    p = {k: v.copy() for k, v in params.items()}
    state = opt.init(p)
    new, _ = opt.update(p, grads[0], state)
    assert new["W"] is not p["W"]
    np.testing.assert_array_equal(p["W"], params["W"])
    new, new_state = opt.update(p, grads[0], state, inplace=True)
    assert new["W"] is p["W"]
    assert new_state["m"]["W"] is state["m"]["W"]
    assert not np.array_equal(p["W"], params["W"])


def test_inplace_falls_back_for_read_only_and_immutable_arrays():
    params, grads = _problem(steps=1)
    p = {k: v.copy() for k, v in params.items()}
    for v in p.values():
        v.flags.writeable = False
    opt = optim.SGD(lr=0.1, momentum=0.9)
    new, _ = opt.update(p, grads[0], opt.init(p), inplace=True)
    np.testing.assert_allclose(new["W"], params["W"] - 0.1 * grads[0]["W"], rtol=1e-15)


# --- schedules ----------------------------------------------------------------------------


def test_step_schedule_matches_torch_steplr():
    sched = optim.step(0.5, step_size=3, gamma=0.5)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.5)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for t in range(12):
        assert sched(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-14)
        opt.step()
        ref.step()


def test_cosine_schedule_matches_torch_cosine_annealing():
    sched = optim.cosine(0.1, total_steps=10, min_lr=0.01)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    for t in range(10):
        assert sched(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        ref.step()
    assert sched(10) == sched(50) == 0.01
    assert optim.constant(0.3)(1000) == 0.3


def test_scheduled_updates_match_torch_with_a_scheduler():
    params, grads = _problem(seed=2, steps=8)
    expected = _torch_trajectory(
        torch.optim.Adam,
        {"lr": 0.05},
        params,
        grads,
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
    )
    opt = optim.Adam(lr=optim.cosine(0.05, total_steps=8))
    p = {k: v.copy() for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        p, state = opt.update(p, g, state)
    np.testing.assert_allclose(p["W"], expected[-1]["W"], rtol=1e-12)
    assert opt.lr_at(4) == pytest.approx(0.05 * (1 + math.cos(math.pi / 2)) / 2)


# --- states and errors ------------------------------------------------------------------


def test_init_state_layout():
    params, _ = _problem()
    assert optim.SGD(lr=0.1).init(params) == {"step": 0}
    st = optim.SGD(lr=0.1, momentum=0.5).init(params)
    assert sorted(st) == ["momentum", "step"]
    st = optim.AdamW().init(params)
    assert sorted(st) == ["m", "step", "v"]
    assert np.all(st["m"]["W"] == 0)
    assert st["v"]["b"].shape == (3,)


def test_check_state_names_the_mismatch():
    params, _ = _problem()
    adam_state = optim.Adam().init(params)
    with pytest.raises(ValueError, match="another optimizer"):
        optim.SGD(lr=0.1, momentum=0.9).check_state(adam_state, params)
    with pytest.raises(ValueError, match="parameters"):
        optim.Adam().check_state(adam_state, {"W": params["W"]})
    bad = {**adam_state, "m": {**adam_state["m"], "W": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        optim.Adam().check_state(bad, params)
    optim.Adam().check_state(adam_state, params)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.get("rmsprop")
    with pytest.raises(ValueError, match="lr"):
        optim.SGD(lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="step_size"):
        optim.step(0.1, step_size=0)
    params, grads = _problem(steps=1)
    opt = optim.SGD(lr=0.1)
    with pytest.raises(ValueError, match="grads"):
        opt.update(params, {"W": grads[0]["W"]}, opt.init(params))


def test_state_to_moves_buffers():
    params, _ = _problem()
    state = optim.Adam().init(params)
    moved = optim.state_to(state, gradcore.backend("torch"))
    assert moved["step"] == 0
    assert isinstance(moved["m"]["W"], torch.Tensor)


def test_optimizer_unpacks_into_init_and_update():
    params, grads = _problem(steps=1)
    init, update = optim.SGD(lr=0.5)
    new, state = update(params, grads[0], init(params))
    np.testing.assert_allclose(new["b"], params["b"] - 0.5 * grads[0]["b"], rtol=1e-15)
    assert state == {"step": 1}


def test_schedule_start_shifts_the_count():
    # A schedule that begins at update 10 gives updates 10, 15, 20 the rates a fresh
    # one gives updates 0, 5, 10 (closed forms, not the code under test).
    s = optim.Schedule("cosine", 0.2, total_steps=10, start=10)
    assert s(3) == 0.2  # before its start: the initial rate
    assert s(10) == 0.2
    assert s(15) == pytest.approx(0.1)
    assert s(20) == 0.0
    st = optim.Schedule("step", 1.0, step_size=2, gamma=0.5, start=4)
    assert [st(t) for t in (4, 5, 6, 8)] == [1.0, 1.0, 0.5, 0.25]


def test_check_state_refuses_bad_step_and_non_finite_buffers():
    params = {"w": np.ones(3)}
    opt = optim.Adam()
    state = opt.init(params)
    opt.check_state(state, params)
    for step in (-5, True, 1.5, "1"):
        with pytest.raises(ValueError, match="'step' must be an integer >= 0"):
            opt.check_state({**state, "step": step}, params)
    with pytest.raises(ValueError, match=r"m\['w'\] must be finite"):
        opt.check_state({**state, "m": {"w": np.array([0.0, np.nan, 0.0])}}, params)
    with pytest.raises(ValueError, match="must map parameter names"):
        opt.check_state({**state, "v": 5}, params)
    with pytest.raises(TypeError, match="optimizer_state must be a dict"):
        optim.state_to([1, 2], gradcore.backend("numpy"))
