"""MS-COCO from an instances json: boxes, crowd handling, per-image semantic ground truth.

Classes (data.classes): "coco" (COCO categories in ascending id order -> 1..80) or "voc" (the 20 VOC
classes, `COCO_TO_VOC`; objects of other categories get no box and are 255 in the label map).
Crowd annotations never give a box and are 255 in the label map.

COCO boxes `[x, y, w, h]` are continuous (pixel j covers [j, j + 1)); as inclusive pixel indices
(common.py) they become `[x, y, x + w - 1, y + h - 1]`, then clipped to the image (a box under a
pixel wide or tall is dropped as empty, counted).

The json is read and checked when the source is built; every box is checked against the size its
image entry declares and counted (common.py, "Bad input"). Images are read when a sample is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np

from bana_jax.constants import VOC_CLASSES
from bana_jax.data.common import (BoxStats, DataError, load_or_skip, read_image,
                                  sanitize_boxes, skip_or_raise)

log = logging.getLogger(__name__)

# COCO category id -> VOC class index (the 20 VOC classes are COCO categories of the same names).
COCO_TO_VOC = {5: 1, 2: 2, 16: 3, 9: 4, 44: 5, 6: 6, 3: 7, 17: 8, 62: 9, 21: 10, 67: 11, 18: 12,
               19: 13, 4: 14, 1: 15, 64: 16, 20: 17, 63: 18, 7: 19, 72: 20}
CLASS_SETS = ("voc", "coco")


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
        if not isinstance(data[key], list):
            raise DataError(path, f"not a COCO instances file: {key!r} is not a list")
    return data


def _categories(data, path) -> dict:
    """Category id -> name. A broken category table leaves no annotation usable, so it always
    raises (skip_bad or not)."""
    names = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or "name" not in c:
            raise DataError(path, f"category entry #{i} needs an integer 'id' and a 'name'")
        names[c["id"]] = c["name"]
    return names


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_id(v) -> bool:
    """An id usable as a dict key (COCO's are integers; some tools write strings)."""
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _image_problem(im) -> str | None:
    """What is wrong with an `images` entry (None: nothing)."""
    if not isinstance(im, dict):
        return "is not an object"
    for key in ("id", "file_name", "height", "width"):
        if key not in im:
            return f"has no {key!r}"
    if not _is_id(im["id"]):
        return f"has a bad id {im['id']!r}"
    if not isinstance(im["file_name"], str) or not im["file_name"]:
        return f"has a bad file_name {im['file_name']!r}"
    if not (_is_int(im["height"]) and _is_int(im["width"]) and im["height"] > 0 and im["width"] > 0):
        return f"has a bad size {im['height']!r}x{im['width']!r} (expected positive integers)"
    return None


def _annotation_problem(a, categories: dict, images: dict, with_label: bool) -> str | None:
    """What is wrong with an `annotations` entry (None: nothing). `segmentation` and `area` are
    needed only for the label map."""
    if not isinstance(a, dict):
        return "is not an object"
    for key in ("image_id", "category_id", "bbox") + (("segmentation", "area") if with_label else ()):
        if key not in a:
            return f"has no {key!r}"
    if not _is_id(a["image_id"]) or a["image_id"] not in images:
        return f"refers to unknown image {a['image_id']!r}"
    if not _is_id(a["category_id"]) or a["category_id"] not in categories:
        return f"has unknown category {a['category_id']!r}"
    bbox = a["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
        return f"has a malformed bbox {bbox!r} (expected [x, y, width, height])"
    if with_label and not _is_number(a["area"]):
        return f"has a non-numeric area {a['area']!r}"
    return None


def _entry_name(kind: str, entry, index: int) -> str:
    """'image 7', 'annotation 12 (image 7)', or by position when the entry has no id."""
    if not isinstance(entry, dict):
        return f"{kind} entry #{index}"
    name = f"{kind} {entry['id']}" if "id" in entry else f"{kind} entry #{index}"
    if kind == "annotation" and "image_id" in entry:
        name += f" (image {entry['image_id']})"
    return name


def _inclusive_box(bbox) -> list:
    """COCO [x, y, w, h] (continuous) -> inclusive pixel indices (module docstring)."""
    x, y, w, h = bbox
    return [x, y, x + w - 1, y + h - 1]


def _segmentation_mask(segmentation, height: int, width: int, where: str, what: str) -> np.ndarray:
    """Polygon list, uncompressed RLE or compressed RLE -> bool (H, W); a bad one raises naming
    `where` (the json) and `what` (the annotation)."""
    from pycocotools import mask as mask_utils  # compiled extension: only for polygon / RLE masks

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
        raise DataError(where, f"{what} has a malformed segmentation ({e})") from None


class CocoSource:
    """Random-access COCO samples (raw sample dicts, see common.py).

    root/annotations/instances_{split}.json and root/{split}/<file_name>.
    require_boxes: keep only images with at least one box of `classes` (training).
    with_label: rasterise the semantic ground truth `label` (uint8, 255 = ignore).
    skip_bad: skip bad json entries (dropping their image) and unreadable images, logged,
    instead of raising.
    `audit`: the box counts and skipped samples found reading the json (logged once); `stats`:
    those of this process's loads (common.py, "Bad input").
    """

    def __init__(self, root, split: str = "train2017", classes: str = "voc",
                 require_boxes: bool = True, with_label: bool = True, skip_bad: bool = False,
                 convert_modes: bool = False, annotation_file=None, image_dir=None):
        if classes not in CLASS_SETS:
            raise ValueError(f"classes must be one of {CLASS_SETS}, got {classes!r}")
        self.root = os.fspath(root)
        self.annotation_file = os.fspath(annotation_file or os.path.join(
            self.root, "annotations", f"instances_{split}.json"))
        self.image_dir = os.fspath(image_dir or os.path.join(self.root, split))
        self.with_label, self.skip_bad, self.convert_modes = with_label, skip_bad, convert_modes
        self.audit, self.stats = BoxStats(), BoxStats()
        data = _load_json(self.annotation_file)
        if not os.path.isdir(self.image_dir):  # else every image would fail, one by one
            raise DataError(self.image_dir, f"no such folder (the images of {self.annotation_file})")
        names = _categories(data, self.annotation_file)
        cats = sorted(names)
        if classes == "voc":
            self.category_map = dict(COCO_TO_VOC)
            self.class_names = VOC_CLASSES
        else:
            self.category_map = {cid: i + 1 for i, cid in enumerate(cats)}
            self.class_names = ("background",) + tuple(names[c] for c in cats)
        self.images, self.anns = self._index(data, names)
        ids = sorted(self.images)
        if require_boxes:
            ids = [i for i in ids if any(self._is_box(a) for a in self.anns[i])]
        if not ids:
            raise DataError(self.annotation_file, f"no usable image: {len(self.images)} image entries"
                            + (f", none with a box of the {classes} classes" if require_boxes else ""))
        self.ids = ids
        self._audit_boxes()
        self.audit.log_summary(f"COCO {self.annotation_file} ({len(self.ids)} images):")
        if require_boxes and self.audit.kept == 0:
            raise DataError(self.annotation_file, (
                f"no usable box: all {self.audit.dropped_empty + self.audit.dropped_outside} dropped "
                f"({self.audit.dropped_empty} with zero area or not finite, "
                f"{self.audit.dropped_outside} outside their image)"))

    def _bad_entry(self, problem: str) -> None:
        skip_or_raise(DataError(self.annotation_file, problem), self.skip_bad, self.audit)

    def _index(self, data, categories: dict) -> tuple[dict, dict]:
        """Checked `images` (id -> entry) and their annotations (id -> list). A bad entry raises
        naming the json and the entry; with skip_bad it is logged and dropped, and so is the
        image of a bad annotation (its boxes and label map would miss an object) and an image
        listed twice (which entry is right is unknown)."""
        images, bad_images = {}, set()
        for i, im in enumerate(data["images"]):
            problem = _image_problem(im)
            if problem is None and im["id"] in images:
                problem = "is listed twice"
                bad_images.add(im["id"])
            if problem is not None:
                self._bad_entry(f"{_entry_name('image', im, i)} {problem}")
                continue
            images[im["id"]] = im
        anns = {i: [] for i in images}
        for j, a in enumerate(data["annotations"]):
            problem = _annotation_problem(a, categories, images, self.with_label)
            if problem is not None:
                self._bad_entry(f"{_entry_name('annotation', a, j)} {problem}")
                if isinstance(a, dict) and _is_id(a.get("image_id")) and a["image_id"] in images:
                    bad_images.add(a["image_id"])
                continue
            anns[a["image_id"]].append(a)
        for i in bad_images:
            del images[i], anns[i]
        return images, anns

    def _audit_boxes(self) -> None:
        """Check every box of the source against its image entry's size, at once, into `audit`
        (the size is the image's: a mismatch fails the load)."""
        rows = [(_inclusive_box(a["bbox"]), self.category_map[a["category_id"]],
                 self.images[i]["height"], self.images[i]["width"])
                for i in self.ids for a in self.anns[i] if self._is_box(a)]
        boxes, labels, heights, widths = zip(*rows) if rows else ([], [], [], [])
        sanitize_boxes(boxes, labels, np.asarray(heights), np.asarray(widths), self.audit)

    def _is_box(self, ann) -> bool:
        return not ann.get("iscrowd", 0) and ann["category_id"] in self.category_map

    def __len__(self) -> int:
        return len(self.ids)

    def box_labels(self, index: int) -> np.ndarray:
        """Class ids of the boxes of image `index`, from the annotations (no image read)."""
        return np.asarray([self.category_map[a["category_id"]] for a in self.anns[self.ids[index]]
                           if self._is_box(a)], np.int32)

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
                boxes.append(_inclusive_box(a["bbox"]))
                labels.append(self.category_map[a["category_id"]])
        boxes, labels = sanitize_boxes(boxes, labels, h, w, self.stats)
        sample = dict(image=image, boxes=boxes, box_labels=labels,
                      id=os.path.splitext(info["file_name"])[0])
        if self.with_label:
            sample["label"] = self._semantic_label(anns, h, w)
        return sample

    def _semantic_label(self, anns, h: int, w: int) -> np.ndarray:
        """Objects painted largest first (smaller ones stay visible), crowd regions last, 255."""
        label = np.zeros((h, w), np.uint8)
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        objects = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"])
        for a in objects + crowd:
            value = 255 if a.get("iscrowd", 0) else self.category_map.get(a["category_id"], 255)
            what = f"annotation {a.get('id', '?')} (image {a['image_id']})"
            label[_segmentation_mask(a["segmentation"], h, w, self.annotation_file, what)] = value
        return label
