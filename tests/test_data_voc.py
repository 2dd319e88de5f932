"""VOC 2012 + SBD reader on a tiny fake tree, and bad input handling (all sources)."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from bana_jax.data import coco, common, voc

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]


def _xml(objects, h=20, w=30):
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects)
    return (f"<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def _write_voc(root, samples, bg_masks=False):
    for d in ("JPEGImages", "Annotations", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for sid, (objects, label) in samples.items():
        h, w = label.shape
        rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
        (root / "Annotations" / f"{sid}.xml").write_text(_xml(objects, h, w))
        im = Image.fromarray(label, mode="P")
        im.putpalette(PALETTE)
        im.save(root / "SegmentationClassAug" / f"{sid}.png")
        if bg_masks:
            (root / "BgMaskfromBoxes").mkdir(exist_ok=True)
            Image.fromarray(np.full((h, w), 1, np.uint8)).save(root / "BgMaskfromBoxes" / f"{sid}.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("".join(f"{s}\n" for s in samples))


@pytest.fixture
def voc_root(tmp_path):
    label = np.zeros((20, 30), np.uint8)
    label[2:6, 3:10] = 1
    label[10:, 20:] = 255
    _write_voc(tmp_path, {
        "2007_000001": ([("aeroplane", (4, 3, 10, 6)), ("tvmonitor", (1, 1, 30, 20))], label),
        "2007_000002": ([("person", (5, 5, 8, 9)), ("dog", (40, 40, 50, 50)),
                         ("cat", (-3, 2, 8, 9))], np.zeros((20, 30), np.uint8)),
    })
    return tmp_path


def test_reads_boxes_labels_and_palette_indices(voc_root):
    src = voc.VocSource(voc_root)
    assert len(src) == 2 and src.class_names[20] == "tvmonitor"
    s = src[0]
    assert s["id"] == "2007_000001" and s["image"].shape == (20, 30, 3)
    # 1-based inclusive -> 0-based inclusive.
    np.testing.assert_array_equal(s["boxes"], [[3, 2, 9, 5], [0, 0, 29, 19]])
    np.testing.assert_array_equal(s["box_labels"], [1, 20])
    assert s["label"][3, 5] == 1 and s["label"][15, 25] == 255 and s["label"][0, 0] == 0
    assert "bg_mask" not in s


def test_boxes_outside_are_dropped_and_clipped_counted(voc_root, caplog):
    src = voc.VocSource(voc_root)
    s = src[1]
    np.testing.assert_array_equal(s["boxes"], [[4, 4, 7, 8], [0, 1, 7, 8]])
    np.testing.assert_array_equal(s["box_labels"], [15, 8])
    assert src.stats.dropped_outside == 1 and src.stats.clipped == 1
    with caplog.at_level(logging.INFO):
        src.stats.log_summary("voc")
    assert "dropped (outside) 1" in caplog.text


def test_bg_mask_dir_is_read(tmp_path):
    _write_voc(tmp_path, {"a": ([("cat", (1, 1, 3, 3))], np.zeros((6, 7), np.uint8))},
               bg_masks=True)
    s = voc.VocSource(tmp_path)[0]
    assert s["bg_mask"].dtype == np.uint8 and (s["bg_mask"] == 1).all()


def test_voc_bad_inputs(voc_root):
    ann = voc_root / "Annotations"
    (ann / "2007_000001.xml").write_text(_xml([("unicorn", (1, 1, 3, 3))]))
    with pytest.raises(common.DataError, match=r"2007_000001\.xml: unknown class name 'unicorn'"):
        voc.VocSource(voc_root)[0]
    (ann / "2007_000001.xml").write_text("<annotation><object>")
    with pytest.raises(common.DataError, match=r"2007_000001\.xml: malformed XML"):
        voc.VocSource(voc_root)[0]
    (ann / "2007_000001.xml").write_text(_xml([("cat", (1, "a", 3, 3))]))
    with pytest.raises(common.DataError, match="non-numeric bndbox"):
        voc.VocSource(voc_root)[0]
    # skip_bad: the bad sample is logged, counted and replaced by the next one.
    src = voc.VocSource(voc_root, skip_bad=True)
    assert src[0]["id"] == "2007_000002" and len(src.stats.skipped_samples) == 1
    (voc_root / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(common.DataError, match=r"2007_000002\.jpg: file not found"):
        voc.VocSource(voc_root)[1]
    with pytest.raises(common.DataError, match="image-id list not found"):
        voc.VocSource(voc_root, split="val")


def _save(path, array=None, mode=None, **kw):
    Image.fromarray(array, mode=mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


def test_image_modes_and_corrupt_files(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    gray = rgb[..., 0]
    out = common.read_image(_save(tmp_path / "g.png", gray))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, 2))
    rgba = np.concatenate([rgb, np.full((5, 6, 1), 255, np.uint8)], 2)
    p = _save(tmp_path / "a.png", rgba)
    with pytest.raises(common.DataError, match=r"a\.png: unsupported image mode RGBA"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True), rgb)
    p = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p)
    with pytest.raises(common.DataError, match=r"c\.jpg: unsupported image mode CMYK"):
        common.read_image(p)
    assert common.read_image(p, convert_modes=True).shape == (5, 6, 3)
    p = tmp_path / "d.png"
    Image.fromarray((gray.astype(np.uint16) * 257)).save(p)
    with pytest.raises(common.DataError, match=r"d\.png: unsupported image mode 16-bit"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True)[..., 0], gray)
    big = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    _save(tmp_path / "full.jpg", big)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(common.DataError, match=r"t\.jpg: truncated or corrupt"):
        common.read_image(tmp_path / "t.jpg")
    (tmp_path / "n.jpg").write_bytes(b"not an image at all")
    with pytest.raises(common.DataError, match=r"n\.jpg: not a readable image"):
        common.read_image(tmp_path / "n.jpg")
    with pytest.raises(common.DataError, match=r"missing\.jpg: file not found"):
        common.read_image(tmp_path / "missing.jpg")


def test_sanitize_boxes_by_hand():
    stats = common.BoxStats()
    boxes = [[2, 2, 2, 2], [3, 3, 1, 5], [-5, 1, -1, 3], [8, 1, 12, 3], [np.nan, 0, 1, 1],
             [-2, -2, 3, 3]]
    b, l = common.sanitize_boxes(boxes, [1, 2, 3, 4, 5, 6], 6, 10, stats)
    np.testing.assert_array_equal(b, [[2, 2, 2, 2], [8, 1, 9, 3], [0, 0, 3, 3]])
    np.testing.assert_array_equal(l, [1, 4, 6])
    assert (stats.kept, stats.clipped, stats.dropped_empty, stats.dropped_outside) == (3, 2, 2, 1)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        common.sanitize_boxes([[0, 0, 1, 1]] * 2, [1], 5, 5)


def test_coco_bad_inputs(tmp_path):
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train2017.json"
    ann.write_text("{not json")
    with pytest.raises(common.DataError, match=r"instances_train2017\.json: malformed json"):
        coco.CocoSource(tmp_path)
    with pytest.raises(common.DataError, match="annotation file not found"):
        coco.CocoSource(tmp_path, split="val2017")
    (tmp_path / "train2017").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "train2017" / "1.jpg")
    poly = [[1, 1, 5, 1, 5, 5, 1, 5]]
    data = dict(images=[dict(id=1, file_name="1.jpg", height=10, width=12),
                        dict(id=2, file_name="2.jpg", height=10, width=12)],
                categories=[dict(id=1, name="person"), dict(id=3, name="car")],
                annotations=[dict(id=1, image_id=i, category_id=1, bbox=[1, 1, 4, 4], area=16,
                                  iscrowd=0, segmentation=poly) for i in (1, 2)]
                + [dict(id=3, image_id=1, category_id=3, bbox=[20, 0, 3, 3], area=9, iscrowd=0,
                        segmentation=poly),
                   dict(id=4, image_id=1, category_id=3, bbox=[2, 2, 0, 3], area=0, iscrowd=0,
                        segmentation=poly)])
    ann.write_text(json.dumps(data))
    src = coco.CocoSource(tmp_path)
    s = src[0]  # the outside and the zero-width car boxes are dropped and counted
    np.testing.assert_array_equal(s["boxes"], [[1, 1, 4, 4]])
    assert src.stats.dropped_outside == 1 and src.stats.dropped_empty == 1
    with pytest.raises(common.DataError, match=r"2\.jpg: file not found"):
        src[1]
    assert coco.CocoSource(tmp_path, skip_bad=True)[1]["id"] == "1"
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(common.DataError, match="unknown category 99"):
        coco.CocoSource(tmp_path)
