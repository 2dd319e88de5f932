"""BANA's DenseCRF call: one image, or many in parallel."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crf_ext import _checks
from crf_ext._isa import core as _core


def _params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter) -> dict:
    return dict(
        bi_w=_checks.finite(bi_w, "bi_w"),
        bi_xy_std=_checks.positive(bi_xy_std, "bi_xy_std"),
        bi_rgb_std=_checks.positive(bi_rgb_std, "bi_rgb_std"),
        pos_w=_checks.finite(pos_w, "pos_w"),
        pos_xy_std=_checks.positive(pos_xy_std, "pos_xy_std"),
        n_iter=_checks.count(n_iter, "n_iter", 0),
    )


def dense_crf(image, probs, *, bi_w: float = 4.0, bi_xy_std: float = 55.0, bi_rgb_std: float = 3.0,
              pos_w: float = 3.0, pos_xy_std: float = 3.0, n_iter: int = 10,
              num_threads: int | None = None) -> np.ndarray:
    """Mean-field marginals of the fully connected CRF, as BANA calls pydensecrf.

    Args:
      image: uint8 (H, W, 3) RGB.
      probs: (C, H, W) probabilities; unary = -log(clip(probs, 1e-5, 1)).
      bi_w, bi_xy_std, bi_rgb_std: Potts weight and standard deviations of the bilateral kernel.
      pos_w, pos_xy_std: Potts weight and standard deviation of the Gaussian (position) kernel.
      n_iter: mean-field iterations (0 returns the normalised clipped probabilities).
      num_threads: threads for this image (None: all cores). Results are bitwise identical for
        any thread count.

    Returns:
      float32 (C, H, W) marginals Q, summing to 1 over C.
    """
    image = _checks.image_array(image)
    probs = _checks.probs_array(probs, image.shape[0], image.shape[1])
    params = _params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter)
    return _core.dense_crf(image, probs, num_threads=_checks.threads(num_threads), **params)


def dense_crf_batch(images: Sequence, probs_list: Sequence, *, bi_w: float = 4.0, bi_xy_std: float = 55.0,
                    bi_rgb_std: float = 3.0, pos_w: float = 3.0, pos_xy_std: float = 3.0, n_iter: int = 10,
                    num_threads: int | None = None) -> list[np.ndarray]:
    """dense_crf over many images, one image per thread, with the GIL released.

    Images may differ in size and label count. Returns one (C_i, H_i, W_i) array per image, the
    same bits as dense_crf on each.
    """
    if len(images) != len(probs_list):
        raise ValueError(f"images and probs_list differ in length: {len(images)} vs {len(probs_list)}")
    checked_images, checked_probs = [], []
    for i, (image, probs) in enumerate(zip(images, probs_list)):
        checked_images.append(_checks.image_array(image, f"images[{i}]"))
        shape = checked_images[-1].shape
        checked_probs.append(_checks.probs_array(probs, shape[0], shape[1], f"probs_list[{i}]"))
    params = _params(bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std, n_iter)
    return _core.dense_crf_batch(checked_images, checked_probs, num_threads=_checks.threads(num_threads), **params)
