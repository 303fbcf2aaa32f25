"""Argument checks and dtype rules shared by every kernel (and by the fast paths).

Keeping them in one place keeps the error messages identical across kernels and across
the generic and native paths of one kernel.
"""

from __future__ import annotations

import operator
from typing import Any

import array_api_compat


def is_floating(xp: Any, x: Any) -> bool:
    """Whether ``x`` has a real floating dtype."""
    return bool(xp.isdtype(x.dtype, "real floating"))


def check_array(x: Any, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``x`` is an array (not a Python scalar)."""
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def as_int(value: Any, name: str) -> int:
    """``value`` as a Python int (NumPy integers too); ``TypeError`` naming ``name`` else.

    ``bool`` is refused: ``axis=True`` is a mistake, not axis 1.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r}")


def check_floating(xp: Any, x: Any, name: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``x`` has a real floating dtype."""
    if not is_floating(xp, x):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` naming both arrays unless their shapes are equal."""
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape: got "
            f"{name_a}.shape={tuple(a.shape)} and {name_b}.shape={tuple(b.shape)}"
        )


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """The dtype to compute in: float32 for narrower floats (float16, bfloat16)."""
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    return xp.float32


def astype(xp: Any, x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, without a copy when it already is."""
    return x if x.dtype == dtype else xp.astype(x, dtype)
