"""Argument checks shared by the crf_ext API: errors name the argument and the expected form."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np


def image_array(image, name: str = "image") -> np.ndarray:
    """(H, W, 3) uint8, C-contiguous (copied if needed). Other integer dtypes are taken when every
    value is in 0..255 (the conversion is then exact); float images are refused rather than
    guessed at (0..1 or 0..255?)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
            raise TypeError(f"{name} must be an RGB array of uint8 (or integers in 0..255) of shape (H, W, 3), "
                            f"got dtype {array.dtype}; convert it, e.g. (image * 255).round().astype(np.uint8)")
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{name} has values outside 0..255 (min {array.min()}, max {array.max()}); "
                             "an RGB image must fit uint8")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


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
    """A standard deviation: > 0 and finite also as the float32 the C++ computes with (1e-50 would
    be 0 there, 1e300 infinite)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = np.float32(value)
    if not (0 < as_float32 < np.inf):
        raise ValueError(f"{name} must be a finite number > 0 in float32's range (about 1.4e-45 to 3.4e38), "
                         f"got {value!r}")
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
