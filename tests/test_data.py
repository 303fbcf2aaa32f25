"""Datasets: generators, file loading with clear errors, splitting, standardisation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gradcore import data

# --- generators ----------------------------------------------------------------------------


def test_spirals_shape_balance_and_seed():
    X, y = data.spirals(301, classes=3, noise=0.2, seed=4)
    assert X.shape == (301, 2)
    assert X.dtype == np.float64
    assert y.shape == (301,)
    assert y.dtype == np.int64
    assert np.bincount(y).tolist() == [101, 100, 100]
    X2, y2 = data.spirals(301, classes=3, noise=0.2, seed=4)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    X3, _ = data.spirals(301, classes=3, noise=0.2, seed=5)
    assert not np.allclose(X, X3)
    assert np.abs(X).max() < 1.5


def test_spirals_need_a_nonlinear_model():
    X, y = data.spirals(600, classes=3, noise=0.1, seed=0)
    # The best linear classifier in the least-squares sense (one-hot targets).
    A = np.hstack([X, np.ones((600, 1))])
    W, *_ = np.linalg.lstsq(A, np.eye(3)[y], rcond=None)
    score = np.mean(np.argmax(A @ W, axis=1) == y)
    assert score < 0.7  # no set of straight lines separates the arms


def test_linear_has_the_requested_weights():
    w, b = (2.0, -3.4), 4.2
    X, y = data.linear(2000, w=w, b=b, noise=0.01, seed=1)
    assert X.shape == (2000, 2)
    assert y.shape == (2000,)
    A = np.hstack([X, np.ones((2000, 1))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    np.testing.assert_allclose(coef, [*w, b], atol=2e-3)
    residual = y - A @ coef
    assert residual.std() == pytest.approx(0.01, rel=0.1)
    X1, y1 = data.linear(50, w=3.0, b=0.0, noise=0.0)
    np.testing.assert_allclose(y1, 3.0 * X1[:, 0], rtol=1e-15)


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match="classes"):
        data.spirals(10, classes=1)
    with pytest.raises(ValueError, match="n must"):
        data.spirals(0)
    with pytest.raises(ValueError, match="noise"):
        data.linear(10, noise=-1.0)


def test_digits():
    pytest.importorskip("sklearn")
    X, y = data.digits()
    assert X.shape == (1797, 64)
    assert y.shape == (1797,)
    assert X.min() == 0
    assert X.max() == 16
    assert sorted(set(y.tolist())) == list(range(10))


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"gradcore\[data\]"):
        data.digits()


# --- files ---------------------------------------------------------------------------------


def test_load_npz_and_csv_round_trip(tmp_path):
    X = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    y = np.array([0, 1, 1, 2])
    np.savez(tmp_path / "d.npz", X=X, y=y)
    X1, y1 = data.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(X1, X)
    np.testing.assert_array_equal(y1, y)

    csv = tmp_path / "d.csv"
    rows = "\n".join(",".join(repr(float(v)) for v in [*X[i], y[i]]) for i in range(4))
    csv.write_text("a,b,c,label\n" + rows + "\n")
    X2, y2 = data.load(csv)
    np.testing.assert_allclose(X2, X, rtol=1e-15)
    assert y2.dtype == np.int64
    assert y2.tolist() == [0, 1, 1, 2]

    csv.write_text("1.0,0.5\n2.0,0.25\n")  # no header, real-valued target
    X3, y3 = data.load(csv)
    assert X3.shape == (2, 1)
    assert y3.dtype == np.float64
    assert y3.tolist() == [0.5, 0.25]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("a,b\n", "header but no data"),
        ("1,2,3\n4,5\n", "row 2 has 2 columns"),
        ("1,2\n3,x\n", "non-numeric"),
        ("1\n2\n", "at least two columns"),
        ("1,nan\n2,3\n", "NaN"),
        ("1,2\ninf,3\n", "NaN or infinity"),
    ],
)
def test_malformed_csv_gets_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load(path)


def test_malformed_npz_gets_a_clear_error(tmp_path):
    np.savez(tmp_path / "noy.npz", X=np.ones((3, 2)))
    with pytest.raises(ValueError, match="missing y"):
        data.load(tmp_path / "noy.npz")
    np.savez(tmp_path / "len.npz", X=np.ones((3, 2)), y=np.ones(4))
    with pytest.raises(ValueError, match="3 rows but y has 4"):
        data.load(tmp_path / "len.npz")
    np.savez(tmp_path / "nan.npz", X=np.array([[1.0], [np.nan]]), y=np.ones(2))
    with pytest.raises(ValueError, match=r"X contains NaN.*\(1, 0\)"):
        data.load(tmp_path / "nan.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable"):
        data.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "3d.npz", X=np.ones((2, 2, 2)), y=np.ones(2))
    with pytest.raises(ValueError, match="2-D"):
        data.load(tmp_path / "3d.npz")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        data.load(tmp_path / "absent.csv")
    (tmp_path / "d.txt").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported"):
        data.load(tmp_path / "d.txt")


def test_check_dataset():
    X, _y = data.check_dataset(np.arange(3.0), [1, 2, 3])
    assert X.shape == (3, 1)
    with pytest.raises(ValueError, match="numeric"):
        data.check_dataset(np.array([["a"], ["b"]]), [1, 2])
    with pytest.raises(ValueError, match="empty"):
        data.check_dataset(np.ones((0, 2)), np.ones(0))


# --- splitting and scaling ---------------------------------------------------------------


def test_train_test_split_partitions_with_a_seed():
    X = np.arange(40.0).reshape(20, 2)
    y = np.arange(20)
    Xtr, _Xte, ytr, yte = data.train_test_split(X, y, test_size=0.25, seed=3)
    assert len(yte) == 5
    assert len(ytr) == 15
    assert sorted([*ytr.tolist(), *yte.tolist()]) == list(range(20))
    np.testing.assert_array_equal(Xtr[:, 0], 2 * ytr)  # rows stay paired
    again = data.train_test_split(X, y, test_size=0.25, seed=3)
    np.testing.assert_array_equal(again[3], yte)
    other = data.train_test_split(X, y, test_size=0.25, seed=4)
    assert other[3].tolist() != yte.tolist()
    with pytest.raises(ValueError, match="test_size"):
        data.train_test_split(X, y, test_size=1.0)


def test_standardize():
    rng = np.random.default_rng(0)
    X = rng.normal(5.0, 3.0, size=(100, 3))
    X[:, 2] = 7.0  # constant column
    Xs, mean, std = data.standardize(X)
    np.testing.assert_allclose(Xs[:, :2].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Xs[:, :2].std(axis=0), 1, rtol=1e-12)
    assert np.all(Xs[:, 2] == 0)
    X_new = rng.normal(size=(4, 3))
    Xn, _, _ = data.standardize(X_new, mean=mean, std=std)
    np.testing.assert_allclose(Xn, (X_new - mean) / std, rtol=1e-15)
    with pytest.raises(ValueError, match="both"):
        data.standardize(X, mean=mean)


def test_a_file_that_is_no_archive_is_named_so(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not a zip archive")
    with pytest.raises(ValueError, match=r"junk\.npz: not a readable \.npz file") as info:
        data.load(path)
    assert "not an .npz archive" in str(info.value)
    assert "pickle" not in str(info.value)
