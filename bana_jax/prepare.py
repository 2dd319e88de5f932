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

from bana_jax.builders import synthetic_settings
from bana_jax.constants import VOC_CLASSES
from bana_jax.data.synthetic import class_names

log = logging.getLogger(__name__)

FORMAT = "array_record"  # the tfrecord writer would need TensorFlow


def _builder(config, data_dir: str | Path):
    """The tfds builder of `config.data` over `data_dir` (nothing is read or written yet)."""
    from bana_jax.data import tfds_builders  # tensorflow_datasets: heavy, only here

    data = config.data
    if data.name == "voc":
        return tfds_builders.VocSbd(data_dir=str(data_dir))
    if data.name == "coco":
        return tfds_builders.CocoBoxes(data_dir=str(data_dir), config=tfds_builders.COCO_CONFIGS[data.classes])
    if data.name == "synthetic":
        s = synthetic_settings(config, "train")  # the val split's differ in the seed only
        return tfds_builders.SyntheticBoxes(data_dir=str(data_dir), config=tfds_builders.synthetic_builder_config(
            s.num_images, s.image_size, s.num_classes))
    raise ValueError(f"data.name={data.name!r} has no prepared records; 'voc', 'coco' and 'synthetic' do")


def _class_names(config, builder) -> tuple[str, ...]:
    data = config.data
    if data.name == "synthetic":
        return class_names(builder.builder_config.num_classes)
    if data.name == "coco" and data.classes == "coco":
        return tuple(builder.info.metadata["class_names"])
    return VOC_CLASSES


def prepare(config, out_dir: str | Path) -> dict[str, int]:
    """Writes the records of `config.data` under `out_dir`; returns {split: number of samples}."""
    import tensorflow_datasets as tfds  # heavy: only when writing records

    data = config.data
    if data.name in ("voc", "coco") and not data.root:
        raise ValueError(f"data.root is empty: set it to the {data.name} dataset folder to prepare")
    if data.name in ("voc", "coco") and not Path(data.root).is_dir():
        raise FileNotFoundError(f"data.root={data.root!r} is not a folder")
    builder = _builder(config, out_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(data.root) if data.root else None),
        file_format=FORMAT)
    splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
    if not splits:
        raise FileNotFoundError(f"no split of {data.name} found under data.root={data.root!r}")
    return splits


def prepared_source(config, split: str):
    """A `TfdsSource` of `split` from `data.prepared_dir` (random access, decoded as the folder
    reader decodes: the same sample dicts)."""
    from bana_jax.data.tfds_builders import TfdsSource  # tensorflow_datasets: heavy, only here

    data = config.data
    folder = data.prepared_dir
    builder = _builder(config, folder)
    hint = (f"run `bana prepare --config=... --workdir={folder}` with the same data.* settings "
            f"(data.name={data.name!r})")
    if not builder.is_prepared():
        raise FileNotFoundError(f"data.prepared_dir={folder!r} holds no prepared records for "
                                f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}: {hint}")
    if split not in builder.info.splits:
        raise ValueError(f"the prepared {builder.name} records in {folder!r} have splits "
                         f"{sorted(builder.info.splits)}, not {split!r}")
    return TfdsSource(builder.as_data_source(split=split), class_names=_class_names(config, builder),
                      convert_modes=bool(data.convert_modes))


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
