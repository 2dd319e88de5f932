"""`bana prepare`: write a dataset as tfds array_record files that `data.source=tfds` reads.

    bana prepare --config=configs/voc/stage1.py --workdir=/shared/prepared --config.data.root=VOC
    bana stage1 --config=configs/voc/stage1.py --workdir=RUN \
        --config.data.source=tfds --config.data.prepared_dir=/shared/prepared

Clusters read a few large record files better than thousands of JPEGs on a shared file system.
The records hold what the folder reader gives (image file bytes, boxes, box classes, label map,
id; bana_jax.data.tfds_builders), in the folder reader's order, so every stage sees the same
samples at the same indices with either `data.source`. Every split the dataset has is written
(VOC: train_aug and val where their lists exist; COCO: train2017 and val2017 where their
annotations exist; synthetic: train and val). TensorFlow is not needed.

Which records `data.*` selects: `data.name` 'voc' (root), 'coco' (root, classes: one record set
per category set) or 'synthetic' (synthetic_images, synthetic_size and the model's class count:
one record set per setting). A second `bana prepare` into the same folder reuses what is there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from bana_jax import builders

log = logging.getLogger(__name__)

FORMAT = "array_record"  # the tfrecord writer would need TensorFlow


def prepare(config, out_dir: str | Path) -> dict[str, int]:
    """Writes the records of `config.data` under `out_dir`; returns {split: number of samples}."""
    import tensorflow_datasets as tfds  # heavy: only when writing records

    data = config.data
    if data.name in ("voc", "coco") and not data.root:
        raise ValueError(f"data.root is empty: set it to the {data.name} dataset folder to prepare")
    if data.name in ("voc", "coco") and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root={data.root!r} is not a folder")
    builder = builders.tfds_builder(config, out_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(data.root) if data.root else None),
        file_format=FORMAT)
    splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
    if not splits:
        raise FileNotFoundError(f"no split of {data.name} found under data.root={data.root!r}")
    return splits


def main(config, workdir) -> dict:
    """`bana prepare`: the records of `config.data` into WORKDIR (the later `data.prepared_dir`)."""
    workdir = Path(workdir)
    if jax.process_count() > 1 and jax.process_index() != 0:
        log.info("bana prepare runs on process 0 only; nothing to do here")
        return {}
    workdir.mkdir(parents=True, exist_ok=True)
    splits = prepare(config, workdir)
    for split, count in sorted(splits.items()):
        log.info("%s: %d samples", split, count)
    print(f"prepared {config.data.name} in {workdir}: "
          + ", ".join(f"{split} {count}" for split, count in sorted(splits.items()))
          + f"\nread it with --config.data.source=tfds --config.data.prepared_dir={workdir}")
    return splits
