"""Pseudo labels back to COCO instance masks (RLE), for training Mask R-CNN elsewhere.

One instance per box: the pixels of the box's class inside the box. Boxes come from the same
annotation file the labels were made from (non-crowd objects of the category set), so instance i of
an image is the annotation it was drawn from and keeps its category and box.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from bana_jax import io
from bana_jax.data.coco import COCO_TO_VOC


def category_of_class(categories: list[dict], classes: str) -> dict[int, int]:
    """Class id (1..L) -> COCO category id, the inverse of the map the data source used."""
    if classes == "voc":
        return {voc: coco for coco, voc in COCO_TO_VOC.items()}
    if classes == "coco":
        return {i + 1: cid for i, cid in enumerate(sorted(c["id"] for c in categories))}
    raise ValueError(f"classes must be 'voc' or 'coco', got {classes!r}")


def instance_mask(labels: np.ndarray, box_xywh, class_id: int) -> np.ndarray:
    """uint8 `(H, W)`: pixels labelled `class_id` inside the COCO box `[x, y, w, h]`."""
    height, width = labels.shape
    x, y, w, h = box_xywh
    # The data source's inclusive pixel box: columns floor(x) .. floor(x + w - 1).
    x0, y0 = max(int(np.floor(x)), 0), max(int(np.floor(y)), 0)
    x1, y1 = min(int(np.floor(x + w - 1)), width - 1), min(int(np.floor(y + h - 1)), height - 1)
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1 + 1, x0:x1 + 1] = labels[y0:y1 + 1, x0:x1 + 1] == class_id
    return mask


def export_instances(annotation_file, label_dir, out_file, *, classes: str = "voc") -> dict:
    """Writes `out_file`: the annotation file's images and categories with one RLE instance per
    labelled box, for every image that has `label_dir/<file stem>.png`. Returns counts."""
    with open(annotation_file) as f:
        coco = json.load(f)
    to_category = category_of_class(coco["categories"], classes)
    to_class = {cat: cls for cls, cat in to_category.items()}
    label_dir = Path(label_dir)
    images, annotations = [], []
    for image in coco["images"]:
        path = label_dir / f"{os.path.splitext(image['file_name'])[0]}.png"
        if not path.is_file():
            continue
        labels = io.read_label_png(path)
        if labels.shape != (image["height"], image["width"]):
            raise ValueError(f"{path}: label map is {labels.shape}, the image is "
                             f"{image['height']}x{image['width']}")
        images.append(image)
        for ann in coco["annotations"]:
            if ann["image_id"] != image["id"] or ann.get("iscrowd", 0) or ann["category_id"] not in to_class:
                continue
            mask = instance_mask(labels, ann["bbox"], to_class[ann["category_id"]])
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append(dict(id=len(annotations) + 1, image_id=image["id"],
                                    category_id=ann["category_id"], bbox=list(ann["bbox"]),
                                    area=float(mask.sum()), segmentation=rle, iscrowd=0))
    io.write_json(out_file, dict(images=images, annotations=annotations, categories=coco["categories"]))
    return dict(images=len(images), instances=len(annotations))
