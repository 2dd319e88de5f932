"""From a project config (bana_jax.train.config) to the objects a stage needs: data sources,
training batch iterators and models. The one place where config fields meet constructors."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from bana_jax.data import loader
from bana_jax.data.common import VOC_CLASSES

# The synthetic dataset's two splits are two seeds of the same generator.
SYNTHETIC_SEEDS = {"train": 0, "val": 1}

LABELER_BACKBONES = {"vgg16_labeler": "vgg16", "vgg_tiny": "tiny", "efficientnet_lite0_labeler": "efficientnet_lite0"}
DEEPLAB_ARCHS = {"deeplab_v1": "v1", "deeplab_v2": "v2", "vgg_tiny": "tiny", "efficientnet_lite0": "efficientnet_lite0"}


class _Subset:
    """The first `n` records of a source; `description` (default: the source's repr) names it."""

    def __init__(self, source, n: int, description: str | None = None):
        self.source, self.n = source, min(n, len(source))
        self.class_names = getattr(source, "class_names", None)
        self.description = description

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]

    def __repr__(self) -> str:
        # grain checks a resumed loader's source against the checkpoint by repr.
        return f"_Subset({self.description or repr(self.source)}, n={self.n})"


def data_source(config, split: str | None = None, *, pseudo_labels: str | Path | None = None):
    """Random-access source of raw samples (HELPERS.md layout) for `split` (default data.split).

    `pseudo_labels`: a stage-2 output folder; samples then also carry `y_crf` and `y_ret`.
    """
    data = config.data
    split = split or data.split
    if data.name == "synthetic":
        if split not in SYNTHETIC_SEEDS:
            raise ValueError(f"synthetic data has splits {sorted(SYNTHETIC_SEEDS)}, got split={split!r}")
        spec = dict(name="synthetic", num_images=data.synthetic_images or 200,
                    image_size=data.synthetic_size or 112, num_classes=synthetic_classes(config),
                    synthetic_seed=SYNTHETIC_SEEDS[split])
        source = loader.make_source(spec)
    elif data.name == "voc":
        source = loader.make_source(dict(name="voc", root=data.root, split=split))
    elif data.name == "coco":
        source = loader.make_source(dict(name="coco", root=data.root, split=split,
                                         category_set="voc20" if data.classes == "voc" else "all80"))
    elif data.name == "coco_subset":
        from bana_jax.data.coco import CocoSource

        if not data.images or not data.annotations:
            raise ValueError("data.name='coco_subset' needs --config.data.images=DIR and "
                             "--config.data.annotations=FILE")
        source = CocoSource(Path(data.images).parent, image_dir=data.images, annotation_file=data.annotations,
                            category_set="voc20" if data.classes == "voc" else "all80")
    else:
        raise ValueError(f"unknown data.name {data.name!r}")
    if data.max_images:
        source = _Subset(source, data.max_images)
    if pseudo_labels:
        root = Path(pseudo_labels)
        source = loader.WithPixelMaps(source, {"y_crf": str(root / "Y_crf"), "y_ret": str(root / "Y_ret")})
    return source


def synthetic_classes(config) -> int:
    """Object classes of the synthetic data: all the model has, up to the generator's six.

    A 21-way (VOC-sized) model on synthetic data sees objects of classes 1..6 only; its other
    class weights are trained as negatives.
    """
    from bana_jax.data.synthetic import MAX_CLASSES

    return max(1, min(config.model.num_classes - 1, MAX_CLASSES))


def class_names(config) -> tuple[str, ...]:
    """Names of class ids 0..model.num_classes - 1 (synthetic: unused ids are 'unused_<id>')."""
    if config.data.name == "synthetic":
        from bana_jax.data.synthetic import class_names as synthetic_names

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
    # grain refuses to resume unless repr(source) matches the checkpoint's; the VOC/COCO sources'
    # default reprs hold a memory address, so name the source by its config instead.
    description = (f"{data.name}:{data.split}:{data.root or data.images}:"
                   f"max_images={data.max_images}:pseudo_labels={data.pseudo_labels}")
    source = _Subset(source, len(source), description)
    return JsonStateIterator(loader.make_train_loader(
        source, batch_size=data.batch_size // jax.process_count(), crop_size=data.crop_size,
        max_boxes=data.max_boxes, seed=config.train.seed, worker_count=data.num_workers,
        aug=loader.transforms.AugmentConfig(crop_size=data.crop_size, scale_range=tuple(data.scale_range),
                                            flip_prob=0.5 if data.flip else 0.0, jitter=hi - 1)))


class JsonStateIterator:
    """A grain DataLoader's iterator whose position is a JSON object, not bytes.

    grain's `get_state()` returns JSON-encoded bytes; the train loop stores the position with
    orbax's JsonSave, which needs plain JSON values.
    """

    def __init__(self, data_loader):
        self._iterator = iter(data_loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        state = self._iterator.get_state()
        return json.loads(state.decode() if isinstance(state, bytes) else state)

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(json.dumps(state).encode())


def build_labeler(config):
    """The stage-1 network of `config.model` (random init; see init_weights)."""
    from bana_jax import models

    if config.model.name not in LABELER_BACKBONES:
        raise ValueError(f"model.name for stage 1 must be one of {sorted(LABELER_BACKBONES)}, got {config.model.name!r}")
    return models.build_labeler(dict(backbone=LABELER_BACKBONES[config.model.name], num_classes=config.model.num_classes,
                                     dtype=config.model.dtype, seed=config.train.seed,
                                     fc6_dilation=config.model.fc6_dilation, dropout_rate=config.model.dropout))


def build_deeplab(config):
    """The stage-3 network of `config.model` (random init; see init_weights)."""
    from bana_jax import models

    if config.model.name not in DEEPLAB_ARCHS:
        raise ValueError(f"model.name for stage 3 must be one of {sorted(DEEPLAB_ARCHS)}, got {config.model.name!r}")
    return models.build_deeplab(dict(arch=DEEPLAB_ARCHS[config.model.name], num_classes=config.model.num_classes,
                                     classifier=config.model.classifier, tau=config.loss.tau, dtype=config.model.dtype,
                                     seed=config.train.seed, fc6_dilation=config.model.fc6_dilation,
                                     dropout_rate=config.model.dropout, freeze_bn=config.model.freeze_bn))


def init_weights(model, config):
    """Loads the initial weights named by `config.model.init` into `model` (in place); returns it.

    'none' keeps the random init. Pretrained loaders ('hed_vgg16', 'imagenet', a weights file)
    are still to be wired here from the models package.
    """
    init = config.model.init
    if init in ("", "none"):
        return model
    raise NotImplementedError(
        f"model.init={init!r}: pretrained initialisation is not wired into builders.init_weights "
        "yet; use --config.model.init=none")
