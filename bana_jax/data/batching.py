"""Fixed-shape training batches for jit: boxes padded to `max_boxes` with a validity mask.

Batch dict (NumPy): `image` float32 (B, S, S, 3), `bg_mask` float32 (B, S, S), `boxes` float32
(B, K_max, 4), `box_labels` int32 (B, K_max), `box_valid` bool (B, K_max), and every uint8
per-pixel map the samples carry (`label`, `y_crf`, `y_ret`) as (B, S, S).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

BATCH_KEYS = ("image", "bg_mask", "boxes", "box_labels", "box_valid")


def pad_boxes(sample: dict, max_boxes: int) -> dict:
    """Pad (or cut) a network-ready sample's boxes to `max_boxes`.

    Past `max_boxes` the largest boxes are kept (in their original order) and the others dropped,
    with a logged warning; `box_dropped` records how many. Padding rows are zero with label 0 and
    `box_valid` False.
    """
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(sample["box_labels"], np.int32).reshape(-1)
    n = len(boxes)
    dropped = max(n - max_boxes, 0)
    if dropped:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
        boxes, labels = boxes[keep], labels[keep]
        log.debug("sample %s: %d boxes, dropped the %d smallest (max_boxes=%d)",
                    sample.get("id", "?"), n, dropped, max_boxes)
    k = len(boxes)
    out = dict(sample)
    out["boxes"] = np.zeros((max_boxes, 4), np.float32)
    out["boxes"][:k] = boxes
    out["box_labels"] = np.zeros((max_boxes,), np.int32)
    out["box_labels"][:k] = labels
    out["box_valid"] = np.arange(max_boxes) < k
    out["box_dropped"] = np.int32(dropped)
    return out


def _stack_keys(samples: list[dict]) -> list[str]:
    shape = samples[0]["image"].shape[:2]
    keys = list(BATCH_KEYS)
    for k, v in samples[0].items():
        if (k not in keys and isinstance(v, np.ndarray) and v.dtype == np.uint8
                and v.shape == shape and all(k in s for s in samples)):
            keys.append(k)
    return keys


def collate(samples: list[dict], max_boxes: int | None = None) -> dict:
    """Stack network-ready samples into a batch dict; pads boxes first when `max_boxes` is given
    (otherwise the samples must already be padded). Logs the number of boxes dropped."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if max_boxes is not None:
        samples = [pad_boxes(s, max_boxes) for s in samples]
    keys = _stack_keys(samples)
    batch = {}
    for k in keys:
        shapes = {np.shape(s[k]) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"cannot batch {k!r}: samples have shapes {sorted(shapes)}")
        batch[k] = np.stack([s[k] for s in samples])
    dropped = sum(int(s.get("box_dropped", 0)) for s in samples)
    if dropped:
        log.warning("batch: %d boxes dropped past max_boxes", dropped)
    return batch
