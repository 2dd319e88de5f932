"""The config schema, loading by path or name, command-line overrides, validation and shrinking.

Every config file (`configs/<dataset>/<stage>.py`, installed as `bana_jax/configs/`) defines
`get_config()` returning `base_config()` with its values set; the base fixes the set of fields and
their types, and the returned ConfigDict is locked, so a misspelt or wrongly typed field fails at
start, naming itself. Command-line overrides (`--config.GROUP.FIELD=VALUE`) are parsed by
`ml_collections.config_flags`.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags import config_path

# The repository's configs/: a link in a source checkout, a copy in an installed wheel.
CONFIGS = Path(__file__).with_name("configs")
GROUPS = ("pretrained_weight", "pretrained_bias", "new_weight", "new_bias")
PSEUDO_BASELINES = ("box_fill", "grabcut")


def base_config() -> ConfigDict:
    """Every field with its type and a neutral default (values: BANA VOC stage 1)."""
    c = ConfigDict()
    # Input pipeline; sample and batch layout: bana_jax/data/common.py.
    c.data = data = ConfigDict()
    data.name = "voc"              # 'voc' | 'coco' | 'coco_subset' | 'synthetic'
    data.root = ""                 # VOC: folder with JPEGImages/, Annotations/, ...; COCO: year folder
    data.split = "train_aug"       # training split ('train_aug' for VOC, 'train2017' for COCO)
    data.images = ""               # coco_subset: folder of images
    data.annotations = ""          # coco_subset: COCO instances json
    data.classes = "voc"           # 'voc' (20 + background; COCO categories mapped to them) | 'coco' (80)
    data.pseudo_labels = ""        # stage 3: directory of stage-2 outputs (Y_crf, Y_ret PNGs)
    data.batch_size = 20           # global batch (split over all devices; divisible by the device count)
    data.crop_size = 321           # square training crop S
    data.scale_range = (0.5, 1.5)  # random rescale factor U(lo, hi)
    data.flip = True               # random horizontal flip, p = 0.5
    # Brightness / contrast / saturation factors U(lo, hi); (1.0, 1.0) turns it off.
    data.color_jitter = (0.5, 1.5)
    data.max_boxes = 64            # K_max: boxes per image after padding
    data.max_images = 0            # use only the first N images (0 = all)
    data.num_workers = 4           # data-loading worker threads / processes
    data.synthetic_images = 0      # synthetic dataset: number of images
    data.synthetic_size = 0        # synthetic dataset: their side
    # voc / coco: log and skip bad samples (unreadable image, broken annotation entry) instead of
    # stopping at the first (bana_jax.data.common, "Bad input").
    data.skip_bad = False
    # voc / coco: convert RGBA, CMYK and 16-bit images to 8-bit RGB (default: an error naming the file).
    data.convert_modes = False
    # Stage 1: draw each training image for a class drawn uniformly among the classes with boxes
    # (bana_jax.data.sampling) instead of drawing images uniformly.
    data.class_balanced = False
    # Stage 1 with model.freeze_backbone: each image is cached at these long sides, padded square
    # (and mirrored with data.flip); bana_jax.stage1_frozen.
    data.view_sizes = (321,)
    # 'files': read the dataset's own files (folders, JSON) | 'tfds': read the records `bana prepare`
    # wrote (array_record through grain; voc, coco, synthetic): the same samples in the same order,
    # for clusters that read prepared records.
    data.source = "files"
    data.prepared_dir = ""         # data.source='tfds': the folder `bana prepare --workdir=DIR` wrote

    # The network (bana_jax.models).
    c.model = model = ConfigDict()
    # Stage 1: 'vgg16_labeler' | 'efficientnet_lite0_labeler' | 'vgg_tiny'; stage 3: 'deeplab_v1' |
    # 'deeplab_v2' | 'efficientnet_lite0' | 'vgg_tiny' (bana_jax.builders). Stage 2 labels with the
    # stage-1 run's network.
    model.name = "vgg16_labeler"
    # Initial weights: 'hed_vgg16' | 'imagenet' | 'none' | path to a weights file | a finished
    # stage-1 workdir (stage 3: its labeler's backbone).
    model.init = "hed_vgg16"
    model.num_classes = 21         # including background (21 for VOC); stage 2 scores with it
    model.fc6_dilation = 1         # 1 (stage 1) or 12 (DeepLab-LargeFOV)
    model.dropout = 0.5            # channel dropout rate after fc6 / fc7
    model.classifier = "dot"       # 'dot' | 'cosine' (stage 3 head)
    # Stage 3 (ResNet-101, EfficientNet-Lite0): BatchNorm uses its running statistics and does not
    # update them; scale and bias still train (the official freeze_bn). The stage-1 EfficientNet
    # labeler always trains its BatchNorm.
    model.freeze_bn = True
    model.dtype = "float32"        # computation dtype: 'float32' | 'bfloat16'
    # Stage 1: the backbone keeps its initial weights (model.init) and BatchNorm statistics, its
    # features are cached in WORKDIR/feature_cache and only the classifier trains
    # (bana_jax.stage1_frozen); data.view_sizes replaces the random crops.
    model.freeze_backbone = False
    # With freeze_backbone: the last N blocks of the backbone train too, on the cached input of the
    # first of them (EfficientNet-Lite0; 0 = classifier only).
    model.trainable_blocks = 0
    # VGG trunks (vgg16_labeler, deeplab_v1, vgg_tiny): 'none' (the official VGG) | 'batch'
    # (BatchNorm after each conv of the five blocks, bana_jax.models.vgg; the demo's from-scratch
    # tiny trunk).
    model.vgg_norm = "none"
    # Stage 3 with model.init = a stage-1 workdir: the classifier starts from the labeler's (same
    # classes) instead of N(0, 0.01); the demo's from-scratch trunk.
    model.init_head = False

    # SGD with PyTorch semantics (coupled L2, momentum); bana_jax.train.optim.
    c.optim = optim = ConfigDict()
    optim.lr = 1e-3
    optim.momentum = 0.9
    optim.nesterov = False
    optim.schedule = "step"        # 'step' | 'poly' | 'constant'
    optim.step_boundaries = (5000,)  # iterations at which the lr is multiplied by step_gamma
    optim.step_gamma = 0.1
    optim.poly_power = 0.9
    # Learning-rate multiplier and weight decay per parameter group (labels from the model package).
    optim.groups = ConfigDict({
        "pretrained_weight": dict(lr_mult=1.0, weight_decay=5e-4),
        "pretrained_bias": dict(lr_mult=2.0, weight_decay=0.0),
        "new_weight": dict(lr_mult=10.0, weight_decay=5e-4),
        "new_bias": dict(lr_mult=20.0, weight_decay=0.0),
    })

    # The training loop (stages 1 and 3; bana_jax.train.loop).
    c.train = train = ConfigDict()
    train.num_steps = 8000
    train.seed = 0
    train.log_every = 20
    train.checkpoint_every = 1000  # 0: only at the end
    train.keep_checkpoints = 3
    train.compilation_cache = "workdir"  # '' (off) | 'workdir' (WORKDIR/jax_cache) | a directory
    train.tensorboard = False      # write TensorBoard events through tensorboardX (if installed)
    train.progress_bar = True      # tqdm bar when stderr is a TTY

    c.loss = loss = ConfigDict()
    loss.pooling = "bap"           # stage 1: 'bap' | 'gap'
    loss.grid_size = 4             # stage 1: BAP's grid N
    loss.gap_fallback_bg_fraction = 0.125  # stage 1
    loss.roi_windows = 2           # stage 1: 2 (the official 2x2 ROI windows) | 1 (one window)
    loss.name = "nal"              # stage 3: 'nal' | 'ce_s' | 'ce_crf' | 'ce_ret' | 'er' | 'bs'
    loss.tau = 20.0                # stage 3: scale of the cosine classifier's scores
    loss.gamma = 7.0               # stage 3: NAL gamma
    loss.weight = 0.1              # stage 3: NAL lambda
    loss.detach_sigma = False      # stage 3 (False = official code)

    # Stage 2: pseudo-label generation.
    c.pseudo = pseudo = ConfigDict()
    pseudo.stage1_workdir = ""     # workdir of the stage-1 run whose latest checkpoint is used
    pseudo.split = "train_aug"     # which split to label
    pseudo.use_u0 = True           # background unary from attention (False: ablation "without u_0")
    pseudo.output_dir = ""         # '' -> WORKDIR/pseudo_labels
    pseudo.save_visualisations = True  # colour overlays + index.html
    # 0: the backbone compiles per exact image size (official features); B > 0: images padded to
    # multiples of B pixels, one compilation per bucket (features change near the padding; see
    # bana_jax/stage2.py).
    pseudo.image_bucket = 0
    # Learning-free labels scored beside Y_crf / Y_ret where there is ground truth: any of
    # PSEUDO_BASELINES (GrabCut costs about a second per box on a CPU); () = none (the demo turns
    # both on).
    pseudo.baselines = ()
    # '' or an official PyTorch Labeler state dict (.pt/.pth, official key names, e.g. from
    # `bana export-torch`) to label with instead of pseudo.stage1_workdir.
    pseudo.labeler = ""
    # Which pixels a box covers: 'official' (the official code's: the VOC XML values as 0-based
    # half-open bounds after its float32 round trip, so a box loses its first row and column;
    # bana_jax.baselines.official_half_open_boxes) | 'pixels' (every pixel of the inclusive box).
    pseudo.box_convention = "official"

    # DenseCRF (crf_ext.dense_crf) in stage 2 and evaluation.
    c.crf = crf = ConfigDict()
    crf.iterations = 10
    crf.bi_w = 4.0
    crf.bi_xy_std = 55.0
    crf.bi_rgb_std = 3.0
    crf.pos_w = 3.0
    crf.pos_xy_std = 3.0

    # Evaluation: bana_jax.evaluate, bana_jax.evaluate_cams, stage 1's closing box accuracy.
    c.eval = ev = ConfigDict()
    ev.split = "val"
    ev.scales = (1.0, 0.5, 0.75, 1.5)
    ev.flip = True
    ev.crf = True                  # apply the CRF
    ev.crf_uint8_quirk = False     # the official code's BGR -> uint8 CRF input
    ev.max_images = 0              # 0 = all
    ev.save_predictions = True     # palette PNGs
    ev.checkpoint = ""             # '' = latest in the workdir
    ev.cam_split = "val"           # evaluate-cams: split with ground truth
    # Inputs padded to multiples of this many pixels, one compilation per bucket; 0 = every size
    # unpadded, exact as the official code, one compilation per size (bana_jax.evaluate).
    ev.size_bucket = 64
    return c


# Allowed values of string fields.
CHOICES = {
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


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    """{'group.field': value} of a ConfigDict or a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, (dict, ConfigDict)):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
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
                          "bana_jax.config.base_config())")
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


# Stage 2 reads only these (its labeler comes from pseudo.stage1_workdir / pseudo.labeler), so a
# difference elsewhere (model.init, optim.*, data.split, ...) does not change its labels.
STAGE2_RESULT_PREFIXES = ("data.name", "data.root", "data.images", "data.annotations", "data.classes",
                          "data.max_images", "data.skip_bad", "data.convert_modes", "data.source",
                          "data.prepared_dir", "data.synthetic_images", "data.synthetic_size",
                          "model.num_classes", "pseudo.", "crf.")


def workdir_config_changes(config: ConfigDict, stored_json: str, command: str = "") -> list[str]:
    """`'field: stored -> new'` for every field that differs from a workdir's `config.json`
    (`stored_json`) and would change the result of `bana COMMAND` (not in RESUME_SAFE_PREFIXES;
    for stage 2, only STAGE2_RESULT_PREFIXES). Fields the stored config lacks (written by an older
    version) are not compared."""
    stored = _flatten(json.loads(stored_json))
    new = _flatten(json.loads(config.to_json_best_effort()))

    def changes_result(name: str) -> bool:
        if command == "stage2":
            return name.startswith(STAGE2_RESULT_PREFIXES) and not name.startswith(RESUME_SAFE_PREFIXES)
        return not name.startswith(RESUME_SAFE_PREFIXES)

    return [f"{name}: {stored[name]!r} -> {value!r}" for name, value in sorted(new.items())
            if name in stored and stored[name] != value and changes_result(name)]


def config_names() -> list[str]:
    """Names of the packaged configs, e.g. 'voc/stage1.py'."""
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*/*.py"))


def config_file(path_or_name: str | Path) -> Path:
    """The config file at `path_or_name`, or else the packaged config of that name ('voc/stage1.py',
    also 'configs/voc/stage1.py', as the README writes it)."""
    for file in (Path(path_or_name), CONFIGS / str(path_or_name).removeprefix("configs/")):
        if file.is_file():
            return file
    raise ConfigError(f"config file {str(path_or_name)!r} does not exist, nor is it the name of a "
                      f"packaged config ({', '.join(config_names())})")


def load_config(path: str | Path) -> ConfigDict:
    """Imports the config file `path` (a path or a packaged name, see `config_file`) and returns
    its `get_config()`, locked; `voc/stage1.py:ARG` returns `get_config(ARG)`."""
    path, arg = str(path), None
    if ":" in Path(path).name:
        path, arg = path.rsplit(":", 1)
    file = config_file(path)
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


def _check_field_name(config: ConfigDict, name: str) -> None:
    """ConfigError naming the closest fields unless `name` is a field or group of `config`."""
    node = config
    parts = name.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            prefix = ".".join(parts[:depth])
            where = f"in {prefix!r}" if prefix else "at the top level"
            siblings = sorted(node.keys()) if isinstance(node, ConfigDict) else []
            raise ConfigError(f"unknown config field {name!r}{_suggest(name, _flatten(config))} "
                              f"(fields {where}: {', '.join(siblings)})")
        node = node[part]


def _expected(value: Any) -> str:
    """What a command-line value for a field holding `value` must look like."""
    if isinstance(value, ConfigDict):
        return f"a field inside the group (one of {sorted(value.keys())})"
    for kind, text in ((bool, "a boolean (true/false)"), (int, "an integer"), (float, "a number")):
        if isinstance(value, kind):
            return text
    return f"a {_type_name(value)}"


def _completed_tuple(name: str, value: tuple, reference: tuple) -> tuple:
    """config_flags' tuple with our two shorthands, checked against the field's `reference` value:
    one unquoted string splits at commas ('box_fill,grabcut'; '' is ()), and a float tuple takes
    integers ('[1, 2]')."""
    if len(value) == 1 and isinstance(value[0], str):
        value = tuple(part.strip() for part in value[0].split(",") if part.strip())
    if reference and isinstance(reference[0], float):
        value = tuple(float(v) if type(v) is int else v for v in value)
    if reference and not all(_type_ok(v, reference[0]) for v in value):
        raise ConfigError(f"--config.{name}={value!r}: expected {_expected(reference)}")
    return value


def override(config: ConfigDict, args: Sequence[str]) -> ConfigDict:
    """A copy of `config` with the command-line overrides `args` applied by
    `ml_collections.config_flags`: `--config.GROUP.FIELD=VALUE` or `--config.GROUP.FIELD VALUE`,
    values parsed with the field's type. An unknown field, a value of the wrong type, a missing
    value or any other argument raises ConfigError naming it."""
    config = copy.deepcopy(config)
    reference = _flatten(config)
    for arg in args:
        if match := re.match(r"--?(?:no)?config\.([^=]*)", arg):
            _check_field_name(config, match[1])
    argv = ["bana", *args]
    flag_values = flags.FlagValues()  # a fresh one: each call parses its own arguments
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=argv)
        rest = flag_values(argv)[1:]
    except flags.IllegalFlagValueError as err:
        match = re.match(r"flag --config\.([^=]+)=(.*?): ", str(err), re.S)
        if not match:
            raise ConfigError(str(err)) from None
        name, raw = match.groups()
        raise ConfigError(f"--config.{name}={raw!r}: expected "
                          f"{_expected(config_path.get_value(name, config))}") from None
    except flags.UnrecognizedFlagError as err:
        raise ConfigError(f"unrecognized arguments: {err.flagvalue}") from None
    except flags.Error as err:
        if match := re.fullmatch(r"Missing value for flag (\S+)", str(err)):
            raise ConfigError(f"{match[1]} needs a value ({match[1]}=VALUE)") from None
        raise ConfigError(str(err)) from None
    if rest:
        raise ConfigError(f"unrecognized arguments: {' '.join(rest)}")
    for name, value in flag_values["config"].override_values.items():
        if isinstance(reference.get(name), tuple):
            config_path.set_value(name, config, _completed_tuple(name, value, reference[name]))
    return config


def apply_overrides(config: ConfigDict, overrides: Iterable[tuple[str, str]]) -> ConfigDict:
    """`override` with `(field, value)` pairs: what `--config.FIELD=VALUE` does on the command line.
    A field given twice takes the last value (config_flags would join a tuple field's values)."""
    return override(config, [f"--config.{name}={value}" for name, value in dict(overrides).items()])


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
