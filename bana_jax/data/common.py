"""The sample format shared by every source, image reading with checks, and box sanitising.

A *sample* is a dict:

- ``image``: uint8 (H, W, 3), RGB.
- ``boxes``: float32 (K, 4), ``x0, y0, x1, y1`` in pixel-index coordinates (pixel centres at
  integers, both ends inclusive: a box covering columns 3..7 has x0 = 3, x1 = 7).
- ``box_labels``: int32 (K,), class ids (1..L; 0 is background and never a box label).
- ``label``: uint8 (H, W), semantic ground truth, 255 = ignore.
- ``id``: str.
- optionally ``bg_mask``: uint8 (H, W), 1 outside every box (read from ``BgMaskfromBoxes/``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE = 255


class DataError(Exception):
    """A bad input file. The message starts with the offending path."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class BoxStats:
    """Counts of boxes changed while reading (clipped to the image, or dropped)."""

    kept: int = 0
    clipped: int = 0
    dropped_empty: int = 0
    dropped_outside: int = 0
    skipped_samples: list = field(default_factory=list)

    def log_summary(self, name: str = "") -> None:
        log.info("%s boxes: kept %d, clipped %d, dropped (zero area) %d, dropped (outside) %d; "
                 "skipped samples %d", name, self.kept, self.clipped, self.dropped_empty,
                 self.dropped_outside, len(self.skipped_samples))


def sanitize_boxes(boxes, labels, height: int, width: int, stats: BoxStats | None = None):
    """Clip boxes to the image and drop those with no pixel inside it.

    boxes: (K, 4) x0, y0, x1, y1 pixel-index coordinates (inclusive); labels: (K,).
    A box with x1 < x0 or y1 < y0 (zero area, or inverted) is dropped as empty; a box lying wholly
    outside [0, W-1] x [0, H-1] is dropped as outside; others are clipped (counted when changed).
    Returns float32 (K', 4), int32 (K',).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    stats = stats if stats is not None else BoxStats()
    empty = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    outside = ~empty & ((boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > width - 1)
                        | (boxes[:, 1] > height - 1))
    keep = ~empty & ~outside
    clipped = boxes[keep].copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width - 1)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height - 1)
    stats.clipped += int(np.any(clipped != boxes[keep], axis=1).sum())
    stats.dropped_empty += int(empty.sum())
    stats.dropped_outside += int(outside.sum())
    stats.kept += int(keep.sum())
    return clipped.astype(np.float32), labels[keep]


def box_masks(boxes, height: int, width: int) -> np.ndarray:
    """Pixels covered by each box: bool (K, H, W). Pixel (i, j) is in box k iff
    x0 <= j <= x1 and y0 <= i <= y1."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    ys = np.arange(height, dtype=np.float32)[None, :, None]
    xs = np.arange(width, dtype=np.float32)[None, None, :]
    b = boxes[:, :, None, None]
    return (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])


def bg_mask_from_boxes(boxes, height: int, width: int) -> np.ndarray:
    """Background mask M: uint8 (H, W), 1 outside every box, 0 inside any box."""
    if len(boxes) == 0:
        return np.ones((height, width), np.uint8)
    return (~box_masks(boxes, height, width).any(0)).astype(np.uint8)


def check_rgb(arr: np.ndarray, mode: str, path, convert: bool) -> np.ndarray:
    """Validate a decoded image array of PIL ``mode`` and return uint8 (H, W, 3).

    RGB passes; 8-bit grayscale is replicated to 3 channels (lossless). RGBA, CMYK, palette,
    16-bit and other modes raise :class:`DataError` unless ``convert`` (then: alpha dropped,
    CMYK/palette converted by PIL, 16-bit scaled to 8 bits).
    """
    if mode == "RGB":
        return arr
    if mode == "L":
        return np.repeat(arr[:, :, None], 3, axis=2)
    if not convert:
        kind = {"RGBA": "RGBA (has an alpha channel)", "CMYK": "CMYK", "P": "palette",
                "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I": "32-bit integer",
                "LA": "grayscale with alpha", "1": "1-bit"}.get(mode, mode)
        raise DataError(path, f"unsupported image mode {kind}; expected 8-bit RGB or grayscale "
                              f"(pass convert_modes=True to convert)")
    raise AssertionError("converted by read_image")


def read_image(path, convert_modes: bool = False) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB; raises :class:`DataError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in ("RGB", "L") and convert_modes:
                if mode.startswith("I"):
                    a = np.asarray(im, dtype=np.float64)
                    a = a * (255.0 / 65535.0) if a.max() > 255 else a
                    g = np.clip(np.round(a), 0, 255).astype(np.uint8)
                    return np.repeat(g[:, :, None], 3, axis=2)
                im = im.convert("RGB")
                mode = "RGB"
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"truncated or corrupt image ({e})") from None
    return np.ascontiguousarray(check_rgb(arr, mode, path, convert_modes))


def read_index_png(path) -> np.ndarray:
    """Read a label map (palette or 8-bit grayscale PNG) as its uint8 (H, W) indices."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(path, f"label map must be a palette or 8-bit grayscale PNG, "
                                      f"got mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"truncated or corrupt image ({e})") from None


def make_sample(image, boxes, box_labels, label, sample_id, bg_mask=None) -> dict:
    """Assemble and check a sample dict (see module docstring)."""
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    if image.shape != (h, w, 3):
        raise ValueError(f"{sample_id}: image shape {image.shape}, expected (H, W, 3)")
    label = np.asarray(label, np.uint8)
    if label.shape != (h, w):
        raise DataError(sample_id, f"label shape {label.shape} differs from image {(h, w)}")
    s = dict(image=image, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
             box_labels=np.asarray(box_labels, np.int32).reshape(-1), label=label,
             id=str(sample_id))
    if bg_mask is not None:
        bg_mask = np.asarray(bg_mask, np.uint8)
        if bg_mask.shape != (h, w):
            raise DataError(sample_id, f"bg mask shape {bg_mask.shape} differs from image {(h, w)}")
        s["bg_mask"] = bg_mask
    return s


def load_or_skip(load, index: int, length: int, skip_bad: bool, stats: BoxStats,
                 max_tries: int = 100) -> dict:
    """`load(index)`; with `skip_bad`, a :class:`DataError` is logged and counted and the next
    index (cyclically) is tried instead, so a random-access source never fails mid-epoch."""
    for attempt in range(min(length, max_tries)):
        try:
            return load((index + attempt) % length)
        except DataError as e:
            if not skip_bad:
                raise
            log.warning("skipping bad sample: %s", e)
            stats.skipped_samples.append(str(e))
    raise DataError(f"index {index}", f"{min(length, max_tries)} consecutive bad samples")
