"""Argument checks shared by the crf_ext API: errors name the argument and the expected form."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np


def image_array(image, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8, C-contiguous (copied if needed)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 array of shape (H, W, 3), got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    return np.ascontiguousarray(array)


def real_array(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_):
        raise TypeError(f"{name} must be a real-valued array, got dtype {array.dtype}")
    return array


def probs_array(probs, height: int, width: int, name: str = "probs") -> np.ndarray:
    """(C, height, width) float32, C-contiguous. Finiteness and signs are checked in C++."""
    array = real_array(probs, name)
    if array.ndim != 3:
        raise ValueError(f"{name} must have shape (C, H, W), got {array.ndim} dimensions {array.shape}")
    if array.shape[0] < 1:
        raise ValueError(f"{name} must have at least one label (C >= 1), got shape {array.shape}")
    if array.shape[1:] != (height, width):
        raise ValueError(f"{name} has shape {array.shape}, expected (C, {height}, {width}) to match the image")
    return np.ascontiguousarray(array, dtype=np.float32)


def finite_array(values, shape: tuple[int, ...], name: str) -> np.ndarray:
    """float32 C-contiguous array of exactly `shape`, every entry finite."""
    array = real_array(values, name)
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return array


def positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def count(value, name: str, minimum: int) -> int:
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if as_int < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def threads(num_threads) -> int:
    """None means every core OpenMP would use (passed to C++ as 0)."""
    return 0 if num_threads is None else count(num_threads, "num_threads", 1)
