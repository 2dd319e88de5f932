"""PASCAL VOC 2012 + SBD (SegmentationClassAug), in the official code's layout.

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml                 boxes of all objects (difficult ones included)
    root/SegmentationClassAug/<id>.png        label map, palette or 8-bit; 255 = ignore
    root/ImageSets/Segmentation/<split>.txt   one id per line (train_aug, val, test)
    root/BgMaskfromBoxes/<id>.png             optional: 1 (or 255) outside every box

VOC XML boxes are 1-based inclusive pixel indices; they become 0-based inclusive (minus 1). When
`BgMaskfromBoxes/` is absent the background mask is computed from the boxes by the transforms.

The XML files are all read when the source is built (checked, boxes counted: common.py, "Bad
input"); images, label maps and masks when a sample is loaded.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from bana_jax.constants import VOC_CLASSES
from bana_jax.data.common import (BoxStats, DataError, load_or_skip, read_image,
                                  read_index_png, sanitize_boxes, skip_or_raise)

CLASS_INDEX = {name: i for i, name in enumerate(VOC_CLASSES)}


def read_id_list(path) -> list[str]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "image-id list not found")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DataError(path, "image-id list is empty")
    return ids


def parse_voc_xml(path) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Boxes (K, 4) 0-based inclusive, labels (K,) in 1..20, and (H, W) from <size> if given."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(path, f"malformed XML ({e})") from None
    boxes, labels = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in CLASS_INDEX or name == "background":
            raise DataError(path, f"unknown class name {name!r}; expected one of the 20 VOC "
                                  f"classes")
        bb = obj.find("bndbox")
        try:
            coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError):
            raise DataError(path, f"object {name!r} has a missing or non-numeric bndbox") from None
        boxes.append([c - 1 for c in coords])
        labels.append(CLASS_INDEX[name])
    size = None
    try:
        size = (int(root.findtext("size/height")), int(root.findtext("size/width")))
    except (TypeError, ValueError):
        pass
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32), size)


class VocSource:
    """Random-access VOC(+SBD) samples (raw sample dicts, see common.py).

    with_label: read `SegmentationClassAug/<id>.png` (must exist); skip_bad: log and skip bad
    samples instead of raising; convert_modes: convert RGBA/CMYK/16-bit images instead of failing.
    `audit`: the box counts and skipped samples found reading the XML files (logged once);
    `stats`: those of this process's loads (common.py, "Bad input").
    """

    def __init__(self, root, split: str = "train_aug", with_label: bool = True,
                 skip_bad: bool = False, convert_modes: bool = False,
                 label_dir: str = "SegmentationClassAug", bg_mask_dir: str = "BgMaskfromBoxes"):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DataError(self.root, "VOC root directory not found")
        id_list = os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")
        ids = read_id_list(id_list)
        self.with_label, self.skip_bad, self.convert_modes = with_label, skip_bad, convert_modes
        self.label_dir = os.path.join(self.root, label_dir)
        bg_dir = os.path.join(self.root, bg_mask_dir)
        self.bg_mask_dir = bg_dir if os.path.isdir(bg_dir) else None
        self.class_names = VOC_CLASSES
        self.audit, self.stats = BoxStats(), BoxStats()
        self.annotations = self._read_annotations(ids)
        self.ids = [i for i in ids if i in self.annotations]
        if not self.ids:
            raise DataError(id_list, f"no usable samples (all {len(ids)} skipped as bad)")
        self.audit.log_summary(f"VOC {self.root} {split} ({len(self.ids)} images):")

    def _xml_path(self, sid: str) -> str:
        return os.path.join(self.root, "Annotations", f"{sid}.xml")

    def _read_annotations(self, ids) -> dict:
        """id -> parse_voc_xml(...) for each id whose XML is good (a bad one raises, or with
        skip_bad is skipped); boxes checked against the XML's <size> into `audit`."""
        annotations = {}
        for sid in ids:
            try:
                parsed = parse_voc_xml(self._xml_path(sid))
            except DataError as e:
                skip_or_raise(e, self.skip_bad, self.audit)
                continue
            annotations[sid] = parsed
            boxes, labels, size = parsed
            if size is None or size == (0, 0):  # checked only when the image is read
                self.audit.unchecked += len(boxes)
            else:
                sanitize_boxes(boxes, labels, *size, self.audit)
        return annotations

    def __len__(self) -> int:
        return len(self.ids)

    def box_labels(self, index: int) -> np.ndarray:
        """Class ids of the boxes of image `index`, from its XML (no image read)."""
        return self.annotations[self.ids[index]][1]

    def __getitem__(self, index: int) -> dict:
        return load_or_skip(self._load, int(index), len(self), self.skip_bad, self.stats)

    def _load(self, index: int) -> dict:
        sid = self.ids[index]
        image = read_image(os.path.join(self.root, "JPEGImages", f"{sid}.jpg"), self.convert_modes)
        h, w = image.shape[:2]
        boxes, labels, size = self.annotations[sid]
        if size is not None and size != (h, w) and size != (0, 0):
            raise DataError(self._xml_path(sid),
                            f"<size> says {size[0]}x{size[1]} but the image is {h}x{w}")
        boxes, labels = sanitize_boxes(boxes, labels, h, w, self.stats)
        sample = dict(image=image, boxes=boxes, box_labels=labels, id=sid)
        if self.with_label:
            path = os.path.join(self.label_dir, f"{sid}.png")
            label = read_index_png(path)
            if label.shape != (h, w):
                raise DataError(path, f"label map is {label.shape} but the image is {(h, w)}")
            sample["label"] = label
        if self.bg_mask_dir is not None:
            path = os.path.join(self.bg_mask_dir, f"{sid}.png")
            if os.path.isfile(path):
                mask = read_index_png(path)
                if mask.shape != (h, w):
                    raise DataError(path, f"background mask is {mask.shape}, image {(h, w)}")
                if not np.isin(mask, (0, 1, 255)).all():
                    raise DataError(path, "background mask values must be 0/1 (or 0/255)")
                sample["bg_mask"] = (mask > 0).astype(np.uint8)
        return sample
