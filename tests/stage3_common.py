"""Shared set-up of tests/test_stage3.py and tests/test_evaluate.py: tiny synthetic pseudo labels,
configs, and two work-arounds for slow or broken pieces outside stage 3 (see each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bana_jax import io
from bana_jax.config import load_config

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
    # From scratch on the plain trunk, as these tests' expectations (what 30 steps learn, how far
    # from a random init) were set; tests/test_demo.py runs the demo's BatchNorm trunk end to end.
    config.model.init_head = False
    config.model.vgg_norm = "none"
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
