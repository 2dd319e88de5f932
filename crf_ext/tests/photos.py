"""The test photos, read with NumPy alone: crf_ext's tests need only numpy, pytest, hypothesis and pydensecrf2."""

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of fixtures/<name>.ppm (binary PPM: read without an imaging library)."""
    data = (FIXTURES / f"{name}.ppm").read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P6" and maxval == b"255", name
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3).copy()
