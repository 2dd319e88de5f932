"""`bana evaluate-cams`: CAM precision and ground-truth-box accuracy of a trained stage-1 labeler.

    bana evaluate-cams --config=configs/voc/stage1.py --workdir=runs/voc_stage1

Both metrics are from the supplement, Sec. 2 (paper: CAM precision GAP 73.0 / BAP 77.9 on VOC
train, Table 2; box classification GAP 80.3% / BAP 82.3% on VOC val).

CAM precision (split `eval.cam_split`). Each image is taken whole, at its own size (batch 1, eval
mode), as stage 2 does. The class activation map `CAM_c = ReLU(f . w_c)` uses the features
upsampled to the image size (bilinear, align_corners=True); since the upsampling is linear it is
computed as `ReLU(upsample(f . w_c))`. The normalised score `u_c` (main paper Eq. 5) divides
`CAM_c` by its maximum inside each box of class c (boxes in order, later ones overwriting overlaps)
and is 0 outside the boxes of c. Then, summed over the split,
`TP_c = sum of u_c over pixels labelled c`, `FP_c = sum of u_c over the other labelled pixels`
(255 ignored), precision `TP_c / (TP_c + FP_c)`, and the mean over the foreground classes.
Boxes are inclusive pixel-index rectangles (`x_min <= x <= x_max`), the data package's rule.

Box accuracy (split `eval.split`). The same whole-image features are pooled over every
ground-truth box with the training pooling (`loss.pooling`, grid `loss.grid_size`, the official
2 x 2 ROI windows), the window logits averaged and the argmax over the foreground classes compared
with the box's class (`bana_jax.bap.box_classification_counts`).

Output: `WORKDIR/cam_precision.json` (per-class precision, mean, box accuracy, counts).
Each distinct image size compiles the network once (VOC has a few hundred sizes); `eval.max_images`
limits the number of images.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bana_jax import artifacts, bap, builders
from bana_jax.constants import IGNORE_INDEX
from bana_jax.data.common import box_masks, bg_mask_from_boxes
from bana_jax.data.transforms import caffe_normalize, normalize_boxes
from bana_jax.resize import interp_matrix
from bana_jax.train import mesh as mesh_lib

logger = logging.getLogger("bana_jax.evaluate_cams")

RESULT_JSON = "cam_precision.json"
CAM_EPS = 1e-12  # added to each box's CAM maximum (the official code's denominator)
BOX_BUCKET = 8   # boxes per image are padded to a multiple of this (fewer compiled shapes)
MIN_CLASS_BOXES = 5  # classes with fewer ground-truth boxes are left out of the class mean


# ----------------------------------------------------------------------------------------------
# Pure NumPy math
# ----------------------------------------------------------------------------------------------


def normalized_cams(scores: np.ndarray, image_hw: tuple[int, int], boxes: np.ndarray,
                    box_labels: np.ndarray) -> np.ndarray:
    """Normalised CAM scores u_c at image size.

    Args:
      scores: `(h, w, C)` dot-product scores `f . w_c` at feature resolution.
      image_hw: (H, W).
      boxes: `(K, 4)` pixel `[x_min, y_min, x_max, y_max]` (inclusive); box_labels `(K,)` in 1..C-1.
    Returns:
      float32 `(H, W, C)`: inside the boxes of class c, `CAM_c / (max over the box + 1e-12)`
      (boxes in order, later ones overwriting); 0 elsewhere and in channel 0.
    """
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3:
        raise ValueError(f"scores must be (h, w, C), got shape {scores.shape}")
    height, width = int(image_hw[0]), int(image_hw[1])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_labels = np.asarray(box_labels).reshape(-1)
    if len(boxes) != len(box_labels):
        raise ValueError(f"boxes {boxes.shape} and box_labels {box_labels.shape} disagree")
    num_classes = scores.shape[-1]
    if len(box_labels) and (box_labels.min() < 1 or box_labels.max() >= num_classes):
        raise ValueError(f"box_labels must be in 1..{num_classes - 1}, got {box_labels.tolist()}")
    out = np.zeros((height, width, num_classes), np.float32)
    if not len(boxes):
        return out
    rows = interp_matrix(scores.shape[0], height, True)
    cols = interp_matrix(scores.shape[1], width, True)
    present = np.unique(box_labels)
    cams = np.einsum("Yh,hwc,Xw->cYX", rows, scores[..., present], cols)
    cams = np.maximum(cams, 0.0)
    channel = {int(c): i for i, c in enumerate(present)}
    for mask, label in zip(box_masks(boxes, height, width), box_labels):
        if not mask.any():
            continue
        cam = cams[channel[int(label)]]
        out[..., int(label)][mask] = cam[mask] / (cam[mask].max() + CAM_EPS)
    return out


def cam_counts(u: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE_INDEX):
    """`TP_c`, `FP_c` `(C,)` of one image: u_c mass on pixels labelled c / on the other labelled
    pixels (ignore_index excluded). u `(H, W, C)`, label `(H, W)`."""
    if u.ndim != 3 or u.shape[:2] != label.shape:
        raise ValueError(f"u must be (H, W, C) and label (H, W); got {u.shape} and {label.shape}")
    keep = label != ignore_index
    mass = u[keep].sum(axis=0, dtype=np.float64)
    classes = np.arange(u.shape[-1])
    inside = label[keep][:, None] == classes[None, :]
    tp = (u[keep] * inside).sum(axis=0, dtype=np.float64)
    return tp, mass - tp


# ----------------------------------------------------------------------------------------------
# Network passes
# ----------------------------------------------------------------------------------------------


def labeler_forward(model: nnx.Module):
    """`images (B, H, W, 3)` -> (features `(B, h, w, D)` float32, scores `(B, h, w, C)`), eval mode,
    jit-compiled once per image shape."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        labeler = nnx.merge(graphdef, state)
        features = labeler(images).astype(jnp.float32)
        return features, labeler.classifier(features)

    return functools.partial(forward, state)


@functools.partial(jax.jit, static_argnames=("grid_size", "pooling", "gap_fallback_bg_fraction"))
def _box_logits(features, bg_mask, boxes, box_valid, weight, *, grid_size, pooling,
                gap_fallback_bg_fraction):
    vectors = bap.bap_vectors(features, bg_mask, boxes, box_valid, grid_size=grid_size,
                              pooling=pooling, gap_fallback_bg_fraction=gap_fallback_bg_fraction)
    return bap.classify(vectors["fg_vectors"], weight)


def _images(source, max_images: int) -> Iterator[dict]:
    count = len(source) if not max_images else min(max_images, len(source))
    for index in range(count):
        yield source[index]


def _network_input(sample: dict) -> jax.Array:
    return jnp.asarray(caffe_normalize(sample["image"])[None])


def box_accuracy_on(model, samples, *, grid_size: int, pooling: str,
                    gap_fallback_bg_fraction: float, num_classes: int) -> dict:
    """Classification of ground-truth boxes: overall and per-class accuracy."""
    forward = labeler_forward(model)
    weight = model.classifier.weight
    correct = np.zeros(num_classes, np.int64)
    total = np.zeros(num_classes, np.int64)
    for sample in samples:
        boxes, labels = np.asarray(sample["boxes"], np.float32), np.asarray(sample["box_labels"])
        if not len(boxes):
            continue
        height, width = sample["image"].shape[:2]
        features, _ = forward(_network_input(sample))
        k = -(-len(boxes) // BOX_BUCKET) * BOX_BUCKET
        padded = np.zeros((1, k, 4), np.float32)
        padded[0, :len(boxes)] = normalize_boxes(boxes, height, width)
        valid = (np.arange(k) < len(boxes))[None]
        padded_labels = np.zeros((1, k), np.int32)
        padded_labels[0, :len(boxes)] = labels
        bg_mask = bg_mask_from_boxes(boxes, height, width).astype(np.float32)[None]
        logits = _box_logits(features, bg_mask, padded, valid, weight, grid_size=grid_size,
                             pooling=pooling, gap_fallback_bg_fraction=gap_fallback_bg_fraction)
        predicted = np.asarray(bap.box_predictions(logits))[0, :len(boxes)]
        np.add.at(total, labels, 1)
        np.add.at(correct, labels, (predicted == labels).astype(np.int64))
    return accuracy_summary(correct, total)


def accuracy_summary(correct: np.ndarray, total: np.ndarray) -> dict:
    """Box accuracy from per-class counts `(C,)`: overall, per class, and the mean over the
    classes with at least `MIN_CLASS_BOXES` boxes (a class with two boxes says little)."""
    per_class = [float(c / t) if t else None for c, t in zip(correct, total)]
    counted = [a for a, t in zip(per_class, total) if t >= MIN_CLASS_BOXES]
    return {"accuracy": float(correct.sum() / max(total.sum(), 1)),
            "num_boxes": int(total.sum()), "correct": int(correct.sum()),
            "per_class": per_class, "per_class_boxes": total.tolist(),
            "class_mean": float(np.mean(counted)) if counted else None,
            "class_mean_min_boxes": MIN_CLASS_BOXES}


def format_box_accuracy(accuracy: dict, names) -> str:
    """The per-class table of `accuracy_summary` (classes with boxes only)."""
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  boxes  accuracy"]
    for name, value, count in zip(names, accuracy["per_class"], accuracy["per_class_boxes"]):
        if count:
            lines.append(f"{name:<{width}}  {count:5d}  {100 * value:7.1f}")
    lines.append(f"{'all boxes':<{width}}  {accuracy['num_boxes']:5d}  {100 * accuracy['accuracy']:7.1f}")
    if accuracy["class_mean"] is not None:
        lines.append(f"mean over classes with >= {accuracy['class_mean_min_boxes']} boxes: "
                     f"{100 * accuracy['class_mean']:.1f}")
    return "\n".join(lines)


def box_accuracy(model, config, split: str, *, max_images: int = 0) -> dict:
    """Ground-truth-box classification accuracy of `model` on `split` of `config.data`."""
    source = builders.data_source(config, split)
    return box_accuracy_on(model, _images(source, max_images),
                           grid_size=int(config.loss.grid_size), pooling=config.loss.pooling,
                           gap_fallback_bg_fraction=float(config.loss.gap_fallback_bg_fraction),
                           num_classes=int(config.model.num_classes))


def cam_precision_on(model, samples) -> dict:
    """Accumulated `tp`, `fp` `(C,)` over samples with ground truth (`label`)."""
    forward = labeler_forward(model)
    tp = fp = None
    count = 0
    for sample in samples:
        if "label" not in sample:
            raise ValueError(f"sample {sample.get('id', '?')} has no ground-truth 'label': CAM "
                             "precision needs a split with segmentation masks")
        _, scores = forward(_network_input(sample))
        u = normalized_cams(np.asarray(scores[0]), sample["image"].shape[:2], sample["boxes"],
                            sample["box_labels"])
        image_tp, image_fp = cam_counts(u, np.asarray(sample["label"]))
        tp = image_tp if tp is None else tp + image_tp
        fp = image_fp if fp is None else fp + image_fp
        count += 1
    if tp is None:
        raise ValueError("no images to evaluate")
    return {"tp": tp, "fp": fp, "num_images": count}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def format_table(names, precision, mean: float) -> str:
    width = max(len("class"), *(len(n) for n in names[1:]))
    lines = [f"{'class':<{width}}  precision"]
    for name, value in zip(names[1:], precision[1:]):
        text = "   -" if np.isnan(value) else f"{100 * value:6.1f}"
        lines.append(f"{name:<{width}}  {text}")
    lines.append(f"{'mean':<{width}}  {100 * mean:6.1f}")
    return "\n".join(lines)


def main(config, workdir: str | Path) -> dict:
    """`bana evaluate-cams`: loads WORKDIR's trained labeler, prints and writes the metrics."""
    workdir = Path(workdir)
    model = artifacts.load_model(workdir, "labeler")
    info = artifacts.model_info(workdir, "labeler")
    names = list(info.get("class_names") or builders.class_names(config))
    max_images = int(config.eval.max_images)

    cam_source = builders.data_source(config, config.eval.cam_split)
    counts = cam_precision_on(model, _images(cam_source, max_images))
    precision, mean = bap.cam_precision(counts["tp"], counts["fp"])
    accuracy = box_accuracy(model, config, config.eval.split, max_images=max_images)

    print(f"CAM precision ({config.eval.cam_split}, {counts['num_images']} images, "
          f"labeler trained with {info.get('pooling', '?')}):")
    print(format_table(names, precision, mean))
    print(f"classification accuracy on ground-truth boxes ({config.eval.split}, "
          f"{accuracy['num_boxes']} boxes): {100 * accuracy['accuracy']:.2f}%")
    result = {
        "cam_split": config.eval.cam_split, "num_images": counts["num_images"],
        "pooling": info.get("pooling"), "step": info.get("step"),
        "precision": {name: (None if np.isnan(p) else float(p))
                      for name, p in zip(names[1:], precision[1:])},
        "mean_precision": mean,
        "tp": counts["tp"].tolist(), "fp": counts["fp"].tolist(),
        "box_accuracy_split": config.eval.split, "box_accuracy": accuracy,
    }
    if mesh_lib.is_main_process():
        (workdir / RESULT_JSON).write_text(json.dumps(result, indent=2))
    return result
