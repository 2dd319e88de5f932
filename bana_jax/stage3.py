"""Stage 3: DeepLab trained on the stage-2 pseudo labels with the noise-aware loss (or a variant).

    bana stage3 --config=configs/voc/stage3_deeplab_v1.py --workdir=DIR \
        --config.data.pseudo_labels=STAGE2_WORKDIR/pseudo_labels

Inputs: `data.pseudo_labels` holds `Y_crf/<id>.png` and `Y_ret/<id>.png` for every training image.
They are augmented with the image (nearest resizing, crop, flip), padding is 255 in both, and the
reliable region S = {Y_crf == Y_ret} is built from the augmented maps inside the loss.

Workdir layout:
    model.json          the architecture (`bana_jax.artifacts`), written before training
    checkpoints/<step>  train state + data position (resumable, see bana_jax.train)
    metrics.jsonl       training scalars
    model/              final weights (`bana_jax.artifacts`), written at the last step
`load_trained_deeplab(workdir)` rebuilds the network from model.json and model/ (or a train
checkpoint); `bana evaluate` uses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from bana_jax import artifacts, builders
from bana_jax.losses import segmentation_loss
from bana_jax.models import DeepLab, param_group_labels
from bana_jax.train import TrainResult, train_loop
from bana_jax.train.mesh import mesh_for_batch

logger = logging.getLogger("bana_jax.stage3")

# config `loss.name` -> `losses.segmentation_loss(kind=...)`.
LOSS_KINDS = {"nal": "nal", "ce_s": "ce_reliable", "ce_crf": "ce_crf", "ce_ret": "ce_ret",
              "er": "entropy", "bs": "bootstrap"}
# Only these batch entries reach the device: the ground truth `label` and the boxes never do.
BATCH_KEYS = ("image", "y_crf", "y_ret")
MODEL_DIR = artifacts.MODEL_DIR
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


def save_trained_deeplab(model: nnx.Module, config, workdir) -> Path:
    """Writes the trained DeepLab to WORKDIR/model/ (`artifacts`). Every process takes part."""
    return artifacts.save_model(model, workdir, artifacts.model_config(config, "deeplab"))


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

    See `resolve_checkpoint` for `checkpoint`. The architecture comes from WORKDIR/model.json.
    """
    info = artifacts.model_info(workdir, "deeplab")
    path, kind = resolve_checkpoint(workdir, checkpoint)
    model = artifacts.build(info)
    artifacts.fill_variables(model, artifacts.restore(path / "state" if kind == "train" else path), str(path))
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
    model = artifacts.init_weights(builders.build_deeplab(config), config)
    artifacts.write_model_json(workdir, artifacts.model_config(config, "deeplab"))
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
