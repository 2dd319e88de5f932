"""Box-fill and GrabCut baselines on hand-built label maps and a synthetic image with a known answer."""

import numpy as np
import pytest

from bana_jax import baselines


def test_box_fill_smaller_on_top_in_any_order():
    # Inclusive boxes: big covers rows 0..5, cols 0..7; small (fractional) rows 1..3, cols 2..4.
    big, small = [0, 0, 7, 5], [2.5, 1.2, 4.9, 3.0]
    expected = np.zeros((7, 10), np.uint8)
    expected[0:6, 0:8] = 3
    expected[1:4, 2:5] = 9
    for boxes, labels in [([big, small], [3, 9]), ([small, big], [9, 3])]:
        got = baselines.box_fill(np.array(boxes, np.float32), labels, (7, 10))
        np.testing.assert_array_equal(got, expected)
    assert baselines.box_fill(np.zeros((0, 4)), [], (3, 4)).sum() == 0


def test_box_convention_is_inclusive():
    # A box drawn tightly around an object's pixels (as COCO/VOC/synthetic sources give it:
    # first and last pixel) fills exactly that object.
    obj = np.zeros((12, 15), bool)
    obj[3:9, 4:11] = True  # rows 3..8, cols 4..10
    ys, xs = np.nonzero(obj)
    box = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], np.float32)
    np.testing.assert_array_equal(baselines.box_fill(box, [5], obj.shape) == 5, obj)
    np.testing.assert_array_equal(baselines.half_open_boxes(box), [[4, 3, 11, 9]])
    assert baselines.half_open_boxes(np.zeros((0, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match="boxes"):
        baselines.half_open_boxes(np.zeros((2, 3)))


def test_box_fill_bad_labels():
    with pytest.raises(ValueError, match="box_labels"):
        baselines.box_fill(np.array([[0, 0, 2, 2]]), [0], (4, 4))
    with pytest.raises(ValueError, match="box_labels"):
        baselines.box_fill(np.array([[0, 0, 2, 2]]), [1, 2], (4, 4))


def disk_image(size=80, centre=(38, 44), radius=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    image = np.empty((size, size, 3), np.float64)
    image[:] = (40, 90, 200)  # blue background
    image[disk] = (220, 40, 30)  # red disk
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disk


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_grabcut_segments_a_disk():
    image, disk = disk_image()
    box = np.array([[44 - 16 - 6, 38 - 16 - 5, 44 + 16 + 6, 38 + 16 + 5]], np.float32)
    label = baselines.grabcut(image, box, [7])
    assert set(np.unique(label)) <= {0, 7}
    assert iou(label == 7, disk) > 0.9
    # Box-fill on the same box is much worse: the corners of the box are background.
    fill = baselines.box_fill(box, [7], image.shape[:2])
    assert iou(fill == 7, disk) < 0.75
    # Deterministic (seeded k-means).
    np.testing.assert_array_equal(baselines.grabcut(image, box, [7]), label)


def test_grabcut_degenerate_boxes_and_overlap():
    image, disk = disk_image(size=40, centre=(20, 20), radius=8)
    whole = baselines.grabcut(image, np.array([[0, 0, 39, 39]], np.float32), [2])
    assert np.all(whole == 2)  # no background sample: the box is filled
    thin = baselines.grabcut(image, np.array([[5, 5, 5, 29]], np.float32), [4])  # 1 x 25 pixels
    assert (thin == 4).sum() == 25
    # A small box inside a larger one is painted on top.
    both = baselines.grabcut(image, np.array([[2, 2, 37, 37], [5, 5, 5, 29]], np.float32), [2, 4])
    assert (both == 4).sum() == 25
    with pytest.raises(ValueError, match="image"):
        baselines.grabcut(image.astype(np.float32), np.zeros((0, 4)), [])


def test_official_boxes_reproduce_the_official_arithmetic():
    """The official code's boxes, computed as it does (NumPy float32 normalisation in the data transform,
    then a float32 torch round trip and `.long()`), from the VOC XML values = inclusive box + 1."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for height, width in ((480, 640), (427, 640), (333, 500), (375, 499), (2, 3)):
        x0 = rng.integers(0, width, 300)
        x1 = np.minimum(x0 + rng.integers(0, width, 300), width - 1)
        y0 = rng.integers(0, height, 300)
        y1 = np.minimum(y0 + rng.integers(0, height, 300), height - 1)
        inclusive = np.stack([x0, y0, x1, y1], 1).astype(np.float32)
        xml = inclusive + 1  # VOC: 1-based
        norm_h, norm_w = (height - 1) / 2, (width - 1) / 2
        normalised = xml.copy()
        normalised[:, [0, 2]] = normalised[:, [0, 2]] / norm_w - 1
        normalised[:, [1, 3]] = normalised[:, [1, 3]] / norm_h - 1
        back = torch.from_numpy(normalised)
        back[:, [0, 2]] = back[:, [0, 2]] * norm_w + norm_w
        back[:, [1, 3]] = back[:, [1, 3]] * norm_h + norm_h
        expected = back.long().numpy()
        got = baselines.official_half_open_boxes(inclusive, (height, width))
        np.testing.assert_array_equal(got, expected, err_msg=f"{height}x{width}")
        if height > 100:  # the round trip lowers some bounds by one, and only by one
            lowered = expected != xml
            assert 0 < lowered.sum() < lowered.size // 4 and np.all(xml[lowered] - expected[lowered] == 1)
