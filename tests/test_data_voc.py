"""VOC 2012 + SBD reader on a tiny fake tree, and bad input handling (all sources)."""

import json
import logging
import re

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
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        src = voc.VocSource(voc_root)
    # Counted over all XML files when the source is built, and logged once.
    assert (src.audit.kept, src.audit.clipped, src.audit.dropped_outside) == (4, 1, 1)
    assert caplog.text.count("boxes: kept") == 1
    assert "train_aug (2 images): boxes: kept 4, clipped 1, dropped (zero area) 0, " \
           "dropped (outside) 1; skipped samples 0" in caplog.text
    s = src[1]
    np.testing.assert_array_equal(s["boxes"], [[4, 4, 7, 8], [0, 1, 7, 8]])
    np.testing.assert_array_equal(s["box_labels"], [15, 8])
    assert src.stats.dropped_outside == 1 and src.stats.clipped == 1  # this process's loads


def test_boxes_of_xml_without_size_are_checked_when_loaded(tmp_path, caplog):
    _write_voc(tmp_path, {"a": ([("cat", (1, 1, 3, 3)), ("dog", (5, 5, 4, 9))],
                                np.zeros((6, 7), np.uint8))})
    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<height>6</height>", ""))
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        src = voc.VocSource(tmp_path)
    assert src.audit.unchecked == 2 and src.audit.kept == 0
    assert "not checked (image size unknown) 2" in caplog.text
    assert len(src[0]["boxes"]) == 1 and src.stats.dropped_empty == 1


def test_bg_mask_dir_is_read(tmp_path):
    _write_voc(tmp_path, {"a": ([("cat", (1, 1, 3, 3))], np.zeros((6, 7), np.uint8))},
               bg_masks=True)
    s = voc.VocSource(tmp_path)[0]
    assert s["bg_mask"].dtype == np.uint8 and (s["bg_mask"] == 1).all()


def test_voc_bad_annotations_fail_when_the_source_is_built(voc_root):
    ann = voc_root / "Annotations"
    (ann / "2007_000001.xml").write_text(_xml([("unicorn", (1, 1, 3, 3))]))
    with pytest.raises(common.DataError, match=r"2007_000001\.xml: unknown class name 'unicorn'"):
        voc.VocSource(voc_root)
    (ann / "2007_000001.xml").write_text("<annotation><object>")
    with pytest.raises(common.DataError, match=r"2007_000001\.xml: malformed XML"):
        voc.VocSource(voc_root)
    (ann / "2007_000001.xml").write_text(_xml([("cat", (1, "a", 3, 3))]))
    with pytest.raises(common.DataError, match=r"2007_000001\.xml: object 'cat' has a missing or "
                                               r"non-numeric bndbox"):
        voc.VocSource(voc_root)
    (ann / "2007_000002.xml").unlink()
    with pytest.raises(common.DataError, match=r"2007_000001\.xml"):  # the first bad one
        voc.VocSource(voc_root)
    with pytest.raises(common.DataError, match="image-id list not found"):
        voc.VocSource(voc_root, split="val")


def test_voc_skip_bad_drops_bad_annotations_and_skips_bad_images(voc_root, caplog):
    ann = voc_root / "Annotations"
    (ann / "2007_000001.xml").write_text(_xml([("cat", (1, "a", 3, 3))]))
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        src = voc.VocSource(voc_root, skip_bad=True)
    assert src.ids == ["2007_000002"] and len(src.audit.skipped_samples) == 1
    assert "skipping bad sample: " in caplog.text and "2007_000001.xml" in caplog.text
    assert "(1 images): boxes: kept 2, clipped 1" in caplog.text
    (ann / "2007_000002.xml").write_text("<annotation>")
    with pytest.raises(common.DataError, match=r"train_aug\.txt: no usable samples \(all 2 skipped"):
        voc.VocSource(voc_root, skip_bad=True)
    # A bad image is found when its sample is loaded: skipped for the next sample.
    (ann / "2007_000002.xml").write_text(_xml([("cat", (1, 1, 3, 3))]))
    (ann / "2007_000001.xml").write_text(_xml([("dog", (1, 1, 3, 3))]))
    (voc_root / "JPEGImages" / "2007_000001.jpg").unlink()
    src = voc.VocSource(voc_root, skip_bad=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        for epoch in range(3):  # warned once, not every epoch
            assert src[0]["id"] == "2007_000002" and len(src.stats.skipped_samples) == 1
    assert "2007_000001.jpg: file not found" in src.stats.skipped_samples[0]
    assert caplog.text.count("2007_000001.jpg: file not found") == 1
    with pytest.raises(common.DataError, match=r"2007_000001\.jpg: file not found"):
        voc.VocSource(voc_root)[0]


def test_voc_zero_area_and_inverted_boxes_are_dropped_and_counted(voc_root):
    (voc_root / "Annotations" / "2007_000001.xml").write_text(
        _xml([("cat", (5, 5, 4, 9)), ("dog", (3, 3, 3, 3)), ("cow", (60, 1, 70, 5))]))
    src = voc.VocSource(voc_root)
    assert (src.audit.dropped_empty, src.audit.dropped_outside) == (1, 2)
    s = src[0]  # a one-pixel box (xmin == xmax) has an area: kept
    np.testing.assert_array_equal(s["boxes"], [[2, 2, 2, 2]])
    np.testing.assert_array_equal(s["box_labels"], [12])


def _voc_config(root, skip_bad: str):
    from bana_jax.config import apply_overrides, base_config

    return apply_overrides(base_config(), [("data.name", "voc"), ("data.root", str(root)),
                                           ("data.split", "train_aug"), ("data.skip_bad", skip_bad)])


def test_config_skip_bad_reaches_the_source(voc_root, caplog):
    from bana_jax import builders

    big = np.random.default_rng(3).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    jpg = voc_root / "JPEGImages" / "2007_000001.jpg"
    Image.fromarray(big).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:-200])
    assert builders.data_source(_voc_config(voc_root, "false")).source.skip_bad is False
    with pytest.raises(common.DataError, match=r"2007_000001\.jpg: truncated or corrupt image"):
        builders.data_source(_voc_config(voc_root, "false"))[0]
    source = builders.data_source(_voc_config(voc_root, "true"))
    with caplog.at_level(logging.WARNING, logger="bana_jax.data"):
        assert source[0]["id"] == "2007_000002"
    assert "skipping bad sample: " in caplog.text and "2007_000001.jpg: truncated" in caplog.text
    assert len(source.source.stats.skipped_samples) == 1


def _save(path, array=None, mode=None, **kw):
    """Save an array (or a PIL image) as an image file; returns the path."""
    if not isinstance(array, Image.Image):
        array = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    array.save(path, **kw)
    return path


def _png16(path, array):
    """A 16-bit-per-channel PNG written by hand (PIL cannot write 16-bit colour): uint16 (H, W)
    gray, (H, W, 2) gray + alpha, (H, W, 3) RGB or (H, W, 4) RGBA."""
    import struct
    import zlib

    h, w = array.shape[:2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    rows = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16bit_images_are_rejected_or_converted_with_a_log_line(tmp_path, caplog):
    rgb16 = np.random.default_rng(4).integers(0, 65536, (5, 6, 3)).astype(np.uint16)
    # PIL decodes this as mode 'RGB' (the high byte of each channel) and says nothing.
    p = _png16(tmp_path / "rgb16.png", rgb16)
    assert Image.open(p).mode == "RGB"
    with pytest.raises(common.DataError, match=r"rgb16\.png: unsupported image mode 16-bit RGB;"):
        common.read_image(p)
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        out = common.read_image(p, convert_modes=True)
    np.testing.assert_array_equal(out, rgb16 >> 8)
    assert "rgb16.png: converting image mode 16-bit RGB to 8-bit RGB" in caplog.text
    rgba16 = np.concatenate([rgb16, np.full((5, 6, 1), 65535, np.uint16)], 2)
    p = _png16(tmp_path / "rgba16.png", rgba16)
    with pytest.raises(common.DataError, match=r"rgba16\.png: unsupported image mode 16-bit RGBA"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True), rgb16 >> 8)
    p = _png16(tmp_path / "la16.png", np.stack([rgb16[..., 0], rgb16[..., 1]], 2))
    with pytest.raises(common.DataError, match=r"la16\.png: unsupported image mode 16-bit grayscale with"):
        common.read_image(p)
    # 16-bit grayscale is scaled by its full range, also when the image is dark.
    dark = np.arange(30, dtype=np.uint16).reshape(5, 6) * 8
    p = _png16(tmp_path / "g16.png", dark)
    with pytest.raises(common.DataError, match=r"g16\.png: unsupported image mode 16-bit grayscale"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True)[..., 0],
                                  np.round(dark * 255 / 65535).astype(np.uint8))


def test_cmyk_jpeg_converts_to_the_same_colours(tmp_path):
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(p, quality=95)
    with pytest.raises(common.DataError, match=r"cmyk\.jpg: unsupported image mode CMYK"):
        common.read_image(p)
    # PIL handles the Adobe marker's inverted CMYK: colours come back (up to JPEG loss).
    out = common.read_image(p, convert_modes=True).astype(int)
    assert np.abs(out - rgb).mean() < 3


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
    p = _save(tmp_path / "p.png", Image.fromarray(rgb).convert("P"))
    with pytest.raises(common.DataError, match=r"p\.png: unsupported image mode palette"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True),
                                  np.asarray(Image.open(p).convert("RGB")))
    p = _save(tmp_path / "la.png", np.stack([gray, gray], 2), mode="LA")
    with pytest.raises(common.DataError, match=r"la\.png: unsupported image mode grayscale with alpha"):
        common.read_image(p)
    np.testing.assert_array_equal(common.read_image(p, convert_modes=True)[..., 1], gray)
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


def _coco_data():
    """Two 10x12 images (2.jpg is not on disk), a person box on each, two bad car boxes on 1."""
    poly = [[1, 1, 5, 1, 5, 5, 1, 5]]
    return dict(images=[dict(id=1, file_name="1.jpg", height=10, width=12),
                        dict(id=2, file_name="2.jpg", height=10, width=12)],
                categories=[dict(id=1, name="person"), dict(id=3, name="car")],
                annotations=[dict(id=i, image_id=i, category_id=1, bbox=[1, 1, 4, 4], area=16,
                                  iscrowd=0, segmentation=poly) for i in (1, 2)]
                + [dict(id=3, image_id=1, category_id=3, bbox=[20, 0, 3, 3], area=9, iscrowd=0,
                        segmentation=poly),
                   dict(id=4, image_id=1, category_id=3, bbox=[2, 2, 0, 3], area=0, iscrowd=0,
                        segmentation=poly)])


@pytest.fixture
def coco_root(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "train2017" / "1.jpg")
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(_coco_data()))
    return tmp_path


def _write_coco(root, data):
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))


def test_coco_bad_files(coco_root, caplog):
    ann = coco_root / "annotations" / "instances_train2017.json"
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        src = coco.CocoSource(coco_root)
    # Counted over the json when the source is built, and logged once.
    assert (src.audit.kept, src.audit.dropped_outside, src.audit.dropped_empty) == (2, 1, 1)
    assert caplog.text.count("boxes: kept") == 1
    assert "instances_train2017.json (2 images): boxes: kept 2, clipped 0, dropped (zero area) 1, " \
           "dropped (outside) 1; skipped samples 0" in caplog.text
    s = src[0]  # the outside and the zero-width car boxes are dropped and counted
    np.testing.assert_array_equal(s["boxes"], [[1, 1, 4, 4]])
    assert src.stats.dropped_outside == 1 and src.stats.dropped_empty == 1
    with pytest.raises(common.DataError, match=r"2\.jpg: file not found"):
        src[1]
    src = coco.CocoSource(coco_root, skip_bad=True)
    assert src[1]["id"] == "1" and "2.jpg: file not found" in src.stats.skipped_samples[0]
    with pytest.raises(common.DataError, match="annotation file not found"):
        coco.CocoSource(coco_root, split="val2017")
    ann.write_text("{not json")
    with pytest.raises(common.DataError, match=r"instances_train2017\.json: malformed json"):
        coco.CocoSource(coco_root)
    ann.write_text(json.dumps(dict(images={}, annotations=[], categories=[])))
    with pytest.raises(common.DataError, match=r"\.json: not a COCO instances file: 'images' is not a list"):
        coco.CocoSource(coco_root)


def _drop(entry, key):
    del entry[key]


# (how to break the json, the error naming the entry); every entry above belongs to image 1 or 2.
BAD_COCO = {
    "annotation without bbox": (lambda d: _drop(d["annotations"][1], "bbox"),
                                r"annotation 2 \(image 2\) has no 'bbox'"),
    "annotation without category_id": (lambda d: _drop(d["annotations"][1], "category_id"),
                                       r"annotation 2 \(image 2\) has no 'category_id'"),
    "annotation without image_id": (lambda d: _drop(d["annotations"][1], "image_id"),
                                    r"annotation 2 has no 'image_id'"),
    "unknown category": (lambda d: d["annotations"][1].update(category_id=99),
                         r"annotation 2 \(image 2\) has unknown category 99"),
    "unknown image": (lambda d: d["annotations"][1].update(image_id=7),
                      r"annotation 2 \(image 7\) refers to unknown image 7"),
    "malformed bbox": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]),
                       r"annotation 2 \(image 2\) has a malformed bbox \[1, 2, 3\]"),
    "annotation without segmentation": (lambda d: _drop(d["annotations"][1], "segmentation"),
                                        r"annotation 2 \(image 2\) has no 'segmentation'"),
    "annotation not an object": (lambda d: d["annotations"].__setitem__(1, [1, 2]),
                                 r"annotation entry #1 is not an object"),
    "image without file_name": (lambda d: _drop(d["images"][1], "file_name"),
                                r"image 2 has no 'file_name'"),
    "image without height": (lambda d: _drop(d["images"][1], "height"), r"image 2 has no 'height'"),
    "image with a bad size": (lambda d: d["images"][1].update(width="12"),
                              r"image 2 has a bad size 10x'12'"),
    "image without id": (lambda d: _drop(d["images"][1], "id"), r"image entry #1 has no 'id'"),
    "image listed twice": (lambda d: d["images"].append(dict(d["images"][1])),
                           r"image 2 is listed twice"),
}


@pytest.mark.parametrize("case", sorted(BAD_COCO))
def test_coco_broken_json_entries_name_the_file_and_entry(coco_root, case, caplog):
    data = _coco_data()
    BAD_COCO[case][0](data)
    _write_coco(coco_root, data)
    with pytest.raises(common.DataError, match=r"instances_train2017\.json: " + BAD_COCO[case][1]):
        coco.CocoSource(coco_root)
    # skip_bad: the entry (and the image of a bad annotation) is dropped and logged; image 1 stays.
    with caplog.at_level(logging.WARNING, logger="bana_jax.data"):
        src = coco.CocoSource(coco_root, skip_bad=True)
    assert src.ids == [1] and src[0]["id"] == "1"
    assert src.audit.skipped_samples and "skipping bad sample: " in caplog.text
    assert re.search(BAD_COCO[case][1], caplog.text)


def test_coco_segmentation_needed_only_for_labels(coco_root):
    data = _coco_data()
    del data["annotations"][1]["segmentation"], data["annotations"][1]["area"]
    _write_coco(coco_root, data)
    assert len(coco.CocoSource(coco_root, with_label=False)) == 2
    data["annotations"][0]["segmentation"] = "nonsense"
    _write_coco(coco_root, dict(_coco_data(), annotations=data["annotations"][:1]))
    with pytest.raises(common.DataError, match=r"\.json: annotation 1 \(image 1\) has a malformed "
                                               r"segmentation"):
        coco.CocoSource(coco_root)[0]


def test_coco_without_usable_boxes_or_images_is_a_clear_error(coco_root, caplog):
    """Used to train on background only (all boxes degenerate) or to fail in grain's sampler
    ("Invalid number of records") with no file named."""
    data = _coco_data()
    for ann, bbox in zip(data["annotations"], ([1, 1, 0, 4], [1, 1, float("nan"), 4], [20, 0, 3, 3],
                                               [2, 2, 0, 3])):
        ann["bbox"] = bbox
    _write_coco(coco_root, data)
    with pytest.raises(common.DataError, match=r"instances_train2017\.json: no usable box: all 4 dropped "
                                               r"\(3 with zero area or not finite, 1 outside their image\)"):
        coco.CocoSource(coco_root)
    data = _coco_data()  # a partial drop is a warning, once
    _write_coco(coco_root, data)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bana_jax.data"):
        coco.CocoSource(coco_root)
    assert [r.levelname for r in caplog.records if "boxes: kept" in r.getMessage()] == ["WARNING"]
    for images, annotations, why in (([], [], "0 image entries"),
                                     (data["images"], [], "2 image entries, none with a box of the voc classes")):
        _write_coco(coco_root, dict(data, images=images, annotations=annotations))
        with pytest.raises(common.DataError, match=r"instances_train2017\.json: no usable image: " + why):
            coco.CocoSource(coco_root)


def test_coco_broken_category_table_always_fails(coco_root):
    data = _coco_data()
    del data["categories"][1]["id"]
    _write_coco(coco_root, data)
    with pytest.raises(common.DataError, match=r"\.json: category entry #1 needs an integer 'id'"):
        coco.CocoSource(coco_root, skip_bad=True)


def _coco_subset_source(root, field: str, value: str):
    """builders.data_source of a coco_subset config on `root` with data.`field` = `value`."""
    from bana_jax import builders
    from bana_jax.config import apply_overrides, base_config

    return builders.data_source(apply_overrides(base_config(), [
        ("data.name", "coco_subset"), ("data.images", str(root / "train2017")),
        ("data.annotations", str(root / "annotations" / "instances_train2017.json")),
        (f"data.{field}", value)]))


def test_config_skip_bad_reaches_coco_subset(coco_root):
    data = _coco_data()
    del data["annotations"][1]["bbox"]
    _write_coco(coco_root, data)
    with pytest.raises(common.DataError, match=r"annotation 2 \(image 2\) has no 'bbox'"):
        _coco_subset_source(coco_root, "skip_bad", "false")
    assert len(_coco_subset_source(coco_root, "skip_bad", "true")) == 1


def test_config_convert_modes_reaches_coco_subset(coco_root):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(coco_root / "train2017" / "1.png")
    data = _coco_data()
    data["images"][0]["file_name"] = "1.png"
    _write_coco(coco_root, data)
    with pytest.raises(common.DataError, match=r"1\.png: unsupported image mode RGBA .*convert_modes=true"):
        _coco_subset_source(coco_root, "convert_modes", "false")[0]
    image = _coco_subset_source(coco_root, "convert_modes", "true")[0]["image"]
    assert image.shape == (10, 12, 3) and image.dtype == np.uint8 and image[0, 0, 0] == 200


def test_sanitize_boxes_with_a_size_per_box():
    stats = common.BoxStats()
    b, l = common.sanitize_boxes([[0, 0, 9, 9], [0, 0, 9, 9], [12, 0, 13, 1]], [1, 2, 3],
                                 np.array([5, 10, 10]), np.array([5, 20, 12]), stats)
    np.testing.assert_array_equal(b, [[0, 0, 4, 4], [0, 0, 9, 9]])
    np.testing.assert_array_equal(l, [1, 2])
    assert (stats.kept, stats.clipped, stats.dropped_outside) == (2, 1, 1)


def test_coco_missing_image_folder_is_named_at_start(coco_root, tmp_path):
    """It used to be found image by image, the first missing file named as if only it were gone."""
    _write_coco(coco_root, _coco_data())
    with pytest.raises(common.DataError, match=r"nowhere: no such folder \(the images of .*instances_train2017\.json\)"):
        coco.CocoSource(coco_root, image_dir=tmp_path / "nowhere")
