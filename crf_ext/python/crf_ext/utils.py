"""pydensecrf.utils, with the same signatures and results."""

from __future__ import annotations

import numbers

import numpy as np


def unary_from_softmax(sm, scale=None, clip=1e-5) -> np.ndarray:
    """Unary energies -log(p) from probabilities `sm` (n_labels, ...), as (n_labels, N) float32.

    scale: if given (0 < scale <= 1), mixes the probabilities with the uniform distribution so that
      a probability of 1 becomes `scale`. clip: lower bound applied before the log.
    """
    sm = np.asarray(sm)
    n_labels = sm.shape[0]
    if scale is not None:
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / n_labels)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return -np.log(sm).reshape([n_labels, -1]).astype(np.float32)


def unary_from_labels(labels, n_labels: int, gt_prob: float, zero_unsure: bool = True) -> np.ndarray:
    """Unary energies from a label map: the annotated label gets probability gt_prob, the others
    share the rest. With zero_unsure, label 0 means "unknown" (uniform) and labels 1..n_labels map
    to rows 0..n_labels-1. Returns (n_labels, N) float32.
    """
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    labels = np.asarray(labels).ravel()
    other = -np.log((1.0 - gt_prob) / (n_labels - 1))
    unary = np.full((n_labels, labels.size), other, dtype=np.float32)
    rows = labels - 1 if zero_unsure else labels
    unary[rows, np.arange(labels.size)] = -np.log(gt_prob)
    if zero_unsure:
        unary[:, labels == 0] = -np.log(1.0 / n_labels)
    return unary


def create_pairwise_gaussian(sdims, shape) -> np.ndarray:
    """Position features (len(shape), N) float32 for an array of `shape`, divided by `sdims`."""
    grid = np.array(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), dtype=np.float32)
    for axis, s in enumerate(sdims):
        grid[axis] /= s
    return grid.reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim: int = -1) -> np.ndarray:
    """Position + channel features (len(sdims) + channels, N) float32 for `img`.

    chdim: the channel axis of img, or -1 when img has no channel axis (one channel).
    """
    img = np.asarray(img)
    channels = img[np.newaxis].astype(np.float32) if chdim == -1 else np.moveaxis(img, chdim, 0).astype(np.float32)
    if isinstance(schan, numbers.Number):
        channels /= schan
    else:
        for c, s in enumerate(schan):
            channels[c] /= s
    positions = create_pairwise_gaussian(sdims, channels.shape[1:])
    return np.vstack([positions, channels.reshape([channels.shape[0], -1])])
