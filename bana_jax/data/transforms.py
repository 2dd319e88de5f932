"""Training augmentation (stages 1 and 3) and the network-input conversion.

Order, as in the official code: random scale U(0.5, 1.5) -> pad to the crop -> random crop ->
horizontal flip -> colour jitter (brightness, contrast, saturation) -> Caffe normalisation, boxes to
normalised coordinates. All randomness comes from a numpy Generator, drawn in that order.

Boxes are inclusive pixel-index coordinates (`common.py`). Every per-pixel map of the sample
(`label`, `y_crf`, `y_ret`, `bg_mask`, any other (H, W) array) is moved with the image: nearest
resizing, padding with 255 (0 for `bg_mask`), the same crop and flip. Boxes are rescaled through the
same nearest-neighbour index map as the masks (a pixel is in the rescaled box iff its source pixel
was in the box), so a box stays exactly on its object, and the background mask recomputed from the
final boxes equals the transformed one (padding aside). A box that no output pixel samples, or
that the crop leaves, is dropped: augmentation, not bad input, so not counted (common.py, "Bad
input").
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from bana_jax.constants import CAFFE_MEAN_BGR, IGNORE_INDEX
from bana_jax.data.common import bg_mask_from_boxes
from bana_jax.resize import interp_matrix, nearest_indices

log = logging.getLogger(__name__)

MEAN_RGB_PAD = (123.0, 117.0, 104.0)  # image padding value (the official code's RGB mean)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 321
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip_prob: float = 0.5
    # Brightness, contrast and saturation factors each U(1 - jitter, 1 + jitter); 0 disables.
    jitter: float = 0.5

    def __post_init__(self):
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {self.crop_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < lo <= hi, got {self.scale_range}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """One draw of the random augmentation (explicit, for tests and replay)."""

    scale: float = 1.0
    crop_y: int = 0
    crop_x: int = 0
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def _pixel_maps(sample: dict) -> list[str]:
    """Keys of the per-pixel (H, W) maps moved with the image."""
    h, w = sample["image"].shape[:2]
    return [k for k, v in sample.items()
            if k not in ("image", "boxes", "box_labels", "id") and isinstance(v, np.ndarray)
            and v.shape == (h, w)]


def _pad_value(key: str) -> int:
    return 0 if key == "bg_mask" else IGNORE_INDEX


def round_scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Training-time rescale: sides rounded to the nearest pixel, at least 1 (evaluation floors,
    as `F.interpolate(scale_factor=...)` does: `evaluation.floor_scaled_size`)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def rescale_boxes(boxes: np.ndarray, src_of_row: np.ndarray, src_of_col: np.ndarray):
    """Map boxes through nearest-neighbour source indices (the ones used for the masks).

    boxes: (K, 4) inclusive; src_of_col[j] = source column of output column j (non-decreasing).
    Output pixel j lies in the new box iff x0 <= src_of_col[j] <= x1.
    Returns (boxes (K, 4) float32, keep (K,) bool): keep is False when no output pixel is inside.
    """
    x0 = np.searchsorted(src_of_col, boxes[:, 0], side="left")
    x1 = np.searchsorted(src_of_col, boxes[:, 2], side="right") - 1
    y0 = np.searchsorted(src_of_row, boxes[:, 1], side="left")
    y1 = np.searchsorted(src_of_row, boxes[:, 3], side="right") - 1
    out = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    keep = (x1 >= x0) & (y1 >= y0)
    return out, keep


def _two_taps(matrix: np.ndarray):
    """Linear-interpolation matrix (out, in) -> first/second source index and their weights."""
    rows = np.arange(matrix.shape[0])
    i0 = (matrix != 0).argmax(axis=1)
    i1 = np.minimum(i0 + 1, matrix.shape[1] - 1)
    w1 = np.where(i1 != i0, matrix[rows, i1], 0).astype(np.float32)
    return i0, i1, matrix[rows, i0].astype(np.float32), w1


def rescale(sample: dict, scale: float) -> dict:
    """Bilinear image (align_corners=False, as F.interpolate), nearest maps, boxes through the
    nearest index map. The image becomes float32."""
    h, w = sample["image"].shape[:2]
    oh, ow = round_scaled_size(h, w, scale)
    out = dict(sample)
    if (oh, ow) == (h, w):
        out["image"] = sample["image"].astype(np.float32)
        return out
    image = sample["image"].astype(np.float32)
    # Two-tap gathers instead of matmuls: multithreaded BLAS in data workers on a busy machine
    # is ~100x slower than this.
    r0, r1, rw0, rw1 = _two_taps(interp_matrix(h, oh, False))
    c0, c1, cw0, cw1 = _two_taps(interp_matrix(w, ow, False))
    x = image[r0] * rw0[:, None, None] + image[r1] * rw1[:, None, None]
    out["image"] = x[:, c0] * cw0[None, :, None] + x[:, c1] * cw1[None, :, None]
    ri, ci = nearest_indices(h, oh), nearest_indices(w, ow)
    for k in _pixel_maps(sample):
        out[k] = sample[k][ri[:, None], ci[None, :]]
    boxes, keep = rescale_boxes(sample["boxes"], ri, ci)
    out["boxes"], out["box_labels"] = boxes[keep], sample["box_labels"][keep]
    return out


def pad_to(sample: dict, size: int) -> dict:
    """Pad bottom and right up to (size, size): image with the RGB mean, bg_mask 0, maps 255."""
    h, w = sample["image"].shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return dict(sample)
    out = dict(sample)
    image = np.empty((h + ph, w + pw, 3), np.float32)
    image[...] = np.asarray(MEAN_RGB_PAD, np.float32)
    image[:h, :w] = sample["image"]
    out["image"] = image
    for k in _pixel_maps(sample):
        m = np.full((h + ph, w + pw), _pad_value(k), sample[k].dtype)
        m[:h, :w] = sample[k]
        out[k] = m
    return out


def crop(sample: dict, top: int, left: int, size: int) -> dict:
    """Crop (size, size) at (top, left): boxes shifted, clipped, dropped when outside."""
    h, w = sample["image"].shape[:2]
    if not (0 <= top <= h - size and 0 <= left <= w - size):
        raise ValueError(f"crop ({top}, {left}, size {size}) outside an image of {(h, w)}")
    out = dict(sample)
    out["image"] = sample["image"][top:top + size, left:left + size]
    for k in _pixel_maps(sample):
        out[k] = sample[k][top:top + size, left:left + size]
    boxes = sample["boxes"] - np.array([left, top, left, top], np.float32)
    keep = ((boxes[:, 2] >= 0) & (boxes[:, 3] >= 0) & (boxes[:, 0] <= size - 1)
            & (boxes[:, 1] <= size - 1))
    boxes = np.clip(boxes[keep], 0, size - 1)
    out["boxes"], out["box_labels"] = boxes.astype(np.float32), sample["box_labels"][keep]
    return out


def hflip(sample: dict) -> dict:
    """Mirror left-right: x -> W - 1 - x, box ends swapped."""
    w = sample["image"].shape[1]
    out = dict(sample)
    out["image"] = sample["image"][:, ::-1]
    for k in _pixel_maps(sample):
        out[k] = sample[k][:, ::-1]
    b = sample["boxes"]
    out["boxes"] = np.stack([w - 1 - b[:, 2], b[:, 1], w - 1 - b[:, 0], b[:, 3]], 1).astype(
        np.float32).reshape(-1, 4)
    return out


def _gray(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of RGB (H, W, 3) -> (H, W)."""
    return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def color_jitter(image: np.ndarray, brightness: float, contrast: float,
                 saturation: float) -> np.ndarray:
    """Brightness, contrast, saturation in that order (torchvision's formulas on 0..255 floats,
    clipped after each step). image: float32 (H, W, 3) RGB."""
    x = np.clip(image * brightness, 0, 255)
    mean = _gray(x).mean()
    x = np.clip((x - mean) * contrast + mean, 0, 255)
    g = _gray(x)[..., None]
    return np.clip((x - g) * saturation + g, 0, 255).astype(np.float32)


def caffe_normalize(image_rgb: np.ndarray) -> np.ndarray:
    """RGB 0..255 (..., 3) -> BGR minus the Caffe mean, float32."""
    return (np.asarray(image_rgb, np.float32)[..., ::-1] - CAFFE_MEAN_BGR).astype(np.float32)


def normalize_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel-index boxes -> `x / ((W - 1) / 2) - 1` (and y with H): -1 at pixel 0, +1 at W - 1."""
    sx, sy = (width - 1) / 2, (height - 1) / 2
    return (np.asarray(boxes, np.float32) / np.array([sx, sy, sx, sy], np.float32) - 1).astype(
        np.float32)


def draw_params(rng: np.random.Generator, height: int, width: int,
                cfg: AugmentConfig) -> AugmentParams:
    """Draw scale, crop offset, flip and jitter factors, in that order."""
    scale = float(rng.uniform(*cfg.scale_range))
    sh, sw = round_scaled_size(height, width, scale)
    ph, pw = max(sh, cfg.crop_size), max(sw, cfg.crop_size)
    crop_y = int(rng.integers(0, ph - cfg.crop_size + 1))
    crop_x = int(rng.integers(0, pw - cfg.crop_size + 1))
    flip = bool(rng.uniform() < cfg.flip_prob)
    j = cfg.jitter
    b, c, s = (rng.uniform(1 - j, 1 + j, 3) if j > 0 else (1.0, 1.0, 1.0))
    return AugmentParams(scale, crop_y, crop_x, flip, float(b), float(c), float(s))


def apply_augment(sample: dict, params: AugmentParams, crop_size: int) -> dict:
    """Geometric and photometric augmentation with given parameters; stays in pixel space.

    Returns a sample with `image` float32 (S, S, 3) RGB, `boxes` (K', 4) pixel coordinates,
    `bg_mask` uint8 (S, S) (computed from the boxes first when the sample has none) and every
    other per-pixel map (S, S).
    """
    s = dict(sample)
    h, w = s["image"].shape[:2]
    s["boxes"] = np.asarray(s["boxes"], np.float32).reshape(-1, 4)
    s["box_labels"] = np.asarray(s["box_labels"], np.int32).reshape(-1)
    if "bg_mask" not in s:
        s["bg_mask"] = bg_mask_from_boxes(s["boxes"], h, w)
    s = rescale(s, params.scale)
    s = pad_to(s, crop_size)
    s = crop(s, params.crop_y, params.crop_x, crop_size)
    if params.flip:
        s = hflip(s)
    s["image"] = color_jitter(s["image"], params.brightness, params.contrast, params.saturation)
    for k in _pixel_maps(s):
        s[k] = np.ascontiguousarray(s[k])
    return s


def to_network(sample: dict) -> dict:
    """Pixel-space sample -> network inputs: Caffe-normalised BGR image, float bg_mask,
    normalised boxes; other maps unchanged (uint8)."""
    out = dict(sample)
    h, w = sample["image"].shape[:2]
    out["image"] = np.ascontiguousarray(caffe_normalize(sample["image"]))
    out["bg_mask"] = sample["bg_mask"].astype(np.float32)
    out["boxes"] = normalize_boxes(sample["boxes"], h, w)
    return out


def train_transform(sample: dict, rng: np.random.Generator, cfg: AugmentConfig) -> dict:
    """The full stage-1/3 training transform of one raw sample (see module docstring)."""
    h, w = sample["image"].shape[:2]
    params = draw_params(rng, h, w, cfg)
    return to_network(apply_augment(sample, params, cfg.crop_size))
