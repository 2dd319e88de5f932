"""Stage 3: DeepLab trained on the stage-2 pseudo labels with the noise-aware loss (or a variant).

    bana stage3 --config=configs/voc/stage3_deeplab_v1.py --workdir=DIR \
        --config.data.pseudo_labels=STAGE2_WORKDIR/pseudo_labels

Inputs: `data.pseudo_labels` holds `Y_crf/<id>.png` and `Y_ret/<id>.png` for every training image.
They are augmented with the image (nearest resizing, crop, flip), padding is 255 in both, and the
reliable region S = {Y_crf == Y_ret} is built from the augmented maps inside the loss.

Workdir layout:
    deeplab.json        the architecture (model.* fields, tau, seed), written before training
    checkpoints/<step>  train state + data position (resumable, see bana_jax.train)
    metrics.jsonl       training scalars
    model/              final weights (params + BatchNorm statistics), written at the last step
`load_trained_deeplab(workdir)` rebuilds the network from the last two; `bana evaluate` uses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from bana_jax import builders, io
from bana_jax.losses import segmentation_loss
from bana_jax.models import DeepLab, param_group_labels
from bana_jax.train import TrainResult, base_config, train_loop
from bana_jax.train.mesh import is_main_process, mesh_for_batch

logger = logging.getLogger("bana_jax.stage3")

# config `loss.name` -> `losses.segmentation_loss(kind=...)`.
LOSS_KINDS = {"nal": "nal", "ce_s": "ce_reliable", "ce_crf": "ce_crf", "ce_ret": "ce_ret",
              "er": "entropy", "bs": "bootstrap"}
# Only these batch entries reach the device: the ground truth `label` and the boxes never do.
BATCH_KEYS = ("image", "y_crf", "y_ret")
ARCH_FILE = "deeplab.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


class SelectKeys:
    """An iterator of batch dicts restricted to `keys`, forwarding get_state / set_state."""

    def __init__(self, iterator, keys):
        self.iterator, self.keys = iterator, tuple(keys)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.iterator)
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise KeyError(f"training batch lacks {missing} (has {sorted(batch)}); stage 3 needs "
                           "data.pseudo_labels with Y_crf/ and Y_ret/")
        return {k: batch[k] for k in self.keys}

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)


def make_loss_fn(config):
    """`loss_fn(model, batch, step) -> (loss, metrics)` for train_loop, from `config.loss`."""
    name = config.loss.name
    if name not in LOSS_KINDS:
        raise ValueError(f"loss.name must be one of {tuple(LOSS_KINDS)}, got {name!r}")
    classifier = config.model.classifier
    if name == "nal" and classifier != "cosine":
        raise ValueError("loss.name='nal' needs model.classifier='cosine' (sigma is defined from "
                         f"cosine distances), got model.classifier={classifier!r}")
    # Plain Python numbers: nothing from the ConfigDict is captured by the traced function.
    options = dict(kind=LOSS_KINDS[name], tau=float(config.loss.tau), lam=float(config.loss.weight),
                   gamma=float(config.loss.gamma), max_steps=int(config.train.num_steps),
                   classifier=classifier, detach_sigma=bool(config.loss.detach_sigma))

    def loss_fn(model, batch, step):
        _, scores = model(batch["image"])
        # `step` (updates applied so far) drives the bootstrapping beta: 1 at the first update.
        return segmentation_loss(scores.astype(jnp.float32), batch, step=step, **options)

    return loss_fn


def check_pseudo_labels(directory) -> Path:
    if not directory:
        raise ValueError("stage 3 needs data.pseudo_labels: the stage-2 output folder holding "
                         "Y_crf/ and Y_ret/ (--config.data.pseudo_labels=DIR)")
    root = Path(directory)
    for sub in ("Y_crf", "Y_ret"):
        if not (root / sub).is_dir():
            raise ValueError(f"data.pseudo_labels={str(directory)!r} has no {sub}/ folder "
                             "(expected the stage-2 output: Y_crf/<id>.png, Y_ret/<id>.png)")
    return root


# ----------------------------------------------------------------------------------------------
# The trained model on disk.


def _architecture(config) -> dict:
    return {"model": config.model.to_dict(), "tau": float(config.loss.tau),
            "seed": int(config.train.seed)}


def _config_from_architecture(arch: dict):
    config = base_config()
    config.model.update(arch["model"])
    config.loss.tau = float(arch["tau"])
    config.train.seed = int(arch["seed"])
    return config


def _split_model(model: nnx.Module):
    _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return params, model_state


def save_trained_deeplab(model: nnx.Module, config, workdir) -> Path:
    """Writes the architecture and `model`'s weights to WORKDIR/deeplab.json and WORKDIR/model/.

    Every process must call this (orbax coordinates the write); the main process writes the JSON.
    """
    workdir = Path(workdir).absolute()
    if is_main_process():
        io.write_json(workdir / ARCH_FILE, _architecture(config))
    params, model_state = _split_model(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(workdir / MODEL_DIR, {"params": params, "model_state": model_state},
                      force=True)
    checkpointer.wait_until_finished()
    return workdir / MODEL_DIR


def _path_key(path) -> tuple[str, ...]:
    """Names along a pytree path, as strings, without a Variable's `value` leaf name."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
    if names and names[-1] == "value":
        names.pop()
    return tuple(names)


def _fill(target, raw: dict, where: str):
    """`target` (an nnx.State) with its leaves replaced by the arrays of the raw dict `raw`."""
    raw_leaves = {_path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    out, missing = [], []
    for path, leaf in leaves:
        key = _path_key(path)
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
    return jax.tree_util.tree_unflatten(treedef, out)


def resolve_checkpoint(workdir, checkpoint: str = "") -> tuple[Path, str]:
    """(path, kind) of the weights to load: kind 'model' (a WORKDIR/model export) or 'train'
    (a train checkpoint step folder holding `state/`).

    checkpoint: '' -> WORKDIR/model, else the latest train checkpoint; an integer -> that step of
    WORKDIR/checkpoints; otherwise a path to either kind of folder.
    """
    workdir = Path(workdir).absolute()
    if not checkpoint:
        if (workdir / MODEL_DIR).is_dir():
            return workdir / MODEL_DIR, "model"
        steps = sorted(int(p.name) for p in (workdir / CHECKPOINT_DIR).glob("*") if p.name.isdigit())
        if not steps:
            raise FileNotFoundError(f"{workdir} holds neither a trained model ({MODEL_DIR}/) nor a "
                                    f"train checkpoint ({CHECKPOINT_DIR}/<step>/); run bana stage3 first")
        logger.warning("no final model in %s: using the train checkpoint of step %d", workdir, steps[-1])
        return workdir / CHECKPOINT_DIR / str(steps[-1]), "train"
    path = workdir / CHECKPOINT_DIR / checkpoint if checkpoint.isdigit() else Path(checkpoint).absolute()
    if (path / "state").is_dir():
        return path, "train"
    if path.is_dir():
        return path, "model"
    raise FileNotFoundError(f"eval.checkpoint={checkpoint!r}: {path} is not a model export or a "
                            "train checkpoint folder")


def load_trained_deeplab(workdir, checkpoint: str = "") -> DeepLab:
    """The DeepLab of a stage-3 workdir with its trained weights, in eval mode.

    See `resolve_checkpoint` for `checkpoint`. The architecture comes from WORKDIR/deeplab.json.
    """
    workdir = Path(workdir).absolute()
    arch_file = workdir / ARCH_FILE
    if not arch_file.is_file():
        raise FileNotFoundError(f"{arch_file} not found: {workdir} is not a stage-3 workdir")
    import json

    config = _config_from_architecture(json.loads(arch_file.read_text()))
    path, kind = resolve_checkpoint(workdir, checkpoint)
    with jax.threefry_partitionable(False):  # random init is overwritten; this compiles fast
        model = builders.build_deeplab(config)
    raw = ocp.StandardCheckpointer().restore(path / "state" if kind == "train" else path)
    params, model_state = _split_model(model)
    nnx.update(model, _fill(params, raw["params"], str(path)),
               _fill(model_state, raw.get("model_state", {}), str(path)))
    model.eval()
    logger.info("loaded %s weights from %s", kind, path)
    return model


# ----------------------------------------------------------------------------------------------
# Training.


def train(config, workdir, *, mesh=None, stop_after: int | None = None) -> TrainResult:
    """Builds the model and batches from `config` and runs (or resumes) the training loop.

    At the last step (`train.num_steps`) the weights are also exported to WORKDIR/model/.
    """
    pseudo_labels = check_pseudo_labels(config.data.pseudo_labels)
    loss_fn = make_loss_fn(config)
    workdir = Path(workdir)
    model = builders.init_weights(builders.build_deeplab(config), config)
    if is_main_process():
        io.write_json(workdir / ARCH_FILE, _architecture(config))
    source = builders.data_source(config, pseudo_labels=pseudo_labels)
    batches = SelectKeys(builders.training_batches(config, source), BATCH_KEYS)
    logger.info("stage 3: %s, loss %s, %d images from %s", config.model.name, config.loss.name,
                len(source), pseudo_labels)
    mesh = mesh_for_batch(int(config.data.batch_size)) if mesh is None else mesh
    result = train_loop(config, workdir, model, loss_fn, batches, param_group_labels(model),
                        mesh=mesh, stop_after=stop_after)
    if int(jax.device_get(result.state.step)) == int(config.train.num_steps):
        path = save_trained_deeplab(result.model(), config, workdir)
        logger.info("final model written to %s", path)
    return result


def main(config, workdir) -> int:
    train(config, workdir)
    return 0
