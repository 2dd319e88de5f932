"""The sample format shared by every source, image reading with checks, and box sanitising.

A *sample* is a dict:

- ``image``: uint8 (H, W, 3), RGB.
- ``boxes``: float32 (K, 4), ``x0, y0, x1, y1`` in pixel-index coordinates (pixel centres at
  integers, both ends inclusive: a box covering columns 3..7 has x0 = 3, x1 = 7).
- ``box_labels``: int32 (K,), class ids (1..L; 0 is background and never a box label).
- ``label``: uint8 (H, W), semantic ground truth, 255 = ignore.
- ``id``: str.
- optionally ``bg_mask``: uint8 (H, W), 1 outside every box (read from ``BgMaskfromBoxes/``).

Bad input. A file-based source reads and checks its annotation files when it is built: a broken
entry raises :class:`DataError` naming the file (with ``skip_bad``: the sample is dropped, logged
and listed in ``source.audit.skipped_samples``), and the boxes of every sample are checked against
the image size the annotations declare, counted in ``source.audit`` (:class:`BoxStats`) and logged
once, in the process that builds the source. Images are decoded when a sample is loaded; a bad one
raises, or with ``skip_bad`` is skipped, logged and listed in ``source.stats.skipped_samples``.

``source.stats`` counts what the loads of *this process* did. grain worker processes each load
into their own copy of the source, so their counts are never merged back or logged: in a training
run the main process's ``audit`` is the figure to read. Not counted anywhere: boxes that
augmentation removes (rescaled to no pixel, or left by the crop: ``transforms``), which are the
expected effect of a random crop rather than bad input, and boxes cut past ``max_boxes``
(``batching``, which logs them per batch in the process that batches).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)



class DataError(Exception):
    """A bad input file. The message starts with the offending path."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        # Rebuilt from (path, problem), not from the message: errors raised in data-loader
        # worker processes reach the parent with their file and reason.
        return type(self), (self.path, self.problem)


@dataclass
class BoxStats:
    """Counts of boxes checked against their image (kept, clipped to it, or dropped), of boxes
    that could not be checked (image size not given by the annotations: checked when loaded), and
    the samples skipped as bad (``skip_bad``), one message each."""

    kept: int = 0
    clipped: int = 0
    dropped_empty: int = 0
    dropped_outside: int = 0
    unchecked: int = 0
    skipped_samples: list = field(default_factory=list)

    def log_summary(self, name: str = "") -> None:
        """Once per source: a warning when boxes were dropped, else information."""
        level = logging.WARNING if self.dropped_empty or self.dropped_outside else logging.INFO
        log.log(level, "%s boxes: kept %d, clipped %d, dropped (zero area) %d, "
                "dropped (outside) %d%s; skipped samples %d", name, self.kept, self.clipped,
                self.dropped_empty, self.dropped_outside,
                f", not checked (image size unknown) {self.unchecked}" if self.unchecked else "",
                len(self.skipped_samples))


def sanitize_boxes(boxes, labels, height, width, stats: BoxStats | None = None):
    """Clip boxes to the image and drop those with no pixel inside it.

    boxes: (K, 4) x0, y0, x1, y1 pixel-index coordinates (inclusive); labels: (K,); height, width:
    the image size, or (K,) sizes of each box's image (to check a whole dataset at once).
    A box with x1 < x0 or y1 < y0 (zero area, or inverted) is dropped as empty; a box lying wholly
    outside [0, W-1] x [0, H-1] is dropped as outside; others are clipped (counted when changed).
    Returns float32 (K', 4), int32 (K',).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    stats = stats if stats is not None else BoxStats()
    x_max = np.broadcast_to(np.asarray(width, np.float32) - 1, (len(boxes),))
    y_max = np.broadcast_to(np.asarray(height, np.float32) - 1, (len(boxes),))
    empty = ~np.all(np.isfinite(boxes), axis=1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    outside = ~empty & ((boxes[:, 2] < 0) | (boxes[:, 3] < 0) | (boxes[:, 0] > x_max)
                        | (boxes[:, 1] > y_max))
    keep = ~empty & ~outside
    clipped = boxes[keep].copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, x_max[keep, None])
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, y_max[keep, None])
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


# PIL modes (and the "<raw mode>;16" of 16-bit colour, see _source_mode) as error messages say them.
_MODE_NAMES = {"RGBA": "RGBA (has an alpha channel)", "CMYK": "CMYK", "P": "palette",
               "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
               "I": "32-bit integer", "F": "32-bit float", "LA": "grayscale with alpha",
               "1": "1-bit", "RGB;16": "16-bit RGB", "RGBA;16": "16-bit RGBA",
               "LA;16": "16-bit grayscale with alpha"}


def _source_mode(im) -> str:
    """The mode of the file's pixels, told apart from PIL's decoded mode for 16-bit colour.

    PIL decodes 16 bits per channel colour (PNG raw mode 'RGB;16B', TIFF 'RGB;16N', ...) to 8-bit
    'RGB' / 'RGBA', silently keeping the high byte; only the raw mode of the tiles, which
    `load()` discards, tells. Call before `load()`.
    """
    if im.mode.startswith("I"):  # 16-bit grayscale already has its own mode
        return im.mode
    for tile in im.tile:
        args = tile.args
        raw = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
        if ";16" in raw:
            return raw.split(";")[0] + ";16"
    return im.mode


def _to_rgb(im, mode: str, where, convert: bool) -> np.ndarray:
    """A loaded PIL image whose file has `mode` (_source_mode) -> uint8 (H, W, 3).

    RGB passes; 8-bit grayscale is replicated to 3 channels (lossless). Other modes raise
    :class:`DataError` unless `convert`; then (logged): alpha dropped, CMYK / palette converted by
    PIL, 16-bit colour keeps its high byte (PIL's decoding), 16-bit grayscale scaled by 255/65535.
    """
    if mode == "RGB":
        return np.asarray(im)
    if mode == "L":
        return np.repeat(np.asarray(im)[:, :, None], 3, axis=2)
    kind = _MODE_NAMES.get(mode, mode)
    if not convert:
        raise DataError(where, f"unsupported image mode {kind}; expected 8-bit RGB or grayscale "
                               f"(--config.data.convert_modes=true converts it)")
    log.info("%s: converting image mode %s to 8-bit RGB", where, kind)
    if mode.startswith("I"):
        a = np.asarray(im, dtype=np.float64)
        # 'I' (32-bit) has no fixed range: take values up to 255 as 8-bit, larger ones as 16-bit.
        if mode.startswith("I;16") or a.max() > 255:
            a = a * (255.0 / 65535.0)
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode_image(file, where, convert_modes: bool = False) -> np.ndarray:
    """Decode an image (a path or a binary file object) as uint8 (H, W, 3) RGB.

    Raises :class:`DataError` naming `where` (the path, or a sample id) for a corrupt, truncated
    or unsupported image (modes: see _to_rgb).
    """
    try:
        with Image.open(file) as im:
            mode = _source_mode(im)
            im.load()
            return np.ascontiguousarray(_to_rgb(im, mode, where, convert_modes))
    except UnidentifiedImageError:
        raise DataError(where, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(where, f"truncated or corrupt image ({e})") from None


def read_image(path, convert_modes: bool = False) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB; raises :class:`DataError` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "file not found")
    return decode_image(path, path, convert_modes)


def read_index_png(path) -> np.ndarray:
    """Read a label map (palette or 8-bit grayscale PNG) as its uint8 (H, W) indices."""
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


def skip_or_raise(error: DataError, skip_bad: bool, stats: BoxStats) -> None:
    """Raise `error`, or with `skip_bad` log it and list it in `stats.skipped_samples`, once per
    file and reason (in each process)."""
    if not skip_bad:
        raise error
    if str(error) in stats.skipped_samples:  # the same file again, in a later epoch
        log.debug("skipping bad sample: %s", error)
        return
    log.warning("skipping bad sample: %s", error)
    stats.skipped_samples.append(str(error))


def load_or_skip(load, index: int, length: int, skip_bad: bool, stats: BoxStats,
                 max_tries: int = 100) -> dict:
    """`load(index)`; with `skip_bad`, a :class:`DataError` is logged and counted and the next
    index (cyclically) is tried instead, so a random-access source never fails mid-epoch."""
    for attempt in range(min(length, max_tries)):
        try:
            return load((index + attempt) % length)
        except DataError as e:
            skip_or_raise(e, skip_bad, stats)
    raise DataError(f"index {index}", f"{min(length, max_tries)} consecutive bad samples")
