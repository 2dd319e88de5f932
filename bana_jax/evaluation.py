"""Evaluation math: multi-scale x flip score aggregation, softmax(tau * mean), DenseCRF, argmax.

As the official `validation()`: the Caffe-normalised image is resized by each scale factor
(bilinear, align_corners=True, output size floor(size * scale) as `F.interpolate(scale_factor=)`),
also flipped horizontally; every pass's scores are upsampled to the image size (bilinear,
align_corners=True), flipped back, and the 8 maps are averaged. The CRF sees softmax(tau * mean)
and the RGB image; the prediction is the argmax of its marginals (of the mean scores without CRF).

The model enters as a callable `score_fn(images (B, h, w, 3)) -> scores (B, h', w', C)`, so this
module holds no model, I/O or devices. The CRF is a callable too (default `crf_ext.dense_crf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bana_jax.resize import resize_bilinear

EVAL_SCALES = (1.0, 0.5, 0.75, 1.5)
# [bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std] of the official configs.
CRF_PARAMS = {
    "deeplab_v1": (4.0, 121.0, 5.0, 3.0, 3.0),
    "deeplab_v2": (4.0, 67.0, 3.0, 3.0, 1.0),
}
CRF_PARAM_NAMES = ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")

ScoreFn = Callable[[jax.Array], jax.Array]


def floor_scaled_size(size: int, scale: float) -> int:
    """Output length of `F.interpolate(scale_factor=scale)`: floor(size * scale)."""
    out = math.floor(size * scale)
    if out < 1:
        raise ValueError(f"scale {scale} shrinks a side of {size} pixels to {out}")
    return out


def _flip(x: jax.Array) -> jax.Array:
    return x[:, :, ::-1]


def multiscale_scores(score_fn: ScoreFn, images: jax.Array, *, scales: Sequence[float] = EVAL_SCALES,
                      flip: bool = True) -> jax.Array:
    """Mean of the model's scores over scales (x flips), at image size.

    Args:
      score_fn: images `(B, h, w, 3)` -> scores `(B, h', w', C)` (cosines, tau not applied).
      images: `(B, H, W, 3)` Caffe-normalised BGR float32.
      scales: resize factors; (1.0,) with flip=False is single-scale evaluation.
      flip: also run each scale on the horizontally flipped image.

    Returns:
      float32 `(B, H, W, C)` mean scores.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
    if len(scales) == 0:
        raise ValueError("scales must hold at least one scale factor")
    height, width = images.shape[1:3]
    total, passes = None, 0
    for scale in scales:
        if scale == 1.0:
            scaled = images
        else:
            size = (floor_scaled_size(height, scale), floor_scaled_size(width, scale))
            scaled = resize_bilinear(images, size, align_corners=True)
        variants = [(scaled, False), (_flip(scaled), True)] if flip else [(scaled, False)]
        for inputs, flipped in variants:
            scores = score_fn(inputs)
            if scores.ndim != 4 or scores.shape[0] != images.shape[0]:
                raise ValueError(f"score_fn must return (B, h, w, C) with B={images.shape[0]}, got {scores.shape}")
            scores = resize_bilinear(jnp.asarray(scores, jnp.float32), (height, width), align_corners=True)
            scores = _flip(scores) if flipped else scores
            total = scores if total is None else total + scores
            passes += 1
    return total / passes


def class_probabilities(mean_scores: jax.Array, tau: float) -> jax.Array:
    """softmax(tau * mean_scores) over the class axis, `(B, H, W, C)`."""
    return jax.nn.softmax(tau * mean_scores, axis=-1)


def _default_crf():
    import crf_ext  # compiled extension: imported only when the CRF is used

    return crf_ext.dense_crf


def crf_refine(image_rgb: np.ndarray, probs: np.ndarray, params: Sequence[float], *, n_iter: int = 10,
               crf_fn: Callable | None = None) -> np.ndarray:
    """DenseCRF marginals `(H, W, C)` of one image.

    Args:
      image_rgb: uint8 `(H, W, 3)`.
      probs: `(H, W, C)` class probabilities.
      params: `[bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std]`, e.g. CRF_PARAMS["deeplab_v1"].
      crf_fn: `crf_fn(image, probs (C, H, W), bi_w=, bi_xy_std=, bi_rgb_std=, pos_w=, pos_xy_std=,
        n_iter=) -> (C, H, W)`; default crf_ext.dense_crf.
    """
    if len(params) != len(CRF_PARAM_NAMES):
        raise ValueError(f"params must be {list(CRF_PARAM_NAMES)}, got {list(params)}")
    image_rgb, probs = np.asarray(image_rgb), np.asarray(probs, np.float32)
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[-1] != 3:
        raise ValueError(f"image_rgb must be uint8 (H, W, 3), got {image_rgb.dtype} {image_rgb.shape}")
    if probs.ndim != 3 or probs.shape[:2] != image_rgb.shape[:2]:
        raise ValueError(f"probs must be (H, W, C) with (H, W)={image_rgb.shape[:2]}, got {probs.shape}")
    crf_fn = _default_crf() if crf_fn is None else crf_fn
    kwargs = {name: float(value) for name, value in zip(CRF_PARAM_NAMES, params)}
    marginals = crf_fn(image_rgb, np.ascontiguousarray(probs.transpose(2, 0, 1)), n_iter=n_iter, **kwargs)
    return np.asarray(marginals).transpose(1, 2, 0)


def predict(score_fn: ScoreFn, images: jax.Array, *, crf_images: np.ndarray | None = None,
            tau: float = 20.0, scales: Sequence[float] = EVAL_SCALES, flip: bool = True,
            crf_params: Sequence[float] | None = None, n_iter: int = 10,
            crf_fn: Callable | None = None) -> np.ndarray:
    """Label map int32 `(B, H, W)` for a batch of same-sized images.

    crf_params None: argmax of the mean scores (no CRF). Otherwise `crf_images` uint8
    `(B, H, W, 3)` are the RGB images the CRF compares colours in (see `official_crf_image` for
    the official code's input).
    """
    mean_scores = multiscale_scores(score_fn, images, scales=scales, flip=flip)
    if crf_params is None:
        return np.asarray(jnp.argmax(mean_scores, axis=-1), np.int32)
    if crf_images is None or np.shape(crf_images) != tuple(images.shape):
        raise ValueError(f"crf_images must be uint8 {tuple(images.shape)} when crf_params is set, "
                         f"got {None if crf_images is None else np.shape(crf_images)}")
    probs = np.asarray(class_probabilities(mean_scores, tau))
    labels = [crf_refine(crf_images[b], probs[b], crf_params, n_iter=n_iter, crf_fn=crf_fn).argmax(-1)
              for b in range(probs.shape[0])]
    return np.stack(labels).astype(np.int32)


def official_crf_image(images_caffe_bgr) -> np.ndarray:
    """The official code's CRF input: the Caffe-normalised BGR image cast to uint8 (a bug).

    Casting negative floats to uint8 is undefined in C; NumPy on x86-64 wraps them modulo 256,
    as the official code's NumPy call does on the same machine. For exact reproduction only.
    """
    with np.errstate(invalid="ignore"):
        return np.asarray(images_caffe_bgr, np.float32).astype(np.uint8)
