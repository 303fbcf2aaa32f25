"""Datasets: generators, file loading with clear errors, splitting, standardisation."""

from __future__ import annotations

import sys
import zipfile

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


# --- headers, byte-order marks and ambiguous targets ----------------------------------------


def test_csv_byte_order_mark_is_not_a_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("1.5,0\n2.5,1\n3.5,1\n".encode("utf-8-sig"))
    X, y = data.load(path)
    assert X[:, 0].tolist() == [1.5, 2.5, 3.5]  # the first row is kept
    assert y.tolist() == [0, 1, 1]
    path.write_bytes("a,label\n1.5,0\n2.5,1\n".encode("utf-8-sig"))
    X, _ = data.load(path)
    assert X[:, 0].tolist() == [1.5, 2.5]


def test_csv_header_rule_is_explicit(tmp_path):
    path = tmp_path / "d.csv"
    # A typo in the first data row is reported, not dropped as if it were a header.
    path.write_text("1.0,2x,0\n3.0,4.0,1\n")
    with pytest.raises(ValueError, match=r"d\.csv: data row 1 \(line 1\) has a non-numeric"):
        data.load(path)
    # A first line without any number is a header...
    path.write_text("x1,x2,y\n1.0,2.0,0\n3.0,4.0,1\n")
    assert data.load(path)[0].shape == (2, 2)
    # ... and header= says so explicitly either way.
    path.write_text("1.0,2.0,0\n3.0,4.0,1\n5.0,6.0,1\n")
    assert data.load(path, header=True)[0].tolist() == [[3.0, 4.0], [5.0, 6.0]]
    assert data.load(path, header=False)[0].shape == (3, 2)
    with pytest.raises(TypeError, match="header"):
        data.load(path, header="yes")


@pytest.mark.parametrize("big", [1e19, -1e19, 2.0**60, 1e300])
def test_whole_number_targets_beyond_exact_range_are_refused(tmp_path, big):
    np.savez(tmp_path / "big.npz", X=np.ones((3, 1)), y=np.array([0.0, 1.0, big]))
    with pytest.raises(ValueError, match=r"big\.npz: y\[2\]: target .* too large"):
        data.load(tmp_path / "big.npz")
    _, y = data.load(tmp_path / "big.npz", targets="values")
    assert y.dtype == np.float64
    assert y.tolist() == [0.0, 1.0, big]
    (tmp_path / "big.csv").write_text(f"x,y\n1,0\n2,{big!r}\n")
    with pytest.raises(ValueError, match=r"big\.csv: line 3: target"):
        data.load(tmp_path / "big.csv")


def test_targets_classes_and_values(tmp_path):
    np.savez(tmp_path / "f.npz", X=np.ones((3, 1)), y=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"f\.npz: y\[1\]: target 1\.5 is not a whole number"):
        data.load(tmp_path / "f.npz", targets="classes")
    assert data.load(tmp_path / "f.npz")[1].dtype == np.float64  # auto: regression
    with pytest.raises(ValueError, match="targets must be one of"):
        data.load(tmp_path / "f.npz", targets="labels")


def test_bool_targets_are_two_classes(tmp_path):
    np.savez(tmp_path / "b.npz", X=np.arange(4.0)[:, None], y=np.array([True, False, True, True]))
    _, y = data.load(tmp_path / "b.npz")
    assert y.dtype == np.int64
    assert y.tolist() == [1, 0, 1, 1]


def _crafted_npz(path, shape, payload=b"\0" * 16):
    """An .npz whose member 'X.npy' claims ``shape`` but stores only ``payload``."""
    import io

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<f8", "fortran_order": False, "shape": shape}
    )
    npy.write(payload)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("X.npy", npy.getvalue())
        buf = io.BytesIO()
        np.save(buf, np.zeros(2))
        zf.writestr("y.npy", buf.getvalue())


def test_npz_claiming_a_huge_shape_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.npz"
    _crafted_npz(path, (100_000, 100_000))  # 80 GB claimed by a file of ~400 bytes
    assert path.stat().st_size < 1000
    with pytest.raises(ValueError, match=r"huge\.npz: member 'X' claims shape \(100000, 100000\)"):
        data.load(path)
    # A header that is consistent with the data passes the same check.
    ok = tmp_path / "ok.npz"
    np.savez(ok, X=np.ones((5, 2)), y=np.arange(5))
    assert data.npz_headers(ok) == {
        "X": ((5, 2), np.dtype(np.float64)),
        "y": ((5,), np.dtype(np.int64)),
    }


def test_npy_renamed_npz_is_named_so(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"one\.npz: not a readable \.npz file \(an \.npy file"):
        data.load(path)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seeds_name_the_argument(seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        data.spirals(30, seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        data.linear(30, seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        data.train_test_split(np.ones((4, 1)), np.arange(4), seed=seed)
    assert data.check_seed(np.int64(3)) == 3
