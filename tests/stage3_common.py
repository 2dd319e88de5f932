"""Shared set-up of tests/test_stage3.py and tests/test_evaluate.py: tiny synthetic pseudo labels,
configs, and two work-arounds for slow or broken pieces outside stage 3 (see each)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import numpy as np
import pytest

from bana_jax import io
from bana_jax.models import layers
from bana_jax.train import load_config

REPO = Path(__file__).resolve().parents[1]
SIZE = 48


def write_pseudo_labels(source, root: Path, noise: float, seed: int = 0) -> Path:
    """Y_crf = ground truth, Y_ret = ground truth with `noise` of the labelled pixels changed."""
    rng = np.random.default_rng(seed)
    num_classes = len(source.class_names)
    for index in range(len(source)):
        sample = source[index]
        gt = sample["label"]
        noisy = gt.copy()
        flip = (rng.uniform(size=gt.shape) < noise) & (gt != 255)
        # A different class for every chosen pixel, so Y_ret != Y_crf exactly there.
        noisy[flip] = (gt[flip] + rng.integers(1, num_classes, flip.sum())) % num_classes
        io.write_label_png(root / "Y_crf" / f"{sample['id']}.png", gt)
        io.write_label_png(root / "Y_ret" / f"{sample['id']}.png", noisy.astype(np.uint8))
    return root


def demo_config(pseudo_labels="", cache_dir="", num_steps: int = 30):
    """configs/demo/stage3.py shrunk to 8 images of 48 px, batch 4."""
    config = load_config(REPO / "configs/demo/stage3.py")
    config.data.pseudo_labels = str(pseudo_labels)
    config.data.synthetic_images = 8
    config.data.synthetic_size = SIZE
    config.data.crop_size = SIZE
    config.data.batch_size = 4
    config.data.scale_range = (0.75, 1.25)
    config.model.dropout = 0.0
    config.optim.lr = 2e-2
    config.train.num_steps = num_steps
    config.train.log_every = 5
    config.train.checkpoint_every = 0
    config.train.compilation_cache = str(cache_dir)
    config.train.progress_bar = False
    config.eval.max_images = 8
    return config


def _reduce_window_differentiable() -> bool:
    x = np.ones((1, 4, 4, 1), np.float32)
    try:
        jax.jit(jax.grad(lambda x: layers.max_pool(x, 3, 2, 1).sum()))(x)
        jax.jit(jax.grad(lambda x: layers.avg_pool_count_pad(x, 3, 1, 1).sum()))(x)
    except ValueError:
        return False
    return True


def _max_pool(x, kernel, stride, padding, *, ceil_mode=False):
    pads = ((0, 0), layers._pool_padding(x.shape[1], kernel, stride, padding, ceil_mode),
            layers._pool_padding(x.shape[2], kernel, stride, padding, ceil_mode), (0, 0))
    return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max, (1, kernel, kernel, 1),
                                 (1, stride, stride, 1), pads)


def _avg_pool_count_pad(x, kernel, stride, padding):
    pads = ((0, 0), layers._pool_padding(x.shape[1], kernel, stride, padding, False),
            layers._pool_padding(x.shape[2], kernel, stride, padding, False), (0, 0))
    summed = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (1, kernel, kernel, 1),
                                   (1, stride, stride, 1), pads)
    return summed / np.asarray(kernel * kernel, x.dtype)


@contextlib.contextmanager
def workarounds():
    """1. Partitionable threefry (JAX's default) takes ~1 s per random-init op to compile on this
    CPU; the classic one keeps building a model to a few seconds.
    2. bana_jax.models.layers pools pass `jnp.array(init)` to reduce_window, a tracer under jit,
    which makes them non-differentiable in a jitted train step; until that is fixed there, the
    same pools with concrete init values are patched in (only if the bug is present)."""
    with pytest.MonkeyPatch.context() as patch, jax.threefry_partitionable(False):
        if not _reduce_window_differentiable():
            patch.setattr(layers, "max_pool", _max_pool)
            patch.setattr(layers, "avg_pool_count_pad", _avg_pool_count_pad)
        yield
