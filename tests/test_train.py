"""Training: the same numbers on every backend and as pure PyTorch, models that learn,
errors before and during training, checkpoints across backends."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import gradcore
from gradcore import data, nn, optim
from gradcore.testing import assert_close
from gradcore.train import NonFiniteLossError, evaluate, fit, load, save

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spirals(n=150, seed=0):
    return data.spirals(n, classes=3, noise=0.2, seed=seed)


# --- the same numbers everywhere -----------------------------------------------------------


def test_numpy_and_torch_through_gradcore_give_the_same_losses():
    X, y = _spirals(150)
    runs = {}
    for name in ("numpy", "torch"):
        model = nn.MLP([2, 32, 32, 3], seed=7, dtype="float64")
        h = fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer=optim.Adam(lr=0.01),
            epochs=5,
            batch_size=25,
            backend=name,
            progress=False,
        )
        runs[name] = (h, model)
    assert len(runs["numpy"][0].step_loss) == 30
    np.testing.assert_allclose(runs["torch"][0].step_loss, runs["numpy"][0].step_loss, rtol=1e-10)
    assert isinstance(runs["torch"][1].state_dict()["0.W"], torch.Tensor)
    for k, v in runs["numpy"][1].state_dict().items():
        np.testing.assert_allclose(
            gradcore.to_numpy(runs["torch"][1].state_dict()[k]), v, rtol=1e-9
        )


def test_every_backend_follows_numpy(backend):
    if backend.name == "dask":
        pytest.skip("Dask builds a task graph per operation; one step is in test_nn")
    X, y = _spirals(60, seed=1)
    ref = nn.MLP([2, 8, 3], seed=2, dtype="float64")
    expected = fit(
        ref,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.SGD(0.1, momentum=0.9),
        epochs=2,
        batch_size=20,
        progress=False,
    )
    model = nn.MLP([2, 8, 3], seed=2, dtype="float64")
    h = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.SGD(0.1, momentum=0.9),
        epochs=2,
        batch_size=20,
        backend=backend,
        progress=False,
    )
    np.testing.assert_allclose(h.step_loss, expected.step_loss, rtol=1e-10)
    for k, v in ref.state_dict().items():
        assert_close(model.state_dict()[k], v, xp=backend.xp, rtol=1e-9, atol=1e-14)


def _torch_reference(model, X, y, make_opt, epochs, batch_size, seed):
    """Pure PyTorch: torch.nn layers with the same weights, autograd, torch.optim."""
    layers = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            t = torch.nn.Linear(layer.in_features, layer.out_features).double()
            with torch.no_grad():
                t.weight.copy_(torch.tensor(np.asarray(layer.state_dict()["W"]).T))
                t.bias.copy_(torch.tensor(np.asarray(layer.state_dict()["b"])))
            layers.append(t)
        else:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = make_opt(net.parameters())
    rng = np.random.default_rng(seed)  # fit's documented batch order
    n = X.shape[0]
    losses = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(
                net(torch.tensor(X[idx])), torch.tensor(y[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda: optim.SGD(0.05, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
        ),
        (
            lambda: optim.Adam(0.01),
            lambda p: torch.optim.Adam(p, lr=0.01, foreach=False),
        ),
        (
            lambda: optim.AdamW(0.01, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
        ),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_same_loss_curve_as_pure_pytorch(ours, theirs):
    X, y = _spirals(200, seed=3)
    model = nn.MLP([2, 16, 16, 3], seed=5, dtype="float64")
    expected = _torch_reference(model, X, y, theirs, epochs=5, batch_size=20, seed=9)
    h = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer=ours(),
        epochs=5,
        batch_size=20,
        seed=9,
        progress=False,
    )
    assert len(expected) == len(h.step_loss) == 50
    np.testing.assert_allclose(h.step_loss, expected, rtol=1e-8)
    assert h.step_loss[-1] < 0.8 * h.step_loss[0]


# --- models that learn ---------------------------------------------------------------------


def test_digits_mlp_reaches_95_percent():
    pytest.importorskip("sklearn")
    X, y = data.digits()
    X_train, X_test, y_train, y_test = data.train_test_split(X, y, test_size=0.25, seed=0)
    X_train, mean, std = data.standardize(X_train)
    X_test, _, _ = data.standardize(X_test, mean=mean, std=std)
    model = nn.MLP([64, 64, 10], seed=0)
    h = fit(
        model,
        X_train,
        y_train,
        loss="cross_entropy",
        optimizer=optim.Adam(0.01),
        epochs=10,
        batch_size=32,
        validation=(X_test, y_test),
        progress=False,
    )
    accuracy = np.mean(np.argmax(model.predict(X_test.astype(np.float32)), axis=1) == y_test)
    assert accuracy >= 0.95
    assert h.val_accuracy[-1] == pytest.approx(accuracy)


def test_spirals_mlp_reaches_95_percent():
    X, y = data.spirals(900, classes=3, noise=0.2, seed=0)
    X_train, X_test, y_train, y_test = data.train_test_split(X, y, seed=0)
    model = nn.MLP([2, 64, 64, 3], seed=0)
    h = fit(
        model,
        X_train,
        y_train,
        loss="cross_entropy",
        optimizer=optim.Adam(0.01),
        epochs=25,
        batch_size=32,
        validation=(X_test, y_test),
        progress=False,
    )
    accuracy = np.mean(np.argmax(model.predict(X_test), axis=1) == y_test)
    assert accuracy >= 0.95
    assert h.accuracy[-1] >= 0.95
    assert h.loss[-1] < h.loss[0] / 5


def test_linear_regression_recovers_w_and_b():
    w, b = np.array([2.0, -3.4]), 4.2
    X, y = data.linear(1000, w=w, b=b, noise=0.01, seed=0)
    model = nn.MLP([2, 1], dtype="float64", seed=0)
    h = fit(
        model,
        X,
        y,
        loss="mse",
        optimizer=optim.SGD(0.05, momentum=0.9),
        epochs=10,
        batch_size=32,
        progress=False,
    )
    params = model.state_dict()
    np.testing.assert_allclose(params["0.W"].ravel(), w, atol=1e-2)
    np.testing.assert_allclose(params["0.b"], [b], atol=1e-2)
    assert h.accuracy == [None] * 10
    assert h.loss[-1] < 1e-3


# --- history, progress, errors -------------------------------------------------------------


def test_history_and_callback(capsys):
    X, y = _spirals(90)
    seen = []
    h = fit(
        nn.MLP([2, 8, 3]),
        X,
        y,
        loss="cross_entropy",
        optimizer="adam",
        epochs=3,
        batch_size=32,
        validation=(X[:30], y[:30]),
        callback=lambda e, hist: seen.append(e),
    )
    assert seen == [1, 2, 3]
    assert h.epoch == [1, 2, 3]
    assert len(h) == 3
    assert len(h.step_loss) == 9  # 90 samples, batches of 32, 32, 26
    expected = [
        (32 * h.step_loss[3 * e] + 32 * h.step_loss[3 * e + 1] + 26 * h.step_loss[3 * e + 2]) / 90
        for e in range(3)
    ]
    np.testing.assert_allclose(h.loss, expected, rtol=1e-12)
    assert all(0 <= a <= 1 for a in h.accuracy + h.val_accuracy)
    assert h.optimizer_state["step"] == 9
    assert json.loads(json.dumps(h.to_dict()))["epoch"] == [1, 2, 3]
    # stderr is not a terminal under pytest: no progress bar.
    assert capsys.readouterr().err == ""


def test_validation_metrics_match_evaluate():
    X, y = _spirals(120)
    model = nn.MLP([2, 8, 3], dtype="float64")
    h = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer="sgd",
        epochs=1,
        batch_size=40,
        validation=(X, y),
        progress=False,
    )
    m = evaluate(model, X, y, loss="cross_entropy", batch_size=50)
    logits = model.predict(X)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert m["loss"] == pytest.approx(-logp[np.arange(120), y].mean(), rel=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(logits.argmax(axis=1) == y))
    assert h.val_loss[-1] == pytest.approx(m["loss"], rel=1e-12)


def test_diverging_loss_stops_with_the_step():
    X, y = _spirals(100)
    X = X * 1e3
    with np.errstate(all="ignore"), pytest.raises(NonFiniteLossError, match=r"at step (\d+)"):
        fit(
            nn.MLP([2, 16, 3]),
            X,
            y,
            loss="cross_entropy",
            optimizer=optim.SGD(1e6),
            epochs=5,
            batch_size=10,
            progress=False,
        )


def test_non_finite_step_is_named_exactly():
    calls = []

    def loss_fn(pred, target, xp=None):
        loss, grad = gradcore.mse(pred, target)
        calls.append(1)
        return (loss * np.nan if len(calls) == 4 else loss), grad

    X, y = data.linear(40, seed=0)
    with pytest.raises(NonFiniteLossError, match="nan at step 4 "):
        fit(
            nn.MLP([2, 1]),
            X,
            y,
            loss=loss_fn,
            optimizer="sgd",
            epochs=2,
            batch_size=10,
            progress=False,
        )


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.ones((5, 2)), np.zeros(4, dtype=int), "5 rows but y has 4"),
        (np.array([[1.0, np.nan]] * 3), np.zeros(3, dtype=int), "NaN"),
        (np.ones((3, 2)), np.array([0, 1, 7]), "labels go up to 7"),
        (np.ones((3, 2)), np.array([0.0, 0.5, 1.0]), "integer class labels"),
        (np.ones((3, 2)), np.array([0, -1, 1]), ">= 0"),
    ],
)
def test_bad_data_is_refused_before_training(X, y, message):
    model = nn.MLP([2, 3])
    before = model.state_dict()["0.W"].copy()
    with pytest.raises(ValueError, match=message):
        fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer="sgd",
            epochs=1,
            batch_size=2,
            progress=False,
        )
    np.testing.assert_array_equal(model.state_dict()["0.W"], before)


def test_bad_arguments_are_refused():
    X, y = _spirals(30)
    model = nn.MLP([2, 3])
    with pytest.raises(ValueError, match="unknown loss"):
        fit(model, X, y, loss="hinge", optimizer="sgd", epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, X, y, loss="cross_entropy", optimizer="sgd", epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="outputs"):
        fit(
            nn.MLP([2, 3]), X, np.ones((30, 2)), loss="mse", optimizer="sgd", epochs=1, batch_size=5
        )


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_saved_on_torch_loads_on_numpy(tmp_path):
    X, y = _spirals(120)
    model = nn.MLP([2, 16, 3], seed=1, dtype="float64", backend="torch")
    h = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.Adam(0.01),
        epochs=2,
        batch_size=30,
        progress=False,
    )
    path = save(tmp_path / "run", model, h.optimizer_state, meta={"epochs_done": 2})
    assert path.name == "run.npz"
    ckpt = load(path)
    assert ckpt.meta == {"epochs_done": 2}
    assert ckpt.optimizer_state["step"] == 8
    restored = ckpt.build_model("numpy")
    assert isinstance(restored.state_dict()["0.W"], np.ndarray)
    np.testing.assert_allclose(restored.predict(X), gradcore.to_numpy(model.predict(X)), rtol=1e-12)
    # Continuing from the loaded state on NumPy equals continuing on PyTorch.
    h_np = fit(
        restored,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.Adam(0.01),
        epochs=1,
        batch_size=30,
        seed=5,
        optimizer_state=ckpt.optimizer_state,
        progress=False,
    )
    h_t = fit(
        model,
        X,
        y,
        loss="cross_entropy",
        optimizer=optim.Adam(0.01),
        epochs=1,
        batch_size=30,
        seed=5,
        optimizer_state=h.optimizer_state,
        progress=False,
    )
    np.testing.assert_allclose(h_np.step_loss, h_t.step_loss, rtol=1e-10)
    assert h_np.optimizer_state["step"] == 12


def test_checkpoint_errors(tmp_path):
    model = nn.MLP([2, 4, 3])
    path = save(tmp_path / "a.npz", model)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load(tmp_path / "junk.npz")
    blob = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", X=np.ones(3))
    with pytest.raises(ValueError, match="not a gradcore checkpoint"):
        load(tmp_path / "other.npz")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("extra.npy", b"")
    with pytest.raises(ValueError):
        load(path)
    good = save(tmp_path / "b.npz", model)
    with pytest.raises(ValueError, match=r"missing 4\.W, 4\.b"):
        nn.MLP([2, 4, 4, 3]).load_state_dict(load(good).params)
    with pytest.raises(ValueError, match="shape"):
        nn.MLP([2, 5, 3]).load_state_dict(load(good).params)
    h_state = optim.SGD(0.1, momentum=0.9).init(model.state_dict())
    save(good, model, h_state)
    X, y = _spirals(30)
    with pytest.raises(ValueError, match="another optimizer"):
        fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer="adam",
            epochs=1,
            batch_size=10,
            optimizer_state=load(good).optimizer_state,
            progress=False,
        )


@pytest.mark.gpu
def test_cupy_training_matches_numpy():
    X, y = _spirals(150)
    runs = []
    for name in ("numpy", "cupy"):
        model = nn.MLP([2, 32, 3], seed=4, dtype="float64")
        h = fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer=optim.Adam(0.01),
            epochs=3,
            batch_size=25,
            backend=name,
            progress=False,
        )
        runs.append((h, model))
    np.testing.assert_allclose(runs[1][0].step_loss, runs[0][0].step_loss, rtol=1e-9)
    for k, v in runs[0][1].state_dict().items():
        np.testing.assert_allclose(
            gradcore.to_numpy(runs[1][1].state_dict()[k]), v, rtol=1e-8, atol=1e-12
        )


def test_device_labels_out_of_range_are_refused():
    X = torch.ones((4, 2), dtype=torch.float64)
    y = torch.tensor([0, 1, -1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        fit(
            nn.MLP([2, 3], dtype="float64", backend="torch"),
            X,
            y,
            loss="cross_entropy",
            optimizer="sgd",
            epochs=1,
            batch_size=2,
            progress=False,
        )


def test_in_place_updates_change_no_numbers():
    # The last layer keeps its output for its VJP, so the loss must not overwrite it.
    X, y = data.linear(60, w=(0.5, -0.5), b=0.1, seed=2)
    target = 1 / (1 + np.exp(-y))
    runs = []
    for inplace in (False, True):
        model = nn.Sequential(
            nn.Linear(2, 4, dtype="float64", seed=1),
            nn.Tanh(),
            nn.Linear(4, 1, dtype="float64", seed=2),
            nn.Sigmoid(),
        )
        h = fit(
            model,
            X,
            target,
            loss="mse",
            optimizer=optim.Adam(0.05),
            epochs=2,
            batch_size=20,
            inplace=inplace,
            progress=False,
        )
        runs.append(h.step_loss)
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-13)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from gradcore import train

    assert train._progress_bar(True, 10) is None  # pytest's stderr is no terminal
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = train._progress_bar(True, 10)
    assert bar is not None
    bar.close()
    assert train._progress_bar(False, 10) is None


def test_history_repr_is_short():
    from gradcore.train import History

    h = History(epoch=[1, 2], loss=[0.9, 0.5], accuracy=[0.6, 0.8], step_loss=[1.0] * 5000)
    h.val_loss, h.val_accuracy = [None, 0.7], [None, 0.75]
    assert repr(h) == "History(epochs=2, loss=0.5, accuracy=0.8, val_loss=0.7, val_accuracy=0.75)"
    assert repr(History()) == "History(epochs=0)"


# --- JAX: one compiled program per step ----------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_jax_training_compiles_a_few_programs_not_one_per_operation(opt):
    jax = pytest.importorskip("jax")
    import logging

    compiled = []

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Finished jaxpr to MLIR"):
                compiled.append(record)

    # Shapes used nowhere else, so eager JAX would have to compile every operation.
    X, y = data.spirals(87, classes=5, noise=0.2, seed=3)
    model = nn.MLP([2, 11, 13, 5], seed=1, backend="jax")
    optimizer = optim.SGD(0.1, momentum=0.9) if opt == "sgd" else optim.AdamW(0.01)
    logger = logging.getLogger("jax")
    handler, level = Count(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles():
            fit(
                model,
                X,
                y,
                loss="cross_entropy",
                optimizer=optimizer,
                epochs=2,
                batch_size=19,
                validation=(X[:29], y[:29]),
                progress=False,
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # Eager: about 260 (every operation, once per shape). Compiled: the step for full
    # and last batches (SGD: and the first step), validation, and small data moves.
    assert len(compiled) <= 80, len(compiled)


def test_jax_compiled_training_follows_numpy_and_leaves_no_tracers():
    jax = pytest.importorskip("jax")
    X, y = _spirals(70, seed=4)
    runs = {}
    for name in ("numpy", "jax"):
        model = nn.MLP([2, 6, 3], activation="gelu", seed=5, dtype="float32", backend=name)
        h = fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer=optim.Adam(0.02),
            epochs=3,
            batch_size=16,
            validation=(X, y),
            progress=False,
        )
        runs[name] = (h, model)
    (h_np, m_np), (h_jax, m_jax) = runs["numpy"], runs["jax"]
    np.testing.assert_allclose(h_jax.step_loss, h_np.step_loss, rtol=2e-5)
    assert h_jax.accuracy == h_np.accuracy
    for k, v in m_np.state_dict().items():
        p = m_jax.state_dict()[k]
        assert isinstance(p, jax.Array)
        assert not isinstance(p, jax.core.Tracer)
        np.testing.assert_allclose(np.asarray(p), v, rtol=1e-4, atol=1e-6)
    grads = m_jax.grads()
    assert sorted(grads) == sorted(m_np.grads())
    for k, g in grads.items():
        np.testing.assert_allclose(np.asarray(g), m_np.grads()[k], rtol=1e-3, atol=1e-6)
    # the model still predicts eagerly after training
    out = m_jax.predict(X[:4])
    np.testing.assert_allclose(np.asarray(out), m_np.predict(X[:4]), rtol=1e-4, atol=1e-5)


# --- class labels are validated the same way on every backend ------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0.0, 1.7, 2.0, 0.0], "integer class labels, got fractions"),
        ([0.0, np.nan, 2.0, 0.0], "NaN or infinity"),
        ([[0], [1], [2], [0]], "1-D integer class labels"),
    ],
    ids=["fraction", "nan", "2-D"],
)
def test_class_labels_checked_alike_on_every_backend(backend, labels, message):
    if backend.name in ("dask", "cupy"):
        pytest.skip("the check is the same array code; numpy, torch, jax and strict show it")
    X = backend.asarray(np.ones((4, 2)), dtype="float64")
    y = backend.asarray(np.asarray(labels, dtype=np.float64))
    model = nn.MLP([2, 3], dtype="float64", backend=backend)
    before = gradcore.to_numpy(model.state_dict()["0.W"]).copy()
    with pytest.raises(ValueError, match=message):
        fit(
            model,
            X,
            y,
            loss="cross_entropy",
            optimizer="sgd",
            epochs=1,
            batch_size=2,
            progress=False,
        )
    np.testing.assert_array_equal(gradcore.to_numpy(model.state_dict()["0.W"]), before)
    # The same labels as NumPy arrays (the host path) give the same error.
    with pytest.raises(ValueError, match=message):
        fit(
            nn.MLP([2, 3]),
            np.ones((4, 2)),
            np.asarray(labels),
            loss="cross_entropy",
            optimizer="sgd",
            epochs=1,
            batch_size=2,
            progress=False,
        )


# --- malformed arguments and checkpoints are refused with a clear error ----------------------


def test_fit_evaluate_predict_refuse_bad_sizes():
    X, y = _spirals(30)
    kw = {"loss": "cross_entropy", "optimizer": "sgd", "epochs": 1, "batch_size": 5}
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="check_every must be a positive integer"):
            fit(nn.MLP([2, 3]), X, y, check_every=bad, progress=False, **kw)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            evaluate(nn.MLP([2, 3]), X, y, batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            nn.MLP([2, 3]).predict(X, batch_size=bad)
    with pytest.raises(ValueError, match=r"validation data: X has 3 features per sample"):
        fit(nn.MLP([2, 3]), X, y, validation=(np.ones((4, 3)), np.zeros(4, int)), **kw)
    with pytest.raises(ValueError, match=r"training data: X has 2 features per sample"):
        fit(nn.MLP([5, 3]), X, y, **kw)


def _rewrite(path, out, *, header=None, drop=(), **arrays):
    """A copy of checkpoint ``path`` at ``out`` with header fields and arrays replaced."""
    with np.load(path) as f:
        contents = {k: f[k] for k in f.files if k not in drop}
    h = json.loads(str(contents["__header__"]))
    if header is not None:
        h = header(h)
    contents["__header__"] = np.asarray(h if isinstance(h, str) else json.dumps(h))
    contents.update(arrays)
    np.savez(out, **contents)
    return out


def _set(key, value):
    def change(h):
        h[key] = value
        return h

    return change


def _set_model(key, value):
    def change(h):
        h["model"][key] = value
        return h

    return change


@pytest.mark.parametrize(
    ("header", "arrays", "message"),
    [
        (_set("optimizer", 5), {}, "'optimizer' must be null or an object"),
        (_set("meta", [1, 2]), {}, "'meta' must be an object"),
        (_set("model", [1]), {}, "'model' must be an object"),
        (_set_model("activation", 3), {}, "activation must be one of"),
        (_set_model("sizes", [2, 2.5, 3]), {}, "positive integer widths"),
        (_set_model("sizes", "abc"), {}, "sequence of layer widths"),
        (_set_model("bias", "yes"), {}, "bias must be true or false"),
        (_set_model("dtype", 7), {}, "dtype must be one of"),
        (lambda h: "[" * 100_000 + "]" * 100_000, {}, "corrupt checkpoint header|unsupported"),
        (lambda h: {**h, "optimizer": {"scalars": {"step": -5}}}, {}, "'step' must be an integer"),
        (lambda h: {**h, "optimizer": {"scalars": {"step": "1"}}}, {}, "'step' must be an integer"),
        (None, {"param/0.W": np.array([["a", "b", "c", "d"]] * 2)}, "must hold real floats"),
        (None, {"param/0.W": np.ones((2, 4), complex)}, "must hold real floats"),
        (None, {"param/0.W": np.full((2, 4), np.nan)}, "NaN or infinity"),
        (None, {"param/0.W": np.ones((3, 4))}, r"shape \(3, 4\) but the saved model's"),
        (None, {"param/9.W": np.ones((3, 4))}, "names no parameter"),
        (None, {"opt/m/0.W": np.full((2, 4), np.nan)}, "NaN or infinity"),
    ],
    ids=[
        "optimizer-int",
        "meta-list",
        "model-list",
        "activation-int",
        "fractional-size",
        "sizes-string",
        "bias-string",
        "dtype-int",
        "deep-json",
        "negative-step",
        "string-step",
        "string-params",
        "complex-params",
        "nan-params",
        "wrong-shape",
        "unknown-param",
        "nan-optimizer-state",
    ],
)
def test_malformed_checkpoints_get_a_value_error(tmp_path, header, arrays, message):
    model = nn.MLP([2, 4, 3], seed=0)
    state = optim.Adam().init(model.state_dict())
    good = save(tmp_path / "good.npz", model, state)
    bad = _rewrite(good, tmp_path / "bad.npz", header=header, **arrays)
    with pytest.raises(ValueError, match=message):
        load(bad).build_model()


def test_checkpoint_params_overflowing_the_model_dtype_are_refused(tmp_path):
    model = nn.MLP([2, 3], seed=0)  # float32
    good = save(tmp_path / "good.npz", model)
    bad = _rewrite(good, tmp_path / "bad.npz", **{"param/0.W": np.full((2, 3), 1e300)})
    ckpt = load(bad)  # finite float64 numbers: readable...
    with pytest.raises(ValueError, match=r"0\.W.*overflows the model's dtype float32"):
        ckpt.build_model()  # ... but not as float32


def test_checkpoint_claiming_huge_sizes_is_refused_before_allocating(tmp_path):
    # A ~1 KB file describing an MLP([60000, 60000, 2]): building that model first would
    # draw 3.6e9 weights (27 GiB) before finding the stored arrays do not fit.
    model = nn.MLP([2, 4, 2], seed=0)
    good = save(tmp_path / "good.npz", model)
    bad = _rewrite(good, tmp_path / "bad.npz", header=_set_model("sizes", [60000, 60000, 2]))
    assert bad.stat().st_size < 4000
    with pytest.raises(ValueError, match=r"shape \(2, 4\) but the saved model's '0\.W'"):
        load(bad)
    # And a header of an .npy member claiming a huge shape is refused from the zip headers.
    import io

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<f4", "fortran_order": False, "shape": (60000, 60000)}
    )
    npy.write(b"\0" * 32)
    crafted = tmp_path / "crafted.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data_ = npy.getvalue() if info.filename == "param/0.W.npy" else src.read(info)
            dst.writestr(info.filename, data_)
    with pytest.raises(ValueError, match=r"crafted\.npz is not a readable checkpoint.*claims"):
        load(crafted)


def test_checkpoint_suffix_file_mode_and_resume_name(tmp_path):
    import os
    import stat

    model = nn.MLP([2, 3], seed=0)
    upper = save(tmp_path / "x.NPZ", model)
    assert upper.name == "x.NPZ"
    assert (tmp_path / "x.NPZ").is_file()
    assert not (tmp_path / "x.NPZ.npz").exists()
    plain = save(tmp_path / "ck", model)
    assert plain.name == "ck.npz"
    # load("ck") reads the file save("ck") wrote.
    np.testing.assert_array_equal(load(tmp_path / "ck").params["0.W"], model.state_dict()["0.W"])
    old = os.umask(0o022)
    try:
        path = save(tmp_path / "mode.npz", model)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path = save(tmp_path / "private.npz", model)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_npy_renamed_npz_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "w.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"w\.npz is not a readable checkpoint \(an \.npy file"):
        load(path)


def test_fit_names_non_array_data():
    kw = {"loss": "mse", "optimizer": "sgd", "epochs": 1, "batch_size": 1}
    with pytest.raises(TypeError, match="training data: X must be an array"):
        fit(nn.MLP([2, 1]), None, np.ones(2), **kw)
    with pytest.raises(TypeError, match="training data: X must be an array"):
        fit(nn.MLP([2, 1]), "ab", [1.0], **kw)
