"""MS-COCO source on the real photos of tests/fixtures/coco (coco128, coco_mini subsets)."""

import json

import numpy as np
import pytest

from bana_jax.data import coco


@pytest.fixture(scope="module")
def coco128(coco_photos):
    return coco_photos / "coco128"


def _json(root):
    return json.loads((root / "annotations" / "instances_train2017.json").read_text())


def test_voc20_boxes_and_ids_match_the_json(coco128):
    src = coco.CocoSource(coco128, classes="voc", with_label=False)
    data = _json(coco128)
    want_ids = sorted({a["image_id"] for a in data["annotations"]
                       if not a["iscrowd"] and a["category_id"] in coco.COCO_TO_VOC})
    assert src.ids == want_ids
    assert len(src.class_names) == 21 and src.class_names[15] == "person"
    s = src[3]
    info = src.images[want_ids[3]]
    anns = [a for a in data["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]
            and a["category_id"] in coco.COCO_TO_VOC]
    want = np.array([[x, y, min(x + w - 1, info["width"] - 1), min(y + h - 1, info["height"] - 1)]
                     for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
    np.testing.assert_allclose(s["boxes"], want, rtol=1e-6)
    np.testing.assert_array_equal(s["box_labels"], [coco.COCO_TO_VOC[a["category_id"]] for a in anns])
    assert s["image"].shape == (info["height"], info["width"], 3) and s["image"].dtype == np.uint8
    assert s["id"] == info["file_name"][:-4]


def test_semantic_label_crowd_and_non_voc_are_ignored(coco128):
    from pycocotools.coco import COCO

    src = coco.CocoSource(coco128, classes="voc", require_boxes=False)
    api = COCO(str(coco128 / "annotations" / "instances_train2017.json"))
    crowd_img = next(a["image_id"] for a in api.dataset["annotations"] if a["iscrowd"])
    s = src[src.ids.index(crowd_img)]
    for a in api.loadAnns(api.getAnnIds(imgIds=[crowd_img])):
        m = api.annToMask(a).astype(bool)
        if a["iscrowd"]:
            assert (s["label"][m] == 255).all()
    # Over all images: class pixels lie in boxes of their class; non-VOC-only pixels are 255.
    outside = total = 0
    for i in range(len(src)):
        s = src[i]
        anns = api.loadAnns(api.getAnnIds(imgIds=[src.ids[i]]))
        voc_union = np.zeros(s["label"].shape, bool)
        for a in anns:
            if a["category_id"] in coco.COCO_TO_VOC or a["iscrowd"]:
                voc_union |= api.annToMask(a).astype(bool)
        for a in anns:
            if a["category_id"] not in coco.COCO_TO_VOC and not a["iscrowd"]:
                only = api.annToMask(a).astype(bool) & ~voc_union
                assert (s["label"][only] == 255).all()
        ys, xs = np.mgrid[0:s["label"].shape[0], 0:s["label"].shape[1]]
        for c in set(np.unique(s["label"])) - {0, 255}:
            inbox = np.zeros(s["label"].shape, bool)
            for (x0, y0, x1, y1), bc in zip(s["boxes"], s["box_labels"]):
                if bc == c:
                    inbox |= (xs >= x0 - 1) & (xs <= x1 + 1) & (ys >= y0 - 1) & (ys <= y1 + 1)
            outside += np.sum((s["label"] == c) & ~inbox)
            total += np.sum(s["label"] == c)
    assert total > 10000 and outside / total < 0.01


def test_all80_and_coco_mini(coco_photos):
    src = coco.CocoSource(coco_photos / "coco_mini", classes="coco")
    assert len(src.class_names) == 81 and src.class_names[1] == "person"
    labels = np.concatenate([src[i]["box_labels"] for i in range(len(src))])
    assert labels.min() >= 1 and labels.max() <= 80
    data = _json(coco_photos / "coco_mini")
    assert len(labels) == sum(1 for a in data["annotations"] if not a["iscrowd"]) - \
        src.stats.dropped_empty - src.stats.dropped_outside
    with pytest.raises(ValueError, match="classes"):
        coco.CocoSource(coco_photos / "coco_mini", classes="voc20")
