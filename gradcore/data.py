r"""Datasets for training: built-in generators, files, splitting and standardisation.

Everything here works on the host with NumPy arrays; :func:`gradcore.fit` moves the
data to the training backend. Every loader checks what it returns (two dimensions for
``X``, as many targets as rows, no NaN or infinity) and raises a ``ValueError`` that
names the problem before any training starts.

Examples
--------
>>> from gradcore import data
>>> X, y = data.spirals(300, classes=3, seed=0)
>>> X_train, X_test, y_train, y_test = data.train_test_split(X, y, test_size=0.25, seed=0)
>>> X_train, mean, std = data.standardize(X_train)
>>> X_test, _, _ = data.standardize(X_test, mean=mean, std=std)
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "check_dataset",
    "check_seed",
    "digits",
    "linear",
    "load",
    "npz_headers",
    "spirals",
    "standardize",
    "train_test_split",
]


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as a Python int >= 0 (what NumPy's generators take); else a ValueError
    naming the argument (NumPy's own message does not)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {seed!r}")
    return int(seed)


def check_dataset(X: Any, y: Any, *, name: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    r"""Validate a dataset and return it as NumPy arrays.

    ``X`` must be numeric with one row per sample (a 1-D ``X`` becomes one column),
    ``y`` one target per row (1-D) or a 2-D array of targets; both non-empty, of equal
    length and finite.

    Raises
    ------
    ValueError
        Naming the first problem found (and the dataset, via ``name``).
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if (
        X.dtype == object
        or y.dtype == object
        or X.dtype.kind not in "biuf"
        or y.dtype.kind not in "biuf"
    ):
        raise ValueError(f"{name}: X and y must be numeric arrays, got {X.dtype} and {y.dtype}")
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"{name}: X must be 2-D (samples, features), got shape {X.shape}")
    if y.ndim not in (1, 2):
        raise ValueError(f"{name}: y must be 1-D or 2-D, got shape {y.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name}: X is empty (shape {X.shape})")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: X has {X.shape[0]} rows but y has {y.shape[0]}; they must match")
    for label, arr in (("X", X), ("y", y)):
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise ValueError(f"{name}: {label} contains NaN or infinity (first at index {bad})")
    return X, y


# --- built-in generators -------------------------------------------------------------


def spirals(
    n: int = 600, classes: int = 3, noise: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    r"""Interleaved spiral arms in the plane, one class per arm.

    A set no straight line can split: a linear model gets about ``1/classes`` of it
    right, an MLP with a hidden layer or two nearly all.

    Parameters
    ----------
    n : int
        Total number of points (split as evenly as possible between the arms).
    classes : int
        Number of arms (classes), at least 2.
    noise : float
        Standard deviation of the Gaussian noise added to each point's angle
        (radians) and, scaled by 0.1, to its radius.
    seed : int
        Seed of the NumPy generator.

    Returns
    -------
    X : ndarray of float64, shape (n, 2)
    y : ndarray of int64, shape (n,)
        Class of each point, 0 to ``classes - 1``.

    Notes
    -----
    Point :math:`i` of arm :math:`k` has radius :math:`r = 0.05 + 0.95\,i/m` and angle
    :math:`\theta = 4 r + 2\pi k/K + \mathcal N(0, \sigma^2)` (about 0.6 of a turn),
    placed at :math:`r(\cos\theta, \sin\theta)`.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got {classes!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(check_seed(seed))
    counts = np.full(classes, n // classes)
    counts[: n % classes] += 1
    Xs, ys = [], []
    for k, m in enumerate(counts):
        r = 0.05 + 0.95 * np.linspace(0.0, 1.0, int(m))
        theta = 4.0 * r + 2 * np.pi * k / classes + noise * rng.standard_normal(int(m))
        r = r + 0.1 * noise * rng.standard_normal(int(m))
        Xs.append(np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1))
        ys.append(np.full(int(m), k, dtype=np.int64))
    return np.concatenate(Xs), np.concatenate(ys)


def linear(
    n: int = 1000,
    w: float | Sequence[float] = (2.0, -3.4),
    b: float = 4.2,
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Samples of a linear model with known weights: ``y = X @ w + b + noise``.

    The lecture's linear regression: fitting :math:`\hat y = w^\top x + b` by gradient
    descent on the mean squared error must recover ``w`` and ``b``.

    Parameters
    ----------
    n : int
        Number of samples.
    w : float or sequence of float
        True weights; its length is the number of features (a float gives one).
    b : float
        True bias.
    noise : float
        Standard deviation of the Gaussian noise added to ``y``.
    seed : int
        Seed of the NumPy generator; ``X`` is standard normal.

    Returns
    -------
    X : ndarray of float64, shape (n, len(w))
    y : ndarray of float64, shape (n,)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    w_arr = np.atleast_1d(np.asarray(w, dtype=np.float64))
    if w_arr.ndim != 1 or not np.all(np.isfinite(w_arr)):
        raise ValueError(f"w must be a finite number or a 1-D sequence of them, got {w!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    rng = np.random.default_rng(check_seed(seed))
    X = rng.standard_normal((n, w_arr.shape[0]))
    y = X @ w_arr + float(b) + noise * rng.standard_normal(n)
    return X, y


def digits() -> tuple[np.ndarray, np.ndarray]:
    r"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

    No download: the data ship with scikit-learn (install ``gradcore[data]``).

    Returns
    -------
    X : ndarray of float64, shape (1797, 64)
        Pixel intensities 0 to 16.
    y : ndarray of int64, shape (1797,)

    Raises
    ------
    ImportError
        If scikit-learn is not installed (the message says how to install it).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install 'gradcore[data]'"
        ) from None
    bunch = load_digits()
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


# --- files ----------------------------------------------------------------------------


#: Deflate cannot expand data by much more than 1032:1; an entry claiming more than
#: this many bytes per stored byte cannot be genuine.
_MAX_EXPANSION = 1100
#: Class labels given as floats must be whole numbers that float64 holds exactly.
_MAX_FLOAT_LABEL = 2**53
#: What ``load(..., targets=...)`` accepts.
TARGETS = ("auto", "classes", "values")


def npz_headers(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    r"""The shape and dtype of every array in an ``.npz`` file, read without loading data.

    Each ``.npy`` member's header is read from the zip archive, and the number of bytes
    it claims is checked against what the archive can hold (its stored size, times
    deflate's largest expansion for a compressed member), so a crafted header cannot
    make a reader allocate gigabytes for a file of a few kilobytes.

    Raises
    ------
    ValueError
        For a file that is not a zip archive, a member that is not a valid ``.npy``
        array, an object (pickled) array, or sizes the file cannot hold; the message
        names the file and the member.
    """
    p = Path(path)
    file_size = p.stat().st_size
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                stored = info.compress_size
                room = (
                    stored if info.compress_type == zipfile.ZIP_STORED else stored * _MAX_EXPANSION
                )
                if stored > file_size or info.file_size > room:
                    raise ValueError(
                        f"{p.name}: member {name!r} claims {info.file_size} bytes, more than "
                        "the file can hold (corrupt or crafted)"
                    )
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype.hasobject:
                    raise ValueError(f"{p.name}: member {name!r} is an object (pickled) array")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.file_size:
                    raise ValueError(
                        f"{p.name}: member {name!r} claims shape {shape} of {dtype} "
                        f"({nbytes} bytes) but holds only {info.file_size} bytes "
                        "(corrupt or crafted)"
                    )
                out[name] = (tuple(int(d) for d in shape), dtype)
    except zipfile.BadZipFile:
        with open(p, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        reason = "an .npy file (one array) renamed .npz" if npy else "not an .npz archive"
        raise ValueError(f"{p.name}: not a readable .npz file ({reason})") from None
    except (zipfile.LargeZipFile, EOFError, OSError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{p.name}: not a readable .npz file ({first})") from None
    except ValueError as exc:
        if str(exc).startswith(p.name):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{p.name}: not a readable .npz file ({first})") from None
    return out


def _class_labels(y: np.ndarray, source: str, where: Any) -> np.ndarray:
    """Whole-number float targets as int64 class labels, or a ValueError naming the row."""
    big = np.flatnonzero(np.abs(y) >= _MAX_FLOAT_LABEL)
    if big.size:
        i = int(big[0])
        raise ValueError(
            f"{source}: {where(i)}: target {y[i].item()!r} is a whole number too large to be a "
            f"class label (|y| >= 2**53); for regression pass targets='values' "
            "(gradcore train: --model linear)"
        )
    return y.astype(np.int64)


def load(
    path: str | os.PathLike[str], *, header: bool | None = None, targets: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    r"""Load a dataset from ``.npz`` (arrays ``X`` and ``y``) or ``.csv`` (last column ``y``).

    Parameters
    ----------
    path : str or path
        The file; its suffix (``.npz`` or ``.csv``, any case) decides the format.
    header : bool, optional
        For a CSV file: whether its first line is a header. By default (None) the
        first line is a header exactly when none of its fields is a number
        (``x1,x2,label``); a first line with any number in it is data, so a typo in
        it is reported instead of silently dropping the row. A UTF-8 byte-order mark
        is ignored.
    targets : {"auto", "classes", "values"}
        How to read ``y``. ``"values"``: float64 regression targets. ``"classes"``:
        int64 class labels (whole numbers, below 2**53 if stored as floats).
        ``"auto"`` (default): integer and boolean ``y`` are class labels (``False``,
        ``True`` are classes 0 and 1), a 1-D float ``y`` of whole numbers too, other
        float ``y`` are regression targets; whole numbers too large for a float to
        hold exactly are ambiguous and refused.

    Returns
    -------
    X : ndarray of float64, shape (N, features)
    y : ndarray of int64 (class labels) or float64 (targets), shape (N,) or (N, k)

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        For another suffix, a file that cannot be parsed, missing arrays, mismatched
        lengths, NaN/infinite values, an ``.npz`` whose headers claim more data than
        the file holds, or targets that cannot be read as asked (the message names
        the file and the row).
    """
    if header is not None and not isinstance(header, bool):
        raise TypeError(f"header must be True, False or None, got {header!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {str(p)!r}")
    suffix = p.suffix.lower()
    where: Any
    if suffix == ".npz":
        npz_headers(p)  # sizes checked before anything is allocated
        try:
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            # A non-zip file makes NumPy try (and refuse) to unpickle it: ValueError.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "pickle" in first:
                first = "not an .npz archive"  # NumPy's advice to unpickle it misleads
            raise ValueError(f"{p.name}: not a readable .npz file ({first})") from None
        missing = [k for k in ("X", "y") if k not in arrays]
        if missing:
            raise ValueError(
                f"{p.name}: an .npz dataset needs arrays 'X' and 'y'; missing "
                f"{', '.join(missing)} (found {', '.join(arrays) or 'none'})"
            )
        X, y = arrays["X"], arrays["y"]

        def where(i: int) -> str:
            return f"y[{i}]"

    elif suffix == ".csv":
        X, y, first_line = _load_csv(p, header)

        def where(i: int) -> str:
            return f"line {first_line + i}"

    else:
        raise ValueError(f"{p.name}: unsupported data file type {suffix!r}; use .npz or .csv")
    X, y = check_dataset(X, y, name=p.name)
    if targets == "values":
        return X.astype(np.float64), y.astype(np.float64)
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        whole = y == np.round(y)
        if targets == "classes" and not np.all(whole):
            i = int(np.flatnonzero(~whole.reshape(len(y), -1).all(axis=1))[0])
            raise ValueError(
                f"{p.name}: {where(i)}: target {y[i].item()!r} is not a whole number "
                "(targets='classes' needs class labels)"
            )
        if y.ndim == 1 and np.all(whole):
            y = _class_labels(y, p.name, where)
    elif y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
        i = int(np.argmax(y.reshape(len(y), -1).max(axis=1)))
        raise ValueError(f"{p.name}: {where(i)}: target {y[i].item()!r} does not fit in int64")
    if targets == "classes" and y.ndim != 1:
        raise ValueError(f"{p.name}: class labels must be 1-D, got y of shape {y.shape}")
    return X.astype(np.float64), y


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_csv(p: Path, header: bool | None) -> tuple[np.ndarray, np.ndarray, int]:
    """X, y and the file line number of the first data row."""
    try:
        # utf-8-sig: a byte-order mark (as some spreadsheets write) is not data.
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{p.name}: not a text CSV file") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise ValueError(f"{p.name}: the CSV file is empty")
    if header is None:
        header = not any(_is_number(v) for v in lines[0][1].split(","))
    if header:
        lines = lines[1:]
    if not lines:
        raise ValueError(f"{p.name}: the CSV file has a header but no data")
    rows = []
    width = None
    for number, (line_no, line) in enumerate(lines, start=1):
        fields = line.split(",")
        if width is None:
            width = len(fields)
        if len(fields) != width:
            raise ValueError(
                f"{p.name}: data row {number} has {len(fields)} columns, expected {width} "
                f"(line {line_no})"
            )
        try:
            rows.append([float(v) for v in fields])
        except ValueError:
            raise ValueError(
                f"{p.name}: data row {number} (line {line_no}) has a non-numeric value: {line!r}"
            ) from None
    if width is None or width < 2:
        raise ValueError(f"{p.name}: a CSV dataset needs at least two columns (features, target)")
    table = np.asarray(rows, dtype=np.float64)
    return table[:, :-1], table[:, -1], lines[0][0]


# --- splitting and scaling ------------------------------------------------------------


def train_test_split(
    X: Any, y: Any, *, test_size: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r"""Shuffle with ``seed`` and split into training and test sets.

    Parameters
    ----------
    test_size : float
        Fraction of samples in the test set, in (0, 1); at least one sample goes to
        each side.

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
    """
    X, y = check_dataset(X, y)
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must lie strictly between 0 and 1, got {test_size!r}")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"cannot split {n} sample(s) into training and test sets")
    n_test = min(max(1, round(n * test_size)), n - 1)
    perm = np.random.default_rng(check_seed(seed)).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return X[train], X[test], y[train], y[test]


def standardize(
    X: Any, *, mean: Any = None, std: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Scale each column to zero mean and unit standard deviation.

    Pass the ``mean`` and ``std`` of the training set to scale a test set the same way.
    Constant columns get ``std = 1`` (they become zero instead of NaN).

    Returns
    -------
    X_scaled : ndarray of float64
    mean, std : ndarray of float64, shape (features,)
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (samples, features), got shape {X.shape}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is None:
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        std = np.where(std > 0, std, 1.0)
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if mean.shape != (X.shape[1],) or std.shape != (X.shape[1],):
        raise ValueError(
            f"mean and std must have shape ({X.shape[1]},), got {mean.shape} and {std.shape}"
        )
    return (X - mean) / std, mean, std
