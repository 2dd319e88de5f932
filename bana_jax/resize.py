"""Resizing that matches PyTorch's `F.interpolate` exactly (no antialiasing).

Bilinear resizing is separable, so it is written as two small interpolation matrices applied with
einsum: exact, differentiable, static-shaped, and cheap at the sizes BANA uses (feature maps of
41x41 up to images of 500x500). `jax.image.resize` antialiases when shrinking and has no
align_corners=True mode, hence these helpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """Linear-interpolation weights `(out_size, in_size)` float32, as PyTorch computes them.

    align_corners=True: src = dst * (in - 1) / (out - 1).
    align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), i1), frac)
    return weights.astype(np.float32)


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], *, align_corners: bool) -> jax.Array:
    """Bilinear resize of `x` `(B, H, W, C)` to `(B, out_h, out_w, C)` like `F.interpolate`."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")
    out_h, out_w = out_hw
    rows = jnp.asarray(interp_matrix(x.shape[1], out_h, align_corners), x.dtype)
    cols = jnp.asarray(interp_matrix(x.shape[2], out_w, align_corners), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,bhwc->bowc", rows, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", cols, y, precision=hi)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's legacy 'nearest' source indices: floor(dst * in / out), clamped."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in_size={in_size}, out_size={out_size}")
    # float32 like PyTorch's kernel, so boundary cases round the same way.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_nearest(x, out_hw: tuple[int, int]):
    """Legacy-nearest resize of `x` `(B, H, W, ...)` to `(B, out_h, out_w, ...)`.

    Works on NumPy and JAX arrays alike (a pure gather), e.g. masks and label maps.
    """
    if x.ndim < 3:
        raise ValueError(f"x must be (B, H, W, ...), got shape {x.shape}")
    rows = nearest_indices(x.shape[1], out_hw[0])
    cols = nearest_indices(x.shape[2], out_hw[1])
    return x[:, rows][:, :, cols]
