"""Fixed-shape batching: box padding, validity mask, dropping past max_boxes."""

import logging

import numpy as np
import pytest

from bana_jax.data import batching


def _net_sample(k, s=4, with_label=True, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 0, (k, 2))
    boxes = np.concatenate([x0, x0 + rng.uniform(0.1, 1, (k, 2))], 1).astype(np.float32)
    out = dict(image=rng.normal(size=(s, s, 3)).astype(np.float32),
               bg_mask=np.ones((s, s), np.float32), boxes=boxes,
               box_labels=np.arange(1, k + 1, dtype=np.int32), id=f"s{k}")
    if with_label:
        out["label"] = np.full((s, s), k, np.uint8)
    return out


def test_pad_and_stack():
    samples = [_net_sample(2, seed=0), _net_sample(0, seed=1), _net_sample(3, seed=2)]
    b = batching.collate(samples, max_boxes=3)
    assert set(b) == {"image", "bg_mask", "boxes", "box_labels", "box_valid", "label"}
    assert b["image"].shape == (3, 4, 4, 3) and b["boxes"].shape == (3, 3, 4)
    np.testing.assert_array_equal(b["box_valid"], [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(b["box_labels"], [[1, 2, 0], [0, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(b["boxes"][0, :2], samples[0]["boxes"])
    assert (b["boxes"][0, 2] == 0).all() and b["box_valid"].dtype == bool
    np.testing.assert_array_equal(b["label"][:, 0, 0], [2, 0, 3])


def test_extra_boxes_dropped_smallest_first_and_logged(caplog):
    s = _net_sample(0)
    s["boxes"] = np.array([[0, 0, 0.5, 0.5], [0, 0, 0.1, 0.1], [0, 0, 0.9, 0.2], [0, 0, 0.3, 0.3]],
                          np.float32)  # areas .25, .01, .18, .09
    s["box_labels"] = np.array([1, 2, 3, 4], np.int32)
    with caplog.at_level(logging.WARNING):
        b = batching.collate([s], max_boxes=2)
    np.testing.assert_array_equal(b["box_labels"], [[1, 3]])
    assert b["box_valid"].all()
    assert "2 boxes dropped" in caplog.text


def test_bad_batches():
    with pytest.raises(ValueError, match="max_boxes"):
        batching.pad_boxes(_net_sample(1), 0)
    with pytest.raises(ValueError, match="image"):
        batching.collate([_net_sample(1, s=4), _net_sample(1, s=5)], max_boxes=2)
    # A map missing from one sample is left out rather than failing.
    b = batching.collate([_net_sample(1), _net_sample(1, with_label=False)], max_boxes=2)
    assert "label" not in b
