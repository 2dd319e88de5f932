"""MS-COCO from an instances json: boxes, crowd handling, per-image semantic ground truth.

Category sets: "all80" (COCO categories in ascending id order -> 1..80) or "voc20" (the 20 VOC
classes, `COCO_TO_VOC`; objects of other categories get no box and are 255 in the label map).
Crowd annotations never give a box and are 255 in the label map.

COCO boxes `[x, y, w, h]` are continuous (pixel j covers [j, j + 1)); as inclusive pixel indices
(common.py) they become `[x, y, x + w - 1, y + h - 1]`, then clipped to the image (a box under a
pixel wide or tall is dropped as empty, counted).
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np

from bana_jax.data.common import (VOC_CLASSES, BoxStats, DataError, load_or_skip, read_image,
                                  sanitize_boxes)

log = logging.getLogger(__name__)

# COCO category id -> VOC class index (../shared/data/README.md).
COCO_TO_VOC = {5: 1, 2: 2, 16: 3, 9: 4, 44: 5, 6: 6, 3: 7, 17: 8, 62: 9, 21: 10, 67: 11, 18: 12,
               19: 13, 4: 14, 1: 15, 64: 16, 20: 17, 63: 18, 7: 19, 72: 20}
CATEGORY_SETS = ("voc20", "all80")


def _load_json(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "annotation file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed json ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or key not in data:
            raise DataError(path, f"not a COCO instances file: missing {key!r}")
    return data


def _segmentation_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> bool (H, W)."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict):
            rle = segmentation
        else:
            raise TypeError(f"type {type(segmentation).__name__}")
        with warnings.catch_warnings():  # pycocotools vs NumPy 2 copy-keyword deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise DataError(where, f"malformed segmentation ({e})") from None


class CocoSource:
    """Random-access COCO samples (raw sample dicts, see HELPERS.md / common.py).

    root/annotations/instances_{split}.json and root/{split}/<file_name>.
    require_boxes: keep only images with at least one box of the category set (training).
    with_label: rasterise the semantic ground truth `label` (uint8, 255 = ignore).
    skip_bad: log and skip unreadable samples instead of raising.
    """

    def __init__(self, root, split: str = "train2017", category_set: str = "voc20",
                 require_boxes: bool = True, with_label: bool = True, skip_bad: bool = False,
                 convert_modes: bool = False, annotation_file=None, image_dir=None):
        if category_set not in CATEGORY_SETS:
            raise ValueError(f"category_set must be one of {CATEGORY_SETS}, got {category_set!r}")
        self.root = os.fspath(root)
        self.annotation_file = os.fspath(annotation_file or os.path.join(
            self.root, "annotations", f"instances_{split}.json"))
        self.image_dir = os.fspath(image_dir or os.path.join(self.root, split))
        self.with_label, self.skip_bad, self.convert_modes = with_label, skip_bad, convert_modes
        self.stats = BoxStats()
        data = _load_json(self.annotation_file)
        cats = sorted(c["id"] for c in data["categories"])
        if category_set == "voc20":
            self.category_map = dict(COCO_TO_VOC)
            self.class_names = VOC_CLASSES
        else:
            self.category_map = {cid: i + 1 for i, cid in enumerate(cats)}
            names = {c["id"]: c["name"] for c in data["categories"]}
            self.class_names = ("background",) + tuple(names[c] for c in cats)
        self.images = {im["id"]: im for im in data["images"]}
        self.anns = {i: [] for i in self.images}
        known = {c["id"] for c in data["categories"]}
        for a in data["annotations"]:
            if a.get("image_id") not in self.anns:
                raise DataError(self.annotation_file,
                                f"annotation {a.get('id')} refers to unknown image {a.get('image_id')}")
            if a.get("category_id") not in known:
                raise DataError(self.annotation_file, f"annotation {a.get('id')} has unknown "
                                                      f"category {a.get('category_id')}")
            self.anns[a["image_id"]].append(a)
        ids = sorted(self.images)
        if require_boxes:
            ids = [i for i in ids if any(self._is_box(a) for a in self.anns[i])]
        self.ids = ids

    def _is_box(self, ann) -> bool:
        return not ann.get("iscrowd", 0) and ann["category_id"] in self.category_map

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return load_or_skip(self._load, int(index), len(self), self.skip_bad, self.stats)

    def _load(self, index: int) -> dict:
        info = self.images[self.ids[index]]
        path = os.path.join(self.image_dir, info["file_name"])
        image = read_image(path, self.convert_modes)
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise DataError(path, f"image is {h}x{w} but the annotation says "
                                  f"{info['height']}x{info['width']}")
        anns = self.anns[info["id"]]
        boxes, labels = [], []
        for a in anns:
            if self._is_box(a):
                x, y, bw, bh = a["bbox"]
                boxes.append([x, y, x + bw - 1, y + bh - 1])
                labels.append(self.category_map[a["category_id"]])
        boxes, labels = sanitize_boxes(boxes, labels, h, w, self.stats)
        sample = dict(image=image, boxes=boxes, box_labels=labels,
                      id=os.path.splitext(info["file_name"])[0])
        if self.with_label:
            sample["label"] = self._semantic_label(anns, h, w, path)
        return sample

    def _semantic_label(self, anns, h: int, w: int, where: str) -> np.ndarray:
        """Objects painted largest first (smaller ones stay visible), crowd regions last, 255."""
        label = np.zeros((h, w), np.uint8)
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        objects = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"])
        for a in objects + crowd:
            value = 255 if a.get("iscrowd", 0) else self.category_map.get(a["category_id"], 255)
            label[_segmentation_mask(a["segmentation"], h, w, where)] = value
        return label
