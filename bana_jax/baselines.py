"""Box-supervised pseudo-label baselines of the paper's Table 1: box-fill and GrabCut (CPU, NumPy).

Both return a uint8 label map `(H, W)` (0 = background, else the box's class id). Where boxes
overlap the smaller box is drawn on top.

Boxes are in the raw-sample convention of the data sources (`bana_jax.data.common`): pixel indices,
both ends inclusive, so `[3, 0, 7, 4]` covers columns 3..7 and rows 0..4 (COCO `[x, y, x + w - 1,
y + h - 1]`, VOC minus one). `pseudo_labels` takes half-open boxes instead (the official
`mask[y0:y1, x0:x1]`); `half_open_boxes` converts, and the stage-2 runner feeds both from it.
"""

from __future__ import annotations

import numpy as np

from bana_jax.pseudo_labels import box_pixels


def half_open_boxes(boxes) -> np.ndarray:
    """Inclusive pixel boxes `(K, 4)` `[x_min, y_min, x_max, y_max]` -> half-open `[x0, y0, x1, y1)`
    (x_max + 1, y_max + 1), the convention of `pseudo_labels.box_pixels`. float32 `(K, 4)`."""
    boxes = np.array(boxes, np.float32)  # a copy
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) [x_min, y_min, x_max, y_max], got shape {boxes.shape}")
    boxes[:, 2:] += 1.0
    return boxes


def official_region_boxes(boxes) -> np.ndarray:
    """Inclusive pixel boxes `(K, 4)` -> the half-open boxes whose union is the official code's in-box
    region (`BgMaskfromBoxes`: `[ymin:ymax, xmin:xmax]` of the VOC XML values, no round trip)."""
    xml = half_open_boxes(boxes)
    xml[:, :2] += 1.0
    return xml


def official_half_open_boxes(boxes, image_hw) -> np.ndarray:
    """Inclusive pixel boxes `(K, 4)` -> the half-open boxes the official stage 2 labels with.

    The official code reads the VOC XML values (1-based, inclusive: our box + 1) as if they were
    0-based half-open bounds, so each box loses its first row and column, and it reaches them
    through a float32 round trip, `x / ((W - 1) / 2) - 1` in the data transform and `x_n * n + n`
    in stage 2, truncated by `.long()`: about one bound in twenty comes back one pixel lower.
    This reproduces both steps in float32. Its in-box region comes from the exact XML values
    instead (`official_region_boxes`), so a lowered bound leaves a row or column of the box outside
    the region. float32 `(K, 4)` `[x0, y0, x1, y1)`.
    """
    xml = official_region_boxes(boxes)
    height, width = _check_image_hw(image_hw)
    out = xml.copy()
    for cols, size in (([0, 2], width), ([1, 3], height)):
        if size < 2:  # the official normalisation divides by zero: nothing to reproduce
            continue
        half = np.float32((size - 1) / 2)
        normalised = xml[:, cols] / half - np.float32(1)
        out[:, cols] = np.trunc(normalised * half + half)
    return out.astype(np.float32)


def _check_image_hw(image_hw):
    if len(image_hw) != 2 or min(image_hw) < 1:
        raise ValueError(f"image_hw must be (height, width) >= 1, got {image_hw}")
    return int(image_hw[0]), int(image_hw[1])


def _boxes_large_to_small(boxes, box_labels, image_hw):
    px = box_pixels(half_open_boxes(boxes), image_hw)
    labels = np.asarray(box_labels)
    if labels.shape != (len(px),):
        raise ValueError(f"box_labels must be (K,) = ({len(px)},), got shape {labels.shape}")
    if np.any(labels < 1) or np.any(labels > 254):
        raise ValueError(f"box_labels must be class ids in 1..254, got {labels.tolist()}")
    areas = (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1])
    order = np.argsort(-areas, kind="stable")  # large first, so smaller ones are painted over them
    return px[order], labels[order]


def box_fill(boxes, box_labels, image_hw) -> np.ndarray:
    """Each box filled with its class, smaller boxes on top. -> uint8 `(H, W)`.

    boxes `(K, 4)` inclusive pixel `[x_min, y_min, x_max, y_max]`; box_labels `(K,)` in 1..254.
    """
    height, width = _check_image_hw(image_hw)
    label = np.zeros((height, width), np.uint8)
    for (x0, y0, x1, y1), cls in zip(*_boxes_large_to_small(boxes, box_labels, (height, width))):
        label[y0:y1, x0:x1] = cls
    return label


def grabcut_box(image, box_px, *, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """GrabCut initialised from one half-open integer box `[x0, y0, x1, y1)` (rows y0..y1-1)
    -> bool foreground `(H, W)`.

    Outside the box is definite background, inside probable foreground (cv2.GC_INIT_WITH_RECT).
    A box that leaves no background pixel, or is thinner than 2 pixels, is returned filled
    (GrabCut needs samples of both models).
    """
    import cv2  # opencv-python-headless; imported here so the rest of bana_jax does not need it

    height, width = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box_px)
    fg = np.zeros((height, width), bool)
    if x1 - x0 < 2 or y1 - y0 < 2:
        fg[y0:y1, x0:x1] = True
        return fg
    if x0 == 0 and y0 == 0 and x1 == width and y1 == height:
        fg[:] = True
        return fg
    mask = np.zeros((height, width), np.uint8)
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)  # GrabCut's k-means initialisation is random
    # OpenCV's channel order does not matter to the colour models; contiguous uint8 is required.
    cv2.grabCut(np.ascontiguousarray(image), mask, (x0, y0, x1 - x0, y1 - y0), bgd_model, fgd_model,
                iterations, cv2.GC_INIT_WITH_RECT)
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    inside = np.zeros_like(fg)
    inside[y0:y1, x0:x1] = True
    return fg & inside


def grabcut(image, boxes, box_labels, *, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """GrabCut per box; each box's foreground gets its class, smaller boxes on top. -> uint8 `(H, W)`.

    image uint8 `(H, W, 3)`; boxes `(K, 4)` inclusive pixel `[x_min, y_min, x_max, y_max]`;
    box_labels `(K,)`.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    label = np.zeros((height, width), np.uint8)
    for box, cls in zip(*_boxes_large_to_small(boxes, box_labels, (height, width))):
        label[grabcut_box(image, box, iterations=iterations, seed=seed)] = cls
    return label
