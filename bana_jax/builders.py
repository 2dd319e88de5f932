"""From a project config (bana_jax.config) to the objects a stage needs: data sources,
training batch iterators and models. The one place where config fields meet constructors."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from bana_jax import models
from bana_jax.constants import VOC_CLASSES
from bana_jax.data import loader, sampling, transforms
from bana_jax.data.coco import CocoSource
from bana_jax.data.synthetic import MAX_CLASSES, SPLIT_SEEDS, SyntheticConfig, SyntheticSource
from bana_jax.data.synthetic import class_names as synthetic_names
from bana_jax.data.voc import VocSource

LABELER_BACKBONES = {"vgg16_labeler": "vgg16", "vgg_tiny": "tiny", "efficientnet_lite0_labeler": "efficientnet_lite0"}
DEEPLAB_ARCHS = {"deeplab_v1": "v1", "deeplab_v2": "v2", "vgg_tiny": "tiny", "efficientnet_lite0": "efficientnet_lite0"}


class _Subset:
    """The first `n` records of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(n, len(source))
        self.class_names = getattr(source, "class_names", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]

    def box_labels(self, index: int):
        return sampling.box_labels_of(self.source, index)


class _NamedSource:
    """A source whose repr describes what it reads. grain stores `repr(data_source)` in the
    iterator state and refuses to restore into a source with another repr; the default repr
    (a memory address) would make every resume fail."""

    def __init__(self, source, description: str):
        self.source, self.description = source, description
        self.class_names = getattr(source, "class_names", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.source[index]

    def box_labels(self, index: int):
        return sampling.box_labels_of(self.source, index)

    def __repr__(self) -> str:
        return self.description


def synthetic_settings(config, split: str):
    """The generator settings (`synthetic.SyntheticConfig`) of `split` of the synthetic data."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"synthetic data has splits {sorted(SPLIT_SEEDS)}, got split={split!r}")
    return SyntheticConfig(num_images=config.data.synthetic_images or 200,
                           image_size=config.data.synthetic_size or 112,
                           num_classes=synthetic_classes(config), seed=SPLIT_SEEDS[split])


def tfds_builder(config, data_dir: str | Path):
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


def _tfds_class_names(config, builder) -> tuple[str, ...]:
    data = config.data
    if data.name == "synthetic":
        return synthetic_names(builder.builder_config.num_classes)
    if data.name == "coco" and data.classes == "coco":
        return tuple(builder.info.metadata["class_names"])
    return VOC_CLASSES


def _prepared_source(config, split: str):
    """A `TfdsSource` of `split` from `data.prepared_dir` (random access, decoded as the folder
    reader decodes: the same sample dicts)."""
    from bana_jax.data.tfds_builders import TfdsSource  # tensorflow_datasets: heavy, only here

    data = config.data
    folder = data.prepared_dir
    builder = tfds_builder(config, folder)
    hint = (f"run `bana prepare --config=... --workdir={folder}` with the same data.* settings "
            f"(data.name={data.name!r})")
    if not builder.is_prepared():
        raise FileNotFoundError(f"data.prepared_dir={folder!r} holds no prepared records for "
                                f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}: {hint}")
    if split not in builder.info.splits:
        raise ValueError(f"the prepared {builder.name} records in {folder!r} have splits "
                         f"{sorted(builder.info.splits)}, not {split!r}")
    return TfdsSource(builder.as_data_source(split=split), class_names=_tfds_class_names(config, builder),
                      convert_modes=bool(data.convert_modes))


def _reader(config, split: str):
    """The reader of all of `split` that data.source and data.name select (raw samples)."""
    data = config.data
    if data.source == "tfds":  # the records `bana prepare` wrote: the same samples, same order
        return _prepared_source(config, split)
    if data.name == "synthetic":
        return SyntheticSource(synthetic_settings(config, split))
    if data.name == "voc":
        return VocSource(data.root, split=split, skip_bad=data.skip_bad, convert_modes=data.convert_modes)
    if data.name not in ("coco", "coco_subset"):
        raise ValueError(f"unknown data.name {data.name!r}")

    options = dict(classes=data.classes, skip_bad=data.skip_bad, convert_modes=data.convert_modes)
    if data.name == "coco":
        return CocoSource(data.root, split=split, **options)
    if not data.images or not data.annotations:
        raise ValueError("data.name='coco_subset' needs --config.data.images=DIR and "
                         "--config.data.annotations=FILE")
    return CocoSource(Path(data.images).parent, image_dir=data.images, annotation_file=data.annotations, **options)


def data_source(config, split: str | None = None, *, pseudo_labels: str | Path | None = None,
                max_images: int | None = None):
    """Random-access source of raw samples (the layout of `data/common.py`) for `split` (default
    data.split): the one place data sources are made from a config.

    `pseudo_labels`: a stage-2 output folder; samples then also carry `y_crf` and `y_ret`.
    `max_images`: keep the first N records (0 = all); None = `data.max_images` (a training
    setting: evaluation passes 0 and applies `eval.max_images` itself).
    """
    data = config.data
    split = split or data.split
    source = _reader(config, split)
    max_images = data.max_images if max_images is None else max_images
    if max_images:
        source = _Subset(source, max_images)
    if pseudo_labels:
        root = Path(pseudo_labels)
        source = loader.WithPixelMaps(source, {"y_crf": str(root / "Y_crf"), "y_ret": str(root / "Y_ret")})
    description = dict(name=data.name, split=split, root=data.root, images=data.images,
                       annotations=data.annotations, classes=data.classes, max_images=max_images,
                       pseudo_labels=str(pseudo_labels or ""), size=len(source))
    if data.source == "tfds":
        description.update(source="tfds", prepared_dir=data.prepared_dir)
    elif data.name == "synthetic":
        # Spelt as an older data config spelt them: checkpoints hold this repr.
        settings = synthetic_settings(config, split)
        description.update(synthetic=dict(name="synthetic", num_images=settings.num_images,
                                          image_size=settings.image_size, num_classes=settings.num_classes,
                                          synthetic_seed=settings.seed))
    return _NamedSource(source, f"bana_source({json.dumps(description, sort_keys=True)})")


class _JsonStateIterator:
    """A grain DataLoader iterator whose get_state()/set_state() speak JSON-able dicts (grain
    encodes its state as JSON bytes, which the train checkpoint's JSON item cannot hold)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.iterator)

    def get_state(self) -> dict:
        return json.loads(self.iterator.get_state())

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(json.dumps(state).encode())


def synthetic_classes(config) -> int:
    """Object classes of the synthetic data: all the model has, up to the generator's six.

    A 21-way (VOC-sized) model on synthetic data sees objects of classes 1..6 only; its other
    class weights are trained as negatives.
    """
    return max(1, min(config.model.num_classes - 1, MAX_CLASSES))


def class_names(config) -> tuple[str, ...]:
    """Names of class ids 0..model.num_classes - 1 (synthetic: unused ids are 'unused_<id>')."""
    if config.data.name == "synthetic":
        names = synthetic_names(synthetic_classes(config))
        return names + tuple(f"unused_{i}" for i in range(len(names), config.model.num_classes))
    return VOC_CLASSES if config.data.classes == "voc" else tuple(data_source(config).class_names)


def training_batches(config, source=None):
    """Iterator of this host's training batches (global data.batch_size split over processes),
    with get_state()/set_state() for exact resumption."""
    data = config.data
    if data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={data.batch_size} must divide over {jax.process_count()} processes")
    lo, hi = data.color_jitter
    if abs((1 - lo) - (hi - 1)) > 1e-9:
        raise ValueError(f"data.color_jitter must be symmetric around 1, got {tuple(data.color_jitter)}")
    source = source if source is not None else data_source(config)
    sampler = None
    if data.class_balanced:
        sampler = sampling.ClassBalancedSampler(sampling.image_classes(source), config.train.seed)
    aug = transforms.AugmentConfig(crop_size=data.crop_size, scale_range=tuple(data.scale_range),
                                   flip_prob=0.5 if data.flip else 0.0, jitter=hi - 1)
    return _JsonStateIterator(iter(loader.make_train_loader(
        source, aug=aug, batch_size=data.batch_size // jax.process_count(), max_boxes=data.max_boxes,
        seed=config.train.seed, num_workers=data.num_workers, sampler=sampler)))


def build_labeler(config):
    """The stage-1 network of `config.model` (random init; `artifacts.init_weights` loads model.init)."""
    if config.model.name not in LABELER_BACKBONES:
        raise ValueError(f"model.name for stage 1 must be one of {sorted(LABELER_BACKBONES)}, got {config.model.name!r}")
    return models.build_labeler(dict(backbone=LABELER_BACKBONES[config.model.name], num_classes=config.model.num_classes,
                                     dtype=config.model.dtype, seed=config.train.seed,
                                     fc6_dilation=config.model.fc6_dilation, dropout_rate=config.model.dropout,
                                     vgg_norm=config.model.vgg_norm, freeze_bn=config.model.freeze_backbone))


def build_deeplab(config):
    """The stage-3 network of `config.model` (random init; `artifacts.init_weights` loads model.init)."""
    if config.model.name not in DEEPLAB_ARCHS:
        raise ValueError(f"model.name for stage 3 must be one of {sorted(DEEPLAB_ARCHS)}, got {config.model.name!r}")
    return models.build_deeplab(dict(arch=DEEPLAB_ARCHS[config.model.name], num_classes=config.model.num_classes,
                                     classifier=config.model.classifier, tau=config.loss.tau, dtype=config.model.dtype,
                                     seed=config.train.seed, fc6_dilation=config.model.fc6_dilation,
                                     dropout_rate=config.model.dropout, vgg_norm=config.model.vgg_norm,
                                     freeze_bn=config.model.freeze_bn))
