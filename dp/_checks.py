"""Parameter checks shared by the package: each error names the parameter, the value and what is allowed."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._errors import DPTypeError, DPValueError

__all__ = [
    "real",
    "positive",
    "non_negative",
    "probability",
    "open_unit",
    "integer",
    "one_of",
    "float_vector",
]


def real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DPTypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if not math.isfinite(out):
        raise DPValueError(f"{name} must be finite, got {value!r}")
    return out


def positive(name: str, value: object) -> float:
    out = real(name, value)
    if out <= 0:
        raise DPValueError(f"{name} must be > 0, got {value!r}")
    return out


def non_negative(name: str, value: object) -> float:
    out = real(name, value)
    if out < 0:
        raise DPValueError(f"{name} must be >= 0, got {value!r}")
    return out


def probability(name: str, value: object) -> float:
    """A rate in (0, 1]."""
    out = real(name, value)
    if not 0 < out <= 1:
        raise DPValueError(f"{name} must be in (0, 1], got {value!r}")
    return out


def open_unit(name: str, value: object) -> float:
    """A value in (0, 1)."""
    out = real(name, value)
    if not 0 < out < 1:
        raise DPValueError(f"{name} must be in (0, 1), got {value!r}")
    return out


def integer(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DPTypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    out = int(value)
    if minimum is not None and out < minimum:
        raise DPValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def one_of(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise DPValueError(f"{name} must be one of {allowed!r}, got {value!r}")
    return value


def float_vector(name: str, value: object) -> np.ndarray:
    """A finite, non-empty, 1-D float numpy vector (returned unchanged)."""
    if not isinstance(value, np.ndarray):
        raise DPTypeError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.ndim != 1 or value.size == 0:
        raise DPValueError(f"{name} must be a non-empty 1-D vector, got shape {value.shape}")
    if not np.issubdtype(value.dtype, np.floating):
        raise DPTypeError(f"{name} must have a float dtype, got {value.dtype}")
    bad = np.count_nonzero(~np.isfinite(value))
    if bad:
        raise DPValueError(f"{name} must be finite, got NaN or Inf in {bad} coordinates")
    return value
