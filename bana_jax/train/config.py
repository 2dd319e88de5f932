"""Config schema, loading, command-line overrides, validation and shrinking.

Every config file (`configs/<dataset>/<stage>.py`) defines `get_config()` returning
`base_config()` with its values set; the base fixes the set of fields and their types, and the
returned ConfigDict is locked, so a misspelt or wrongly typed field fails at start, naming itself.

Field reference (groups)
------------------------
stage                     'stage1' | 'stage2' | 'stage3' | 'demo': what the file configures.

data.*  (input pipeline; sample and batch layout: bana_jax/data/common.py)
  name            'voc' | 'coco' | 'coco_subset' | 'synthetic'
  root            dataset root (VOC: folder with JPEGImages/, Annotations/, ...; COCO: year folder)
  split           training split ('train_aug' for VOC, 'train2017' for COCO)
  images          coco_subset: folder of images
  annotations     coco_subset: COCO instances json
  classes         'voc' (20 classes + background; COCO categories mapped to them) | 'coco' (80)
  pseudo_labels   stage 3: directory of stage-2 outputs (Y_crf, Y_ret PNGs)
  batch_size      global batch (split over all devices; divisible by the device count)
  crop_size       square training crop S (321)
  scale_range     random rescale factor U(lo, hi)
  flip            random horizontal flip p = 0.5
  color_jitter    brightness/contrast/saturation factors U(lo, hi); (1.0, 1.0) turns it off
  max_boxes       K_max: boxes per image after padding
  max_images      use only the first N images (0 = all)
  num_workers     data-loading worker threads/processes
  skip_bad        voc/coco: log and skip bad samples (unreadable image, broken annotation entry)
  convert_modes   voc/coco: convert RGBA, CMYK and 16-bit images to 8-bit RGB (default: an error
                  naming the file)
                  instead of stopping at the first (bana_jax.data.common, "Bad input")
  class_balanced  stage 1: draw each training image for a class drawn uniformly among the classes
                  with boxes (bana_jax.data.sampling) instead of drawing images uniformly
  view_sizes      stage 1 with model.freeze_backbone: each image is cached at these long sides,
                  padded square (and mirrored with data.flip); bana_jax.stage1_frozen
  synthetic_images, synthetic_size   synthetic dataset: number of images and their side
  source          'files': read the dataset's own files (folders, JSON) | 'tfds': read the records
                  `bana prepare` wrote (array_record through grain; voc, coco, synthetic): the same
                  samples in the same order, for clusters that read prepared records
  prepared_dir    data.source='tfds': the folder `bana prepare --workdir=DIR` wrote

model.*
  name            'vgg16_labeler' | 'deeplab_v1' | 'deeplab_v2' | 'vgg_tiny' |
                  'efficientnet_lite0_labeler' (see bana_jax.models)
  init            initial weights: 'hed_vgg16' | 'imagenet' | 'none' | path to a weights file |
                  a finished stage-1 workdir (stage 3: its labeler's backbone)
  init_head       stage 3 with init = a stage-1 workdir: the classifier starts from the
                  labeler's (same classes) instead of N(0, 0.01); the demo's from-scratch trunk
  num_classes     including background (21 for VOC)
  fc6_dilation    1 (stage 1) or 12 (DeepLab-LargeFOV)
  dropout         channel dropout rate after fc6 / fc7
  vgg_norm        VGG trunks (vgg16_labeler, deeplab_v1, vgg_tiny): 'none' (the official VGG) |
                  'batch' (BatchNorm after each conv of the five blocks, bana_jax.models.vgg;
                  the demo's from-scratch tiny trunk)
  classifier      'dot' | 'cosine' (stage 3 head)
  freeze_bn       stage 3 (ResNet-101, EfficientNet-Lite0): BatchNorm uses its running statistics
                  and does not update them; scale and bias still train (the official freeze_bn).
                  The stage-1 EfficientNet labeler always trains its BatchNorm.
  dtype           'float32' | 'bfloat16' (computation dtype)
  freeze_backbone stage 1: the backbone keeps its initial weights (model.init) and BatchNorm
                  statistics, its features are cached in WORKDIR/feature_cache and only the
                  classifier trains (bana_jax.stage1_frozen); data.view_sizes replaces the
                  random crops
  trainable_blocks  with freeze_backbone: the last N blocks of the backbone train too, on the
                  cached input of the first of them (EfficientNet-Lite0; 0 = classifier only)

optim.*  (SGD, PyTorch semantics: coupled L2, momentum; see bana_jax.train.optim)
  lr, momentum, nesterov
  schedule        'step' | 'poly' | 'constant'
  step_boundaries iterations at which the lr is multiplied by step_gamma
  step_gamma, poly_power
  groups.<name>.lr_mult, groups.<name>.weight_decay   for pretrained_weight, pretrained_bias,
                  new_weight, new_bias (labels from the model package)

train.*
  num_steps, seed, log_every, checkpoint_every (0: only at the end), keep_checkpoints
  compilation_cache  '' (off) | 'workdir' (WORKDIR/jax_cache) | a directory
  tensorboard     write TensorBoard events through tensorboardX (if installed)
  progress_bar    tqdm bar when stderr is a TTY

loss.*
  stage 1: pooling 'bap' | 'gap'; grid_size N (4); gap_fallback_bg_fraction (0.125);
           roi_windows (2: the official 2x2 ROI windows, 1: one window)
  stage 3: name 'nal' | 'ce_s' | 'ce_crf' | 'ce_ret' | 'er' | 'bs'; tau (20); gamma (7);
           weight lambda (0.1); detach_sigma (False = official code)

pseudo.*  (stage 2: pseudo-label generation)
  stage1_workdir  workdir of the stage-1 run whose latest checkpoint is used
  split           which split to label
  use_u0          background unary from attention (False: ablation "without u_0")
  output_dir      '' -> WORKDIR/pseudo_labels
  save_visualisations  colour overlays + index.html
  image_bucket    0: the backbone compiles per exact image size (official features); B > 0: images
                  padded to multiples of B pixels, one compilation per bucket (features change
                  near the padding; see bana_jax/stage2.py)
  baselines       learning-free labels scored beside Y_crf / Y_ret where there is ground truth:
                  any of 'box_fill', 'grabcut' (GrabCut costs about a second per box on a CPU);
                  () = none (default; the demo turns both on)
  box_convention  which pixels a box covers in stage 2: 'official' (the official code's: the VOC XML
                  values as 0-based half-open bounds after its float32 round trip, so a box loses
                  its first row and column; bana_jax.baselines.official_half_open_boxes) |
                  'pixels' (every pixel of the inclusive box)
  labeler         '' or an official PyTorch Labeler state dict (.pt/.pth, official key names,
                  e.g. from `bana export-torch`) to label with instead of pseudo.stage1_workdir

crf.*  (DenseCRF; stage 2 and evaluation)
  iterations, bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std

eval.*
  split, scales, flip, crf (apply the CRF), crf_uint8_quirk (official code's BGR->uint8 input),
  max_images (0 = all), save_predictions (palette PNGs), checkpoint ('' = latest in workdir),
  cam_split (evaluate-cams: split with ground truth), size_bucket (inputs padded to multiples of
  this many pixels, one compilation per bucket; 0 = every size unpadded, exact as the official
  code, one compilation per size; bana_jax.evaluate)
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Iterable

import ml_collections
from ml_collections import ConfigDict

GROUPS = ("pretrained_weight", "pretrained_bias", "new_weight", "new_bias")
STAGES = ("stage1", "stage2", "stage3", "demo")


def base_config() -> ConfigDict:
    """Every field with its type and a neutral default (values: BANA VOC stage 1)."""
    c = ConfigDict()
    c.stage = "stage1"
    c.data = ConfigDict(dict(
        name="voc", root="", split="train_aug", images="", annotations="", classes="voc",
        pseudo_labels="", batch_size=20, crop_size=321, scale_range=(0.5, 1.5), flip=True,
        color_jitter=(0.5, 1.5), max_boxes=64, max_images=0, num_workers=4,
        synthetic_images=0, synthetic_size=0, skip_bad=False, convert_modes=False, class_balanced=False,
        view_sizes=(321,), source="files", prepared_dir=""))
    c.model = ConfigDict(dict(
        name="vgg16_labeler", init="hed_vgg16", num_classes=21, fc6_dilation=1, dropout=0.5,
        classifier="dot", freeze_bn=True, dtype="float32", freeze_backbone=False,
        trainable_blocks=0, vgg_norm="none", init_head=False))
    c.optim = ConfigDict(dict(
        lr=1e-3, momentum=0.9, nesterov=False, schedule="step", step_boundaries=(5000,),
        step_gamma=0.1, poly_power=0.9))
    c.optim.groups = ConfigDict({
        "pretrained_weight": dict(lr_mult=1.0, weight_decay=5e-4),
        "pretrained_bias": dict(lr_mult=2.0, weight_decay=0.0),
        "new_weight": dict(lr_mult=10.0, weight_decay=5e-4),
        "new_bias": dict(lr_mult=20.0, weight_decay=0.0),
    })
    c.train = ConfigDict(dict(
        num_steps=8000, seed=0, log_every=20, checkpoint_every=1000, keep_checkpoints=3,
        compilation_cache="workdir", tensorboard=False, progress_bar=True))
    c.loss = ConfigDict(dict(
        pooling="bap", grid_size=4, gap_fallback_bg_fraction=0.125, roi_windows=2,
        name="nal", tau=20.0, gamma=7.0, weight=0.1, detach_sigma=False))
    c.pseudo = ConfigDict(dict(
        stage1_workdir="", split="train_aug", use_u0=True, output_dir="", save_visualisations=True, image_bucket=0,
        baselines=(), labeler="", box_convention="official"))
    c.crf = ConfigDict(dict(
        iterations=10, bi_w=4.0, bi_xy_std=55.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=3.0))
    c.eval = ConfigDict(dict(
        split="val", scales=(1.0, 0.5, 0.75, 1.5), flip=True, crf=True, crf_uint8_quirk=False,
        max_images=0, save_predictions=True, checkpoint="", cam_split="val", size_bucket=64))
    return c


# Allowed values of string fields.
CHOICES = {
    "stage": STAGES,
    "data.name": ("voc", "coco", "coco_subset", "synthetic"),
    "data.classes": ("voc", "coco"),
    "data.source": ("files", "tfds"),
    "model.classifier": ("dot", "cosine"),
    "model.dtype": ("float32", "bfloat16"),
    "model.vgg_norm": ("none", "batch"),
    "optim.schedule": ("step", "poly", "constant"),
    "loss.pooling": ("bap", "gap"),
    "loss.name": ("nal", "ce_s", "ce_crf", "ce_ret", "er", "bs"),
    "pseudo.box_convention": ("official", "pixels"),
}


class ConfigError(ValueError):
    """A config field is unknown, missing, of the wrong type or out of range."""


def _flatten(config: ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key in config.keys():
        value = config[key]
        name = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _type_ok(value: Any, reference: Any) -> bool:
    if isinstance(reference, bool):
        return isinstance(value, bool)
    if isinstance(reference, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(reference, str):
        return isinstance(value, str)
    if isinstance(reference, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            return False
        if reference:
            return all(_type_ok(v, reference[0]) for v in value)
        return True
    return type(value) is type(reference)


def _type_name(reference: Any) -> str:
    if isinstance(reference, (tuple, list)):
        inner = type(reference[0]).__name__ if reference else "any"
        return f"tuple of {inner}"
    return type(reference).__name__


PSEUDO_BASELINES = ("box_fill", "grabcut")


def _baseline_errors(values) -> list[str]:
    """`pseudo.baselines` problems: values that are not baseline names (with a suggestion), repeats."""
    errors = []
    for value in values:
        if not isinstance(value, str) or value not in PSEUDO_BASELINES:
            hint = _suggest(value, PSEUDO_BASELINES) if isinstance(value, str) else ""
            errors.append(f"field 'pseudo.baselines' = {tuple(values)!r}: unknown baseline {value!r}"
                          f"{hint} (expected any of {PSEUDO_BASELINES}; () or an empty value for none)")
    repeated = sorted({v for v in values if isinstance(v, str) and list(values).count(v) > 1})
    if repeated:
        errors.append(f"field 'pseudo.baselines' = {tuple(values)!r}: {repeated} given more than once")
    return errors


def validate_config(config: ConfigDict) -> ConfigDict:
    """Checks field names, types and ranges against `base_config()`; raises ConfigError.

    Returns the config (locked).
    """
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"a config must be an ml_collections.ConfigDict, got {type(config)}")
    reference = _flatten(base_config())
    # Parameter groups are free-form names in principle; the four official ones are required.
    given = _flatten(config)
    errors = []
    for name, value in given.items():
        if name not in reference:
            errors.append(f"unknown field {name!r}{_suggest(name, reference)}")
        elif not _type_ok(value, reference[name]):
            errors.append(f"field {name!r} = {value!r} has type {type(value).__name__}, "
                          f"expected {_type_name(reference[name])}")
    for name in reference:
        if name not in given:
            errors.append(f"missing field {name!r} (build configs from "
                          "bana_jax.train.config.base_config())")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    def check(condition: bool, name: str, expected: str) -> None:
        if not condition:
            errors.append(f"field {name!r} = {given[name]!r}: expected {expected}")

    for name, allowed in CHOICES.items():
        check(given[name] in allowed, name, f"one of {allowed}")
    for name in ("data.batch_size", "data.crop_size", "data.max_boxes", "model.num_classes",
                 "train.num_steps", "train.log_every", "train.keep_checkpoints",
                 "loss.grid_size", "crf.iterations", "model.fc6_dilation"):
        check(given[name] >= 1, name, "an integer >= 1")
    for name in ("data.max_images", "data.num_workers", "train.checkpoint_every", "eval.size_bucket",
                 "model.trainable_blocks",
                 "pseudo.image_bucket", "data.synthetic_images", "data.synthetic_size"):
        check(given[name] >= 0, name, "an integer >= 0")
    check(given["optim.lr"] > 0, "optim.lr", "> 0")
    # The CRF's checks would fail only at the first image (crf_ext.dense_crf has the same ones).
    # crf_ext bounds every lattice feature (pixel index or colour / std) by 1e6: a colour of 255
    # and images up to 10000 px wide stay inside it with these minima (float32 rounding included).
    for name, smallest in (("crf.bi_xy_std", 1e-2), ("crf.bi_rgb_std", 2.56e-4), ("crf.pos_xy_std", 1e-2)):
        check(math.isfinite(given[name]) and given[name] >= smallest, name,
              f"a finite number >= {smallest:g} (smaller ones overflow the CRF's lattice)")
    for name in ("crf.bi_w", "crf.pos_w"):
        check(math.isfinite(given[name]), name, "a finite number")
    check(0 <= given["optim.momentum"] < 1, "optim.momentum", "in [0, 1)")
    check(0 <= given["model.dropout"] < 1, "model.dropout", "in [0, 1)")
    check(given["loss.roi_windows"] in (1, 2), "loss.roi_windows", "1 or 2")
    errors.extend(_baseline_errors(given["pseudo.baselines"]))
    if given["data.source"] == "tfds":
        check(bool(given["data.prepared_dir"]), "data.prepared_dir",
              "the folder `bana prepare` wrote (data.source='tfds' reads it)")
        check(given["data.name"] in ("voc", "coco", "synthetic"), "data.name",
              "'voc', 'coco' or 'synthetic' with data.source='tfds' (prepared records)")
    check(len(given["data.view_sizes"]) >= 1 and all(s >= 8 for s in given["data.view_sizes"]),
          "data.view_sizes", "one or more image sizes >= 8")
    for name in ("data.scale_range", "data.color_jitter"):
        value = given[name]
        check(len(value) == 2 and 0 < value[0] <= value[1], name, "(lo, hi) with 0 < lo <= hi")
    boundaries = list(given["optim.step_boundaries"])
    check(boundaries == sorted(boundaries) and all(b > 0 for b in boundaries),
          "optim.step_boundaries", "increasing positive iterations")
    check(len(given["eval.scales"]) >= 1 and all(s > 0 for s in given["eval.scales"]),
          "eval.scales", "one or more positive scales")
    for group in GROUPS:
        check(given[f"optim.groups.{group}.lr_mult"] >= 0,
              f"optim.groups.{group}.lr_mult", ">= 0")
        check(given[f"optim.groups.{group}.weight_decay"] >= 0,
              f"optim.groups.{group}.weight_decay", ">= 0")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    config.lock()
    return config


# Fields a run may change when it resumes on a workdir: they do not change what is trained.
RESUME_SAFE_PREFIXES = ("train.num_steps", "train.log_every", "train.checkpoint_every",
                        "train.keep_checkpoints", "train.progress_bar", "train.tensorboard",
                        "train.compilation_cache", "data.num_workers", "pseudo.save_visualisations",
                        "eval.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def workdir_config_changes(config: ConfigDict, stored_json: str) -> list[str]:
    """`'field: stored -> new'` for every field that differs from a workdir's `config.json`
    (`stored_json`) and would change the result (not in RESUME_SAFE_PREFIXES). Fields the stored
    config lacks (written by an older version) are not compared."""
    stored = _flat(json.loads(stored_json))
    new = _flat(json.loads(config.to_json_best_effort()))
    return [f"{name}: {stored[name]!r} -> {value!r}" for name, value in sorted(new.items())
            if name in stored and stored[name] != value and not name.startswith(RESUME_SAFE_PREFIXES)]


def load_config(path: str | Path, arg: str | None = None) -> ConfigDict:
    """Imports `path` and returns its `get_config()` (or `get_config(arg)`), locked.

    `path` may carry the argument after a colon: `configs/voc/stage1.py:shrink`.
    """
    path = str(path)
    if arg is None and ":" in Path(path).name:
        path, arg = path.rsplit(":", 1)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"bana_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, "
                          "expected an ml_collections.ConfigDict")
    config.lock()
    return config


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_value(name: str, raw: str, current: Any) -> Any:
    """Converts the command-line string `raw` to the type of the field's current value."""
    def fail(expected: str):
        raise ConfigError(f"--config.{name}={raw!r}: expected {expected}")

    if isinstance(current, ConfigDict):
        fail(f"a field inside the group (one of {sorted(current.keys())})")
    if isinstance(current, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        fail("a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            fail("an integer")
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            fail("a number")
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(part.strip() for part in raw.strip("()[]").split(",") if part.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        if current:
            try:
                value = tuple(parse_value(name, str(v), current[0]) if isinstance(v, str)
                              and not isinstance(current[0], str) else v for v in value)
            except ConfigError:
                fail(f"a tuple of {type(current[0]).__name__}")
            if isinstance(current[0], float):
                value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool)
                              else v for v in value)
            if not all(_type_ok(v, current[0]) for v in value):
                fail(f"a tuple of {type(current[0]).__name__}")
        return tuple(value)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(config: ConfigDict, overrides: Iterable[tuple[str, str]]) -> ConfigDict:
    """Sets `field=value` pairs (dotted names, raw strings) on a copy of `config`."""
    config = copy.deepcopy(config)
    flat = _flatten(config)
    for name, raw in overrides:
        parts = name.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                prefix = ".".join(parts[:depth])
                where = f"in {prefix!r}" if prefix else "at the top level"
                siblings = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                raise ConfigError(
                    f"unknown config field {name!r}{_suggest(name, flat)} "
                    f"(fields {where}: {', '.join(siblings)})")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        value = parse_value(name, raw, current)
        try:
            node[parts[-1]] = value
        except (TypeError, AttributeError) as err:
            raise ConfigError(f"--config.{name}={raw!r}: {err}") from err
    return config


def shrink_config(config: ConfigDict) -> ConfigDict:
    """A copy sized for a quick local run: few steps, small batch and crop, few images."""
    config = copy.deepcopy(config)
    with config.unlocked():
        old_steps = config.train.num_steps
        steps = min(old_steps, 30)
        config.train.num_steps = steps
        config.optim.step_boundaries = tuple(
            max(1, b * steps // old_steps) for b in config.optim.step_boundaries)
        config.train.log_every = min(config.train.log_every, 5)
        config.train.checkpoint_every = min(config.train.checkpoint_every or steps, 10)
        config.data.batch_size = min(config.data.batch_size, 4)
        config.data.crop_size = min(config.data.crop_size, 129)
        config.data.max_images = min(config.data.max_images or 16, 16)
        config.data.num_workers = min(config.data.num_workers, 1)
        if config.data.synthetic_images:
            config.data.synthetic_images = min(config.data.synthetic_images, 16)
        config.eval.max_images = min(config.eval.max_images or 8, 8)
        config.eval.scales = (1.0,)
        config.eval.flip = False
        config.crf.iterations = min(config.crf.iterations, 5)
    return config


__all__ = ["ConfigError", "apply_overrides", "base_config", "load_config", "parse_value",
           "shrink_config", "validate_config", "ml_collections"]
