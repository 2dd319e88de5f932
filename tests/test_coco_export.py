import json

import numpy as np
from pycocotools import mask as mask_utils

from bana_jax import coco_export, io


def test_instances_round_trip(tmp_path):
    categories = [dict(id=1, name="person"), dict(id=3, name="car"), dict(id=90, name="toothbrush")]
    images = [dict(id=7, file_name="a.jpg", height=10, width=12), dict(id=8, file_name="b.jpg", height=5, width=5)]
    annotations = [
        dict(id=1, image_id=7, category_id=1, bbox=[1.0, 2.0, 4.0, 5.0], iscrowd=0),   # cols 1..4, rows 2..6
        dict(id=2, image_id=7, category_id=3, bbox=[6.5, 0.0, 5.5, 3.0], iscrowd=0),   # cols 6..11, rows 0..2
        dict(id=3, image_id=7, category_id=1, bbox=[0.0, 0.0, 12.0, 10.0], iscrowd=1),  # crowd: skipped
        dict(id=4, image_id=7, category_id=90, bbox=[0.0, 0.0, 2.0, 2.0], iscrowd=0),   # not a VOC class
    ]
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    labels = np.zeros((10, 12), np.uint8)
    labels[3:9, 0:3] = 15   # person (VOC 15), partly outside its box
    labels[0:2, 8:12] = 7   # car (VOC 7)
    io.write_label_png(tmp_path / "Y_crf" / "a.png", labels)  # b.png missing: b is left out

    counts = coco_export.export_instances(annotation_file, tmp_path / "Y_crf", tmp_path / "out.json")
    assert counts == dict(images=1, instances=2)
    out = json.loads((tmp_path / "out.json").read_text())
    assert [im["id"] for im in out["images"]] == [7]
    person, car = out["annotations"]
    want_person = np.zeros((10, 12), np.uint8)
    want_person[3:7, 1:3] = 1  # class pixels restricted to rows 2..6, cols 1..4
    want_car = np.zeros((10, 12), np.uint8)
    want_car[0:2, 8:12] = 1
    for ann, want, category in ((person, want_person, 1), (car, want_car, 3)):
        assert ann["category_id"] == category and ann["image_id"] == 7
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]), want)
        assert ann["area"] == want.sum()
