"""The embedded synthetic dataset: determinism, exact boxes and masks, difficulty."""

import numpy as np
import pytest

from bana_jax import baselines
from bana_jax.data import synthetic


def _loop_miou(preds, gts, num_classes):
    """Independent mIoU: per-class pixel sets counted with Python loops over images."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for p, g in zip(preds, gts):
        valid = g != 255
        for c in range(num_classes):
            pc, gc = (p == c) & valid, (g == c) & valid
            inter[c] += np.sum(pc & gc)
            union[c] += np.sum(pc | gc)
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


@pytest.fixture(scope="module")
def source():
    return synthetic.SyntheticSource(num_images=40, image_size=96, num_classes=4, seed=3)


def test_deterministic_and_seed_dependent(source):
    a, b = source[7], synthetic.SyntheticSource(source.cfg)[7]
    for k in ("image", "boxes", "box_labels", "label"):
        np.testing.assert_array_equal(a[k], b[k])
    other = synthetic.SyntheticSource(num_images=40, image_size=96, num_classes=4, seed=4)[7]
    assert not np.array_equal(a["image"], other["image"])
    assert source[8]["id"] != a["id"]


def test_sample_format(source):
    s = source[0]
    assert s["image"].shape == (96, 96, 3) and s["image"].dtype == np.uint8
    assert s["label"].shape == (96, 96) and s["label"].dtype == np.uint8
    assert s["boxes"].dtype == np.float32 and s["boxes"].shape[1] == 4
    assert s["box_labels"].dtype == np.int32
    assert source.class_names == ("background", "ellipse", "triangle", "ring", "star")
    with pytest.raises(IndexError):
        source[40]
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.SyntheticConfig(num_classes=9)


def test_boxes_are_tight_on_visible_object_pixels(source):
    fills = []
    for i in range(len(source)):
        s = source[i]
        assert 1 <= len(s["boxes"]) <= 4
        assert set(np.unique(s["label"])) <= {0, 1, 2, 3, 4, 255}
        for (x0, y0, x1, y1), c in zip(s["boxes"].astype(int), s["box_labels"]):
            assert 1 <= c <= 4
            inside = s["label"][y0:y1 + 1, x0:x1 + 1] == c
            # Tight: the class touches each of the four box edges.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            fills.append(inside.mean())
        # Every pixel of an annotated class lies inside some box of that class.
        for c in range(1, 5):
            covered = np.zeros_like(s["label"], bool)
            for (x0, y0, x1, y1), bc in zip(s["boxes"].astype(int), s["box_labels"]):
                if bc == c:
                    covered[y0:y1 + 1, x0:x1 + 1] = True
            assert not np.any((s["label"] == c) & ~covered)
    # Shapes are not rectangles: on average an object fills well under its box.
    assert np.mean(fills) < 0.7


def test_box_fill_is_clearly_worse_than_ground_truth(source):
    preds, gts = [], []
    for i in range(len(source)):
        s = source[i]
        gts.append(s["label"])
        # Box fill by hand: larger boxes first, smaller ones painted over them.
        pred = np.zeros_like(s["label"])
        order = sorted(range(len(s["boxes"])), key=lambda k: -np.prod(
            s["boxes"][k, 2:] - s["boxes"][k, :2] + 1))
        for k in order:
            x0, y0, x1, y1 = s["boxes"][k].astype(int)
            pred[y0:y1 + 1, x0:x1 + 1] = s["box_labels"][k]
        preds.append(pred)
        np.testing.assert_array_equal(
            pred, baselines.box_fill(s["boxes"], s["box_labels"], s["label"].shape))
    reference = _loop_miou(preds, gts, 5)
    assert 0.45 < reference < 0.75
    assert synthetic.box_fill_miou(source) == pytest.approx(reference, abs=1e-9)
