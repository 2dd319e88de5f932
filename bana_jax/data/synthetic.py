"""An embedded synthetic box-supervision dataset, generated on the fly and deterministic from a seed.

Each scene holds a few objects of L classes on a cluttered, textured background. A class is a
non-rectangular shape with its own hue and texture (ellipse: stripes, triangle: checker, ring: dots,
star: plain with noise, crescent: diagonal stripes, cross: grid). Shapes are randomly sized,
stretched and rotated, so they fill only part of their box: filling boxes with their class is
clearly worse than a good pseudo label (see `box_fill_miou`). The background carries smooth colour
noise and distractor clutter (rectangles, bars, small blobs in random colours) that is never an
object. Later objects occlude earlier ones; the label map and the boxes (tight around each object's
visible pixels) are exact.

Sample `i` of a dataset with seed `s` depends only on `(s, i)`: no files are read or written.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bana_jax import baselines, metrics
from bana_jax.resize import interp_matrix

SHAPES = ("ellipse", "triangle", "ring", "star", "crescent", "cross")
# Base hues (RGB) chosen far apart; each instance jitters them a little.
CLASS_COLOURS = np.array([
    [220, 40, 40],    # red
    [40, 90, 230],    # blue
    [240, 200, 30],   # yellow
    [40, 190, 70],    # green
    [200, 60, 220],   # magenta
    [30, 210, 220],   # cyan
], np.float32)
MAX_CLASSES = len(SHAPES)
# The two splits are two seeds of the same generator.
SPLIT_SEEDS = {"train": 0, "val": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """num_classes L (1..6): classes 1..L are the first L of `SHAPES`."""

    num_images: int = 200
    image_size: int = 112
    num_classes: int = 4
    min_objects: int = 2
    max_objects: int = 4
    num_distractors: int = 6
    seed: int = 0
    # An object whose visible part is below this fraction of its full shape gets no box; its
    # visible pixels are labelled 255 (ignore), like an unannotated object.
    min_visible_fraction: float = 0.35

    def __post_init__(self):
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {self.num_classes}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                             f"{self.max_objects}")
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")


def class_names(num_classes: int) -> tuple[str, ...]:
    """('background', 'ellipse', ...) for class ids 0..L."""
    return ("background",) + SHAPES[:num_classes]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Membership of local coordinates (u, v) (object frame, unit radius) in a shape."""
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    if shape == "ellipse":
        return rho <= 1.0
    if shape == "triangle":
        # Equilateral triangle inscribed in the unit circle: three half-planes.
        inside = np.ones(u.shape, bool)
        for k in range(3):
            a = 2 * np.pi * k / 3 + np.pi / 2
            inside &= (u * np.cos(a) + v * np.sin(a)) >= -0.5
        return inside
    if shape == "ring":
        inner = rng.uniform(0.5, 0.68)
        return (rho <= 1.0) & (rho >= inner)
    if shape == "star":
        points = int(rng.integers(5, 7))
        inner = rng.uniform(0.38, 0.5)
        # Radius of a star polygon with straight edges, as a function of the angle.
        sector = 2 * np.pi / points
        t = np.mod(phi, sector) / sector
        t = np.minimum(t, 1 - t) * 2  # 0 at a tip, 1 between tips
        ang = t * sector / 2
        # Straight edge from the tip (1, 0) to the valley (inner, sector/2).
        x1, y1 = 1.0, 0.0
        x2, y2 = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
        num = x1 * y2 - y1 * x2
        den = np.cos(ang) * (y2 - y1) - np.sin(ang) * (x2 - x1)
        return rho <= num / den
    if shape == "crescent":
        off = rng.uniform(0.45, 0.65)
        return (rho <= 1.0) & (np.hypot(u - off, v) > 0.85)
    if shape == "cross":
        w = rng.uniform(0.22, 0.32)
        return ((np.abs(u) <= w) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= w) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(shape: str, xs: np.ndarray, ys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class intensity modulation in [0.55, 1.15], (H, W)."""
    if shape == "ellipse":  # stripes
        period = rng.uniform(4, 7)
        return np.where(np.sin(2 * np.pi * xs / period) > 0, 1.1, 0.7)
    if shape == "triangle":  # checker
        p = rng.uniform(4, 7)
        return np.where((np.floor(xs / p) + np.floor(ys / p)) % 2 == 0, 1.1, 0.65)
    if shape == "ring":  # dots
        p = rng.uniform(5, 8)
        d = np.hypot(np.mod(xs, p) - p / 2, np.mod(ys, p) - p / 2)
        return np.where(d < p / 4, 0.6, 1.05)
    if shape == "star":  # plain, with fine noise
        return 1.0 + 0.12 * rng.standard_normal(xs.shape)
    if shape == "crescent":  # diagonal stripes
        p = rng.uniform(5, 8)
        return np.where(np.mod(xs + ys, p) < p / 2, 1.1, 0.7)
    if shape == "cross":  # grid lines
        p = rng.uniform(5, 8)
        return np.where((np.mod(xs, p) < 1.5) | (np.mod(ys, p) < 1.5), 0.6, 1.05)
    raise ValueError(f"unknown shape {shape!r}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise (size, size, channels) in [0, 1]: a coarse grid upsampled bilinearly."""
    coarse = rng.uniform(0, 1, (cells, cells, channels)).astype(np.float32)
    m = interp_matrix(cells, size, False)
    return np.einsum("oh,hwc->owc", m, np.einsum("pw,hwc->hpc", m, coarse))


def _background(rng: np.random.Generator, size: int, num_distractors: int, xs, ys) -> np.ndarray:
    """Textured, cluttered background (size, size, 3) float32 in 0..255."""
    base = rng.uniform(60, 190, 3).astype(np.float32)
    img = base + 90 * (_smooth_noise(rng, size, 4, 3) - 0.5)
    img += 25 * (_smooth_noise(rng, size, 16, 1) - 0.5)
    for _ in range(num_distractors):
        colour = rng.uniform(20, 235, 3).astype(np.float32)
        kind = rng.integers(3)
        cx, cy = rng.uniform(0, size, 2)
        if kind == 0:  # axis-aligned rectangle
            w, h = rng.uniform(0.08, 0.3, 2) * size
            m = (np.abs(xs - cx) <= w / 2) & (np.abs(ys - cy) <= h / 2)
        elif kind == 1:  # long thin bar at a random angle
            a = rng.uniform(0, np.pi)
            length, width = rng.uniform(0.3, 0.9) * size, rng.uniform(1.5, 3.5)
            along = (xs - cx) * np.cos(a) + (ys - cy) * np.sin(a)
            across = -(xs - cx) * np.sin(a) + (ys - cy) * np.cos(a)
            m = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        else:  # small blob
            r = rng.uniform(0.02, 0.06) * size
            m = np.hypot(xs - cx, ys - cy) <= r
        img[m] = 0.6 * colour + 0.4 * img[m]
    return img


def render_scene(cfg: SyntheticConfig, index: int) -> dict:
    """Sample `index`: a raw sample dict (image, boxes, box_labels, label, id)."""
    if not 0 <= index < cfg.num_images:
        raise IndexError(f"index {index} out of range for {cfg.num_images} synthetic images")
    rng = np.random.default_rng([cfg.seed, index])
    size = cfg.image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    img = _background(rng, size, cfg.num_distractors, xs, ys)
    label = np.zeros((size, size), np.uint8)
    instance = np.full((size, size), -1, np.int32)

    num_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    classes, full_areas = [], []
    for k in range(num_objects):
        cls = int(rng.integers(1, cfg.num_classes + 1))
        shape = SHAPES[cls - 1]
        radius = rng.uniform(0.14, 0.3) * size
        stretch = rng.uniform(0.6, 1.0)  # minor / major axis
        angle = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        dx, dy = xs - cx, ys - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / radius
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / (radius * stretch)
        mask = _shape_mask(shape, u, v, rng)
        colour = CLASS_COLOURS[cls - 1] * rng.uniform(0.85, 1.1) + rng.uniform(-15, 15, 3)
        tex = _texture(shape, xs, ys, rng)
        obj = np.clip(colour[None, None, :] * tex[..., None], 0, 255)
        img[mask] = obj[mask]
        label[mask] = cls
        instance[mask] = k
        classes.append(cls)
        full_areas.append(int(mask.sum()))

    boxes, box_labels = [], []
    for k, cls in enumerate(classes):
        visible = instance == k
        n = int(visible.sum())
        if full_areas[k] == 0 or n < cfg.min_visible_fraction * full_areas[k]:
            label[visible] = 255  # mostly hidden or off-image: unannotated, so ignored
            continue
        yy, xx = np.nonzero(visible)
        boxes.append([xx.min(), yy.min(), xx.max(), yy.max()])
        box_labels.append(cls)

    # Mild sensor noise and a slight blur so edges are not perfectly crisp.
    img += rng.normal(0, 6, img.shape)
    img = 0.5 * img + 0.125 * (np.roll(img, 1, 0) + np.roll(img, -1, 0) + np.roll(img, 1, 1)
                               + np.roll(img, -1, 1))
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return dict(image=image, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                box_labels=np.asarray(box_labels, np.int32), label=label,
                id=f"synthetic_{cfg.seed}_{index:06d}")


class SyntheticSource:
    """Random-access source of synthetic samples (grain `RandomAccessDataSource` protocol)."""

    def __init__(self, cfg: SyntheticConfig | None = None, **kwargs):
        self.cfg = cfg if cfg is not None else SyntheticConfig(**kwargs)
        self.class_names = class_names(self.cfg.num_classes)

    def __len__(self) -> int:
        return self.cfg.num_images

    def __getitem__(self, index: int) -> dict:
        return render_scene(self.cfg, int(index))

    def __repr__(self) -> str:
        return f"SyntheticSource({self.cfg})"


def box_fill_miou(source, num_images: int | None = None) -> float:
    """mIoU (background included) of the box-filling baseline against the ground truth."""
    num_classes = len(source.class_names)
    conf = np.zeros((num_classes, num_classes), np.int64)
    for i in range(len(source) if num_images is None else min(num_images, len(source))):
        s = source[i]
        conf += metrics.confusion_matrix(baselines.box_fill(s["boxes"], s["box_labels"], s["label"].shape),
                                         s["label"], num_classes)
    return metrics.mean_iou(conf)
