"""Metrics against confusion matrices and scores computed by hand."""

import numpy as np
import pytest

import jax.numpy as jnp

from bana_jax import metrics

# 3 classes, 255 ignored. Pixel by pixel (gt -> pred):
#   gt 0: 0, 0, 1        gt 1: 1, 1, 1, 2        gt 2: 0        ignored: two pixels
LABEL = np.array([[0, 0, 0, 1, 1], [1, 1, 2, 255, 255]], np.uint8)
PRED = np.array([[0, 0, 1, 1, 1], [1, 2, 0, 2, 0]], np.uint8)
CONF = np.array([[2, 1, 0],
                 [0, 3, 1],
                 [1, 0, 0]])


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(metrics.confusion_matrix(PRED, LABEL, 3), CONF)
    conf_jax = metrics.confusion_matrix_jax(jnp.asarray(PRED), jnp.asarray(LABEL), 3)
    np.testing.assert_array_equal(np.asarray(conf_jax), CONF)
    assert metrics.confusion_matrix(PRED, LABEL, 3).dtype == np.int64


def test_scores_by_hand():
    # IoU: class 0: tp 2 / (gt 3 + pred 3 - 2) = 1/2; class 1: 3 / (4 + 4 - 3) = 3/5;
    # class 2: 0 / (1 + 1 - 0) = 0. Accuracy: 2/3, 3/4, 0/1. Pixel accuracy 5/8.
    scores = metrics.segmentation_scores(CONF)
    np.testing.assert_allclose(scores["iou"], [1 / 2, 3 / 5, 0.0])
    assert scores["miou"] == pytest.approx((1 / 2 + 3 / 5 + 0) / 3)
    np.testing.assert_allclose(scores["accuracy"], [2 / 3, 3 / 4, 0.0])
    assert scores["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 8)
    assert scores["num_pixels"] == 8


def test_absent_classes():
    # Class 2 never labelled nor predicted: NaN, left out of the means. Class 3 predicted but not
    # labelled: IoU 0, counted in mIoU (the official evaluator's rule); accuracy NaN.
    conf = np.array([[3, 0, 0, 1],
                     [0, 2, 0, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]])
    iou = metrics.per_class_iou(conf)
    np.testing.assert_allclose(iou, [3 / 4, 1.0, np.nan, 0.0])
    assert metrics.mean_iou(conf) == pytest.approx((3 / 4 + 1 + 0) / 3)
    np.testing.assert_allclose(metrics.per_class_accuracy(conf), [3 / 4, 1.0, np.nan, np.nan])
    assert metrics.mean_accuracy(conf) == pytest.approx((3 / 4 + 1) / 2)
    assert np.isnan(metrics.mean_iou(np.zeros((3, 3))))


def test_random_against_pixel_loop():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, (2, 13, 17)).astype(np.uint8)
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 21, label.shape).astype(np.int32)
    conf = np.zeros((21, 21), np.int64)
    for g, p in zip(label.ravel(), pred.ravel()):
        if g != 255:
            conf[g, p] += 1
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, label, 21), conf)
    conf_jax = metrics.confusion_matrix_jax(jnp.asarray(pred), jnp.asarray(label), 21)
    np.testing.assert_array_equal(np.asarray(conf_jax), conf)
    # IoU per class as set sizes.
    valid = label != 255
    for c in range(21):
        inter = np.sum((label == c) & (pred == c) & valid)
        union = np.sum(((label == c) | (pred == c)) & valid)
        assert metrics.per_class_iou(conf)[c] == pytest.approx(inter / union)


def test_jax_version_drops_out_of_range_predictions():
    pred = jnp.array([0, 5, 1, -1])
    label = jnp.array([0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix_jax(pred, label, 2)), [[1, 0], [0, 1]])


def test_bad_inputs():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.confusion_matrix(PRED[:, :3], LABEL, 3)
    with pytest.raises(ValueError, match="label values must be in"):
        metrics.confusion_matrix(PRED, np.where(LABEL == 2, 7, LABEL), 3)
    with pytest.raises(ValueError, match="pred values must be in"):
        metrics.confusion_matrix(np.full_like(PRED, 3), LABEL, 3)
    with pytest.raises(TypeError, match="integer"):
        metrics.confusion_matrix(PRED.astype(np.float32), LABEL, 3)
    with pytest.raises(ValueError, match="square"):
        metrics.per_class_iou(np.zeros((2, 3)))


def test_format_table():
    conf = np.zeros((21, 21), np.int64)
    conf[0, 0], conf[15, 15], conf[15, 0] = 6, 3, 1
    table = metrics.format_table(conf)
    lines = table.splitlines()
    assert len(lines) == 23
    assert lines[1].split() == ["0", "background", "85.71", "100.00"]  # 6 / 7, 6 / 6
    assert lines[16].split() == ["15", "person", "75.00", "75.00"]
    assert lines[2].split() == ["1", "aeroplane", "n/a", "n/a"]
    assert lines[-1].startswith("mIoU  80.36")  # (6/7 + 3/4) / 2
    with pytest.raises(ValueError, match="class_names"):
        metrics.format_table(conf, class_names=("a", "b"))


def test_host_sum_exact_for_large_counts():
    conf = np.array([[3 * (1 << 40) + 5, 7], [0, (1 << 31) + 1]], np.int64)
    parts = metrics.split_counts(conf)
    assert parts.dtype == np.int32
    np.testing.assert_array_equal(metrics.join_counts(np.stack([parts, parts, parts])), 3 * conf)
    np.testing.assert_array_equal(metrics.sum_across_hosts(conf), conf)  # one process here
