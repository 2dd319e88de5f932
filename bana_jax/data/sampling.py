"""Class-balanced sampling of training images (`data.class_balanced`).

COCO-like sets are dominated by a few classes (a third of COCO's boxes are *person*), and a
labeler trained on uniformly drawn images learns those first. Here record i of the sample stream
draws a class uniformly among the classes that have boxes, then an image holding that class
uniformly: every class is the drawn class of about the same number of records (other boxes of the
drawn image come along).

`ClassBalancedSampler` follows grain's sampler protocol (index -> `RecordMetadata`), so the data
loader's sharding, workers and checkpointed position work as with grain's own `IndexSampler`; the
frozen-backbone stage 1 draws its views from the same sampler.
"""

from __future__ import annotations

import sys
from typing import Sequence

import grain.python as grain
import numpy as np


def box_labels_of(source, index: int) -> np.ndarray:
    """Box classes of image `index`: `source.box_labels(index)` (read from the annotations, no
    image decoding) where the source has it, else from its sample."""
    labels_of = getattr(source, "box_labels", None)
    return np.asarray(labels_of(index) if labels_of is not None else source[index]["box_labels"])


def image_classes(source) -> list[np.ndarray]:
    """The distinct box classes of every image of `source`, ascending, one int array per image."""
    return [np.unique(box_labels_of(source, i).astype(np.int64)) for i in range(len(source))]


class ClassBalancedSampler:
    """grain sampler: record i holds an image of a class drawn uniformly (see the module docstring).

    Args:
      classes_per_image: the box classes of each image (`image_classes(source)`); images without a
        box are never drawn.
      seed: the draws of record i depend only on `seed` and i (not on workers or hosts).
    `drawn_class(i)` is the class record i was drawn for.
    """

    def __init__(self, classes_per_image: Sequence[Sequence[int]], seed: int):
        by_class: dict[int, list[int]] = {}
        for image, classes in enumerate(classes_per_image):
            for cls in np.unique(np.asarray(classes, np.int64)):
                by_class.setdefault(int(cls), []).append(image)
        if not by_class:
            raise ValueError("class-balanced sampling needs at least one image with a box; the "
                             f"{len(classes_per_image)} images have none")
        self.classes = np.array(sorted(by_class), np.int64)
        self._images = [np.array(by_class[c], np.int64) for c in self.classes]
        self.seed = int(seed)

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        sizes = ",".join(f"{c}:{len(i)}" for c, i in zip(self.classes, self._images))
        return f"ClassBalancedSampler(seed={self.seed}, images_per_class={{{sizes}}})"

    def _draw(self, index: int) -> tuple[int, int]:
        # A stream of its own per record (Philox key: seed, index), apart from the record's
        # augmentation stream below.
        rng = np.random.Generator(np.random.Philox(key=[self.seed, index]))
        k = int(rng.integers(len(self.classes)))
        return int(self.classes[k]), int(self._images[k][rng.integers(len(self._images[k]))])

    def drawn_class(self, index: int) -> int:
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"record index must be >= 0, got {index}")
        _, image = self._draw(index)
        return grain.RecordMetadata(index=index, record_key=image,
                                    rng=np.random.Generator(np.random.Philox(key=self.seed + index)))
