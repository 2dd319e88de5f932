"""Semantic-segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction).

The definitions follow the official evaluator (detectron2's SemSegEvaluator):
  IoU_c      = tp_c / (gt_c + pred_c - tp_c), NaN when class c is neither labelled nor predicted
  mIoU       = mean of IoU_c over classes that are labelled or predicted
               (a class predicted but absent from the ground truth counts as IoU 0)
  acc_c      = tp_c / gt_c, NaN when c is not in the ground truth
  mean acc   = mean of acc_c over classes in the ground truth
  pixel acc  = sum tp / sum gt
Pixels whose ground truth is `ignore_index` (255) are not counted. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bana_jax.constants import IGNORE_INDEX, VOC_CLASSES


def confusion_matrix(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int64 `(C, C)` counts, entry [g, p] = pixels with ground truth g predicted as p.

    Args:
      pred: integer predictions, any shape, values in [0, C).
      label: integer ground truth, same shape, values in [0, C) or `ignore_index`.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"pred and label differ in shape: {pred.shape} vs {label.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(label.dtype, np.integer)):
        raise TypeError(f"pred and label must be integer arrays, got {pred.dtype} and {label.dtype}")
    valid = label != ignore_index
    gt, pr = label[valid].astype(np.int64), pred[valid].astype(np.int64)
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}, "
                         f"got range [{gt.min()}, {gt.max()}]")
    if pr.size and (pr.min() < 0 or pr.max() >= num_classes):
        raise ValueError(f"pred values must be in [0, {num_classes}) on labelled pixels, "
                         f"got range [{pr.min()}, {pr.max()}]")
    counts = np.bincount(gt * num_classes + pr, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix_jax(pred: jax.Array, label: jax.Array, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """jit-able confusion matrix, int32 `(C, C)`.

    Pixels whose label or prediction is outside [0, C) (255 included) are dropped; accumulate
    the per-batch results into an int64 NumPy matrix on the host (int32 overflows after 2^31).
    """
    pred = pred.reshape(-1).astype(jnp.int32)
    label = label.reshape(-1).astype(jnp.int32)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    index = jnp.where(valid, label * num_classes + pred, num_classes * num_classes)  # last bin: dropped
    counts = jnp.zeros(num_classes * num_classes + 1, jnp.int32).at[index].add(1)
    return counts[:-1].reshape(num_classes, num_classes)


def _check_conf(conf) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    return conf.astype(np.float64)


def _nan_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def per_class_iou(conf) -> np.ndarray:
    """float64 `(C,)` IoU per class; NaN where a class is neither labelled nor predicted."""
    conf = _check_conf(conf)
    tp = np.diag(conf)
    return _nan_divide(tp, conf.sum(0) + conf.sum(1) - tp)


def per_class_accuracy(conf) -> np.ndarray:
    """float64 `(C,)` recall per class; NaN where a class is not in the ground truth."""
    conf = _check_conf(conf)
    return _nan_divide(np.diag(conf), conf.sum(1))


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_iou(conf) -> float:
    return _nanmean(per_class_iou(conf))


def mean_accuracy(conf) -> float:
    return _nanmean(per_class_accuracy(conf))


def pixel_accuracy(conf) -> float:
    conf = _check_conf(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else float("nan")


def segmentation_scores(conf) -> dict:
    """All scores of a confusion matrix: mIoU, per-class IoU/accuracy, pixel and mean accuracy."""
    return {
        "miou": mean_iou(conf),
        "iou": per_class_iou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "mean_accuracy": mean_accuracy(conf),
        "accuracy": per_class_accuracy(conf),
        "num_pixels": int(np.asarray(conf).sum()),
    }


def format_table(conf, class_names=VOC_CLASSES) -> str:
    """Per-class IoU and accuracy (percent) as a fixed-width text table, summary lines at the end."""
    scores = segmentation_scores(conf)
    if len(class_names) != len(scores["iou"]):
        raise ValueError(f"class_names has {len(class_names)} names for {len(scores['iou'])} classes")
    width = max(len("class"), *(len(name) for name in class_names))
    fmt = lambda v: "   n/a" if np.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"{'id':>2}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for index, name in enumerate(class_names):
        lines.append(f"{index:2d}  {name:<{width}}  {fmt(scores['iou'][index])}  {fmt(scores['accuracy'][index])}")
    lines.append(f"mIoU {fmt(scores['miou'])}  pixel acc {fmt(scores['pixel_accuracy'])}  "
                 f"mean acc {fmt(scores['mean_accuracy'])}  ({scores['num_pixels']} pixels)")
    return "\n".join(lines)


# Counts are split in 30-bit halves so they cross hosts exactly as int32 (JAX's default integer).
_SPLIT = 1 << 30


def split_counts(conf) -> np.ndarray:
    """int64 `(C, C)` -> int32 `(2, C, C)` (high, low 30-bit parts), exact below 2^61."""
    conf = np.asarray(conf, np.int64)
    if conf.min(initial=0) < 0 or conf.max(initial=0) >= (1 << 61):
        raise ValueError("counts must be in [0, 2^61)")
    return np.stack([conf // _SPLIT, conf % _SPLIT]).astype(np.int32)


def join_counts(parts) -> np.ndarray:
    """Inverse of split_counts, summing over any leading axes: `(..., 2, C, C)` -> int64 `(C, C)`."""
    parts = np.asarray(parts, np.int64).reshape(-1, 2, *np.shape(parts)[-2:])
    return parts[:, 0].sum(0) * _SPLIT + parts[:, 1].sum(0)


def sum_across_hosts(conf) -> np.ndarray:
    """Sum each host's int64 `(C, C)` confusion matrix over all JAX processes (every host gets it)."""
    if jax.process_count() == 1:
        return np.asarray(conf, np.int64)
    gathered = multihost_utils.process_allgather(split_counts(conf))  # (num_processes, 2, C, C)
    return join_counts(gathered)
