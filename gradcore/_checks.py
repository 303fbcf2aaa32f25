"""Argument checks and dtype rules shared by every kernel (and by the fast paths).

Keeping them in one place keeps the error messages identical across kernels and across
the generic and native paths of one kernel.
"""

from __future__ import annotations

import numbers
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


def as_float(value: Any, name: str) -> float:
    """``value`` (a real number: int, float, NumPy scalar) as a Python float.

    Strings and booleans are refused with ``TypeError`` naming ``name``: ``"0.1"`` and
    ``True`` are mistakes, not 0.1 and 1.0.
    """
    if type(value) is float or type(value) is int:  # the common case, without the ABC check
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number (int or float), got {value!r}")


def check_bool(value: Any, name: str, *, none: bool = False) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is True or False (or None)."""
    if isinstance(value, bool) or (none and value is None):
        return
    allowed = "None, True or False" if none else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {value!r}")


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
    """The dtype to compute in, decided by the floating dtype's width, not its identity.

    float32 for 32 bits and narrower (float16, bfloat16), float64 for 64 bits, whatever
    the byte order (NumPy's ``'>f8'`` is not ``== float64`` but computes in float64),
    and wider extended types (NumPy's ``longdouble``) are kept: never computed in less
    precision than they carry.
    """
    if dtype == xp.float64 or dtype == xp.float32:
        return dtype
    bits = int(xp.finfo(dtype).bits)
    if bits > 64:
        return dtype
    return xp.float64 if bits == 64 else xp.float32


def astype(xp: Any, x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, without a copy when it already is."""
    return x if x.dtype == dtype else xp.astype(x, dtype)
