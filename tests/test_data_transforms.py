"""Augmentation geometry and numerics against hand-computed cases and brute-force references."""

import numpy as np
import pytest

from bana_jax.constants import CAFFE_MEAN_BGR
from bana_jax.data import transforms as T


def _sample(h, w, boxes, labels, seed=0, **maps):
    rng = np.random.default_rng(seed)
    s = dict(image=rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
             boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
             box_labels=np.asarray(labels, np.int32), id="x")
    s.update(maps)
    return s


def _bilinear_reference(img, oh, ow):
    """PyTorch align_corners=False bilinear, by a direct loop."""
    h, w, _ = img.shape
    out = np.zeros((oh, ow, img.shape[2]))

    def src(d, n, m):
        s = max((d + 0.5) * n / m - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n - 1)
        return i0, min(i0 + 1, n - 1), s - i0

    for i in range(oh):
        y0, y1, fy = src(i, h, oh)
        for j in range(ow):
            x0, x1, fx = src(j, w, ow)
            out[i, j] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                         + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
    return out


def test_rescale_up_by_hand():
    label = np.arange(16, dtype=np.uint8).reshape(4, 4)
    s = _sample(4, 4, [[1, 1, 2, 2]], [3], label=label)
    r = T.rescale(s, 2.0)
    # Nearest source index of output j is floor(j / 2): [0, 0, 1, 1, 2, 2, 3, 3].
    np.testing.assert_array_equal(r["boxes"], [[2, 2, 5, 5]])
    np.testing.assert_array_equal(r["label"], np.repeat(np.repeat(label, 2, 0), 2, 1))
    np.testing.assert_allclose(r["image"], _bilinear_reference(s["image"].astype(float), 8, 8),
                               atol=1e-3)


def test_rescale_down_by_hand():
    s = _sample(4, 6, [[1, 1, 2, 2], [1, 1, 1, 1], [0, 0, 5, 3]], [1, 2, 3])
    r = T.rescale(s, 0.5)  # 4x6 -> 2x3, sources rows [0, 2], columns [0, 2, 4]
    assert r["image"].shape == (2, 3, 3)
    # Box 2 (the single pixel (1, 1)) is sampled by no output pixel: dropped.
    np.testing.assert_array_equal(r["boxes"], [[1, 1, 1, 1], [0, 0, 2, 1]])
    np.testing.assert_array_equal(r["box_labels"], [1, 3])
    np.testing.assert_allclose(r["image"], _bilinear_reference(s["image"].astype(float), 2, 3),
                               atol=1e-3)


def test_pad_crop_flip_by_hand():
    s = _sample(3, 3, [[0, 0, 2, 1]], [4], label=np.full((3, 3), 7, np.uint8),
                bg_mask=np.ones((3, 3), np.uint8))
    p = T.pad_to(T.rescale(s, 1.0), 5)
    assert p["image"].shape == (5, 5, 3)
    np.testing.assert_array_equal(p["image"][3:, :], np.broadcast_to([123, 117, 104], (2, 5, 3)))
    np.testing.assert_array_equal(p["image"][:3, 3:], np.broadcast_to([123, 117, 104], (3, 2, 3)))
    assert (p["label"][3:] == 255).all() and (p["label"][:, 3:] == 255).all()
    assert (p["bg_mask"][3:] == 0).all() and (p["bg_mask"][:3, :3] == 1).all()

    s = _sample(8, 8, [[1, 1, 6, 6], [0, 0, 1, 1], [5, 0, 7, 2]], [1, 2, 3])
    c = T.crop(s, 2, 3, 4)  # rows 2..5, columns 3..6
    np.testing.assert_array_equal(c["boxes"], [[0, 0, 3, 3], [2, 0, 3, 0]])
    np.testing.assert_array_equal(c["box_labels"], [1, 3])
    np.testing.assert_array_equal(c["image"], s["image"][2:6, 3:7])
    with pytest.raises(ValueError, match="outside"):
        T.crop(s, 5, 0, 4)

    f = T.hflip(_sample(4, 8, [[2, 1, 4, 3]], [1], label=np.arange(32, dtype=np.uint8).reshape(4, 8)))
    np.testing.assert_array_equal(f["boxes"], [[3, 1, 5, 3]])
    np.testing.assert_array_equal(f["label"][0], np.arange(8)[::-1])


def test_color_jitter_by_hand():
    img = np.array([[[200.0, 100.0, 50.0], [10.0, 20.0, 30.0]]], np.float32)
    b, c, s = 1.2, 0.8, 1.5
    x = np.minimum(img * b, 255)  # [240, 120, 60], [12, 24, 36]
    g = x @ np.array([0.299, 0.587, 0.114])
    m = g.mean()
    x = np.clip((x - m) * c + m, 0, 255)
    g = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    want = np.clip((x - g) * s + g, 0, 255)
    np.testing.assert_allclose(T.color_jitter(img, b, c, s), want, rtol=1e-5)
    np.testing.assert_allclose(T.color_jitter(img, 1, 1, 1), img)


def test_caffe_and_box_normalisation_by_hand():
    np.testing.assert_allclose(T.caffe_normalize(np.array([200, 100, 50], np.uint8)),
                               [50 - 104.008, 100 - 116.669, 200 - 122.675], rtol=1e-6)
    np.testing.assert_allclose(T.normalize_boxes(np.array([[0, 0, 4, 2]]), 3, 5), [[-1, -1, 1, 1]])
    np.testing.assert_allclose(T.normalize_boxes(np.array([[2, 1, 3, 1]]), 3, 5), [[0, 0, 0.5, 0]])


def _object_scene(rng, h, w, n):
    """Disjoint ellipses with tight boxes; instance map holds the box label (labels 1..n)."""
    ys, xs = np.mgrid[0:h, 0:w]
    inst = np.zeros((h, w), np.uint8)
    boxes = []
    for k in range(1, n + 1):
        for _ in range(100):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            a, b = rng.uniform(2, w / 4), rng.uniform(2, h / 4)
            m = ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1
            if m.any() and not (inst[m] > 0).any():
                break
        inst[m] = k
        yy, xx = np.nonzero(m)
        boxes.append([xx.min(), yy.min(), xx.max(), yy.max()])
    return _sample(h, w, boxes, np.arange(1, n + 1), seed=int(rng.integers(1 << 30)),
                   instance=inst, label=np.where(inst > 0, 9, 0).astype(np.uint8))


@pytest.mark.parametrize("seed", range(12))
def test_boxes_stay_on_their_objects(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(20, 60, 2)
    s = _object_scene(rng, int(h), int(w), 4)
    cfg = T.AugmentConfig(crop_size=40)
    params = T.draw_params(rng, int(h), int(w), cfg)
    out = T.apply_augment(s, params, cfg.crop_size)
    assert out["image"].shape == (40, 40, 3) and out["label"].shape == (40, 40)
    inst = out["instance"]
    for c in range(1, 5):
        present = np.argwhere(inst == c)
        kept = out["box_labels"] == c
        if not kept.any():
            assert len(present) == 0, "object visible but its box was dropped"
            continue
        x0, y0, x1, y1 = out["boxes"][kept][0]
        if not len(present):
            continue  # the crop (or a downscale) kept a corner of the box but none of the object
        ys, xs = present[:, 0], present[:, 1]
        # Every object pixel lies inside its box...
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
        if min(x0, y0) == 0 or max(x1, y1) == 39:
            continue  # possibly clipped by the crop: the visible part may be narrower
        # ...and the box is tight: exactly when upscaled, within the nearest step otherwise.
        slack = 0 if params.scale >= 1 else int(np.ceil(1 / params.scale))
        assert xs.min() - x0 <= slack and x1 - xs.max() <= slack
        assert ys.min() - y0 <= slack and y1 - ys.max() <= slack
    # The transformed background mask equals the one recomputed from the final boxes, with 0 in
    # padding (padding is where the instance map is 255).
    ys, xs = np.mgrid[0:40, 0:40]
    inside_any = np.zeros((40, 40), bool)
    for x0, y0, x1, y1 in out["boxes"]:
        inside_any |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    want = (~inside_any & (inst != 255)).astype(np.uint8)
    np.testing.assert_array_equal(out["bg_mask"], want)


def test_train_transform_deterministic_and_network_ready():
    s = _object_scene(np.random.default_rng(5), 30, 50, 3)
    cfg = T.AugmentConfig(crop_size=32)
    a = T.train_transform(s, np.random.default_rng(1), cfg)
    b = T.train_transform(s, np.random.default_rng(1), cfg)
    c = T.train_transform(s, np.random.default_rng(2), cfg)
    for k in ("image", "boxes", "bg_mask", "label", "instance"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.float32 and a["image"].shape == (32, 32, 3)
    assert a["bg_mask"].dtype == np.float32 and a["label"].dtype == np.uint8
    assert np.all(np.abs(a["boxes"]) <= 1)
    # Same draw in pixel space, then normalised by hand.
    p = T.draw_params(np.random.default_rng(1), 30, 50, cfg)
    px = T.apply_augment(s, p, 32)
    np.testing.assert_allclose(a["boxes"], px["boxes"] / 15.5 - 1, rtol=1e-6)
    np.testing.assert_allclose(a["image"][..., ::-1] + CAFFE_MEAN_BGR[::-1], px["image"],
                               atol=1e-4)
