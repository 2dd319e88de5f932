"""tfds builders for VOC 2012 + SBD and MS-COCO from a local `manual_dir`, without TensorFlow.

Written as `array_record` (the tfrecord writer needs TensorFlow) and read back with
`builder.as_data_source()`, which grain consumes directly. Images are stored as their encoded file
bytes (decoded with PIL when read); label maps as uint8 index arrays (zlib), never as PNGs, since
with OpenCV installed tfds decodes palette PNGs to colours.

    builder = VocSbd(data_dir=..., config="default")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root),
                                 file_format="array_record")
    source = TfdsSource(builder.as_data_source(split="train_aug"))   # raw sample dicts
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from bana_jax.constants import VOC_CLASSES
from bana_jax.data.coco import CocoSource
from bana_jax.data.common import decode_image
from bana_jax.data.synthetic import SPLIT_SEEDS, SyntheticConfig, SyntheticSource
from bana_jax.data.voc import VocSource


def _features(with_label: bool = True):
    feats = dict(
        image_bytes=tfds.features.Tensor(shape=(), dtype=np.object_),
        boxes=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        box_labels=tfds.features.Tensor(shape=(None,), dtype=np.int32),
        id=tfds.features.Text(),
    )
    if with_label:
        feats["label"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")
    return tfds.features.FeaturesDict(feats)


def _example(sample: dict, image_path: str) -> dict:
    with open(image_path, "rb") as f:
        data = f.read()
    ex = dict(image_bytes=data, boxes=sample["boxes"], box_labels=sample["box_labels"],
              id=sample["id"])
    if "label" in sample:
        ex["label"] = sample["label"]
    return ex


class VocSbd(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 + SBD (the layout of `voc.py`) from manual_dir."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place the VOC 2012 + SBD tree (JPEGImages/, Annotations/, "
                                    "SegmentationClassAug/, ImageSets/Segmentation/) in manual_dir.")
    SPLITS = ("train_aug", "val")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                     description="PASCAL VOC 2012 + SBD, boxes and labels.")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        lists = os.path.join(root, "ImageSets", "Segmentation")
        return {s: self._generate_examples(root, s) for s in self.SPLITS
                if os.path.isfile(os.path.join(lists, f"{s}.txt"))}

    def _generate_examples(self, root, split):
        source = VocSource(root, split=split)
        for i in range(len(source)):
            sample = source[i]
            yield sample["id"], _example(sample, os.path.join(root, "JPEGImages",
                                                              f"{sample['id']}.jpg"))


# data.classes -> the CocoBoxes config (the name of the records' folder).
COCO_CONFIGS = {"voc": "voc20", "coco": "all80"}


class CocoBoxes(tfds.core.GeneratorBasedBuilder):
    """MS-COCO 2017 boxes and semantic labels (classes from the config name, `COCO_CONFIGS`) from
    manual_dir (annotations/instances_<split>.json and <split>/)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in COCO_CONFIGS.values()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place COCO 2017 (annotations/, train2017/, val2017/) in manual_dir."
    SPLITS = ("train2017", "val2017")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict(),
                                     description="MS-COCO 2017 boxes and semantic labels.")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = [s for s in self.SPLITS
                  if os.path.isfile(os.path.join(root, "annotations", f"instances_{s}.json"))]
        if splits:  # the names of the class ids, kept with the records (metadata.json)
            names = CocoSource(root, split=splits[0], classes=self._classes()).class_names
            self.info.metadata["class_names"] = list(names)
        return {s: self._generate_examples(root, s) for s in splits}

    def _classes(self) -> str:
        return {name: classes for classes, name in COCO_CONFIGS.items()}[self.builder_config.name]

    def _generate_examples(self, root, split):
        source = CocoSource(root, split=split, classes=self._classes())
        for i in range(len(source)):
            sample = source[i]
            info = source.images[source.ids[i]]
            yield sample["id"], _example(sample, os.path.join(source.image_dir, info["file_name"]))


@dataclasses.dataclass
class SyntheticBuilderConfig(tfds.core.BuilderConfig):
    """The generator's settings; the config name spells them (one folder per setting)."""

    num_images: int = 200
    image_size: int = 112
    num_classes: int = 4


def synthetic_builder_config(num_images: int, image_size: int, num_classes: int) -> SyntheticBuilderConfig:
    return SyntheticBuilderConfig(name=f"n{num_images}_s{image_size}_c{num_classes}", num_images=num_images,
                                  image_size=image_size, num_classes=num_classes)


class SyntheticBoxes(tfds.core.GeneratorBasedBuilder):
    """The embedded synthetic dataset (bana_jax.data.synthetic), images as PNG bytes (lossless:
    they decode to the generator's pixels). Splits train / val are the generator's seeds 0 / 1."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [synthetic_builder_config(200, 112, 4)]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=_features(), disable_shuffling=True,
                                     description="bana_jax synthetic box-supervision scenes.")

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to read
        return {split: self._generate_examples(seed) for split, seed in SPLIT_SEEDS.items()}

    def _generate_examples(self, seed):

        cfg = self.builder_config
        source = SyntheticSource(SyntheticConfig(num_images=cfg.num_images, image_size=cfg.image_size,
                                                 num_classes=cfg.num_classes, seed=seed))
        for i in range(len(source)):
            sample = source[i]
            buffer = io.BytesIO()
            Image.fromarray(sample["image"]).save(buffer, format="PNG")
            yield sample["id"], dict(image_bytes=buffer.getvalue(), boxes=sample["boxes"],
                                     box_labels=sample["box_labels"], id=sample["id"],
                                     label=sample["label"])


class TfdsSource:
    """Raw sample dicts from a tfds data source written by the builders above."""

    def __init__(self, data_source, class_names=VOC_CLASSES, convert_modes: bool = False):
        self.data_source, self.class_names, self.convert_modes = data_source, class_names, convert_modes

    def __len__(self) -> int:
        return len(self.data_source)

    def box_labels(self, index: int) -> np.ndarray:
        """Box classes of record `index` (class-balanced sampling), without decoding the image."""
        return np.asarray(self.data_source[int(index)]["box_labels"], np.int32)

    def __getitem__(self, index: int) -> dict:
        ex = self.data_source[int(index)]
        sid = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
        image = decode_image(io.BytesIO(ex["image_bytes"]), sid, self.convert_modes)
        out = dict(image=image, boxes=np.asarray(ex["boxes"], np.float32).reshape(-1, 4),
                   box_labels=np.asarray(ex["box_labels"], np.int32), id=sid)
        if "label" in ex:
            out["label"] = np.asarray(ex["label"], np.uint8)
        return out
