"""Writing results to disk: label maps as palette PNGs, JSON, all atomic (temporary name + rename),
so that a run killed at any moment leaves either the old file or the complete new one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, `(256, 3)` uint8 (class 255, 'ignore', is white-ish)."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        value, colour = label, np.zeros(3, np.int64)
        for bit in range(8):  # bits of the label spread over the high bits of r, g, b
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[label] = colour
    return palette


def atomic_write(path: Path, write) -> None:
    """Calls `write(binary_file)` on a temporary file beside `path`, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def check_writable(directory: Path) -> None:
    """Creates `directory` if needed and writes, syncs and removes a small probe file there, so a
    read-only or full disk stops a run at its start rather than at its first save. Raises OSError."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_") as f:
        f.write(bytes(4096))
        f.flush()
        os.fsync(f.fileno())


def write_label_png(path, labels: np.ndarray) -> None:
    """Save class ids `(H, W)` uint8 as a palette PNG (pixel values are the ids), atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels must be a (H, W) uint8 array, got {labels.dtype} {labels.shape}")
    image = Image.fromarray(labels, mode="P")
    image.putpalette(voc_palette().ravel().tolist())
    atomic_write(Path(path), lambda f: image.save(f, format="PNG"))


def read_label_png(path) -> np.ndarray:
    """Class ids `(H, W)` uint8 of a palette or grayscale PNG (never converted to colours)."""
    path = Path(path)
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected a palette or grayscale label PNG, got mode {image.mode}")
        return np.array(image)


def write_json(path, obj) -> None:
    """JSON with sorted keys, written atomically."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(Path(path), lambda f: f.write(data))


def write_text(path, text: str) -> None:
    """A UTF-8 text file (an HTML report), written atomically."""
    data = text.encode()
    atomic_write(Path(path), lambda f: f.write(data))
