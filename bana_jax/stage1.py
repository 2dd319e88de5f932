"""`bana stage1`: train the stage-1 classification network with Background-Aware Pooling.

    bana stage1 --config=configs/voc/stage1.py --workdir=runs/voc_stage1 [--config.a.b=v ...]

The labeler (`bana_jax.models.Labeler`) maps a batch of crops to features `(B, h, w, D)`; the
stage-1 loss (`bana_jax.bap.bap_loss`) pools one foreground vector per box and ROI window and one
background vector per valid grid cell and classifies them all with the labeler's dot-product
classifier. Training itself (sharded jit, SGD groups, checkpoints, resume, logs) is
`bana_jax.train.train_loop`.

What a finished run leaves in WORKDIR:
    config.json          the resolved config (train_loop)
    metrics.jsonl        step, loss, accuracies, lr, images/s, ETA
    checkpoints/<step>/  full train state + data position (resume; train_loop)
    train_done.json      written when train.num_steps is reached
    model/, model.json   the trained labeler for stage 2 (`bana_jax.artifacts`; model.json adds
                         "step", "pooling", "grid_size", "class_names")
    stage1_summary.json  final metrics and the classification accuracy on ground-truth boxes

Stage 2 loads the network with `artifacts.load_model(workdir, "labeler")` (eval mode).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bana_jax import artifacts, bap, builders, evaluate_cams, models, stage1_frozen
from bana_jax.data.common import DataError
from bana_jax.train import mesh as mesh_lib
from bana_jax.train.loop import TrainResult, configure_compilation_cache, train_loop

logger = logging.getLogger("bana_jax.stage1")

SUMMARY_JSON = "stage1_summary.json"

# Above this many bytes of ROI tensor `(B, K, h, w, D)` float32 the loss pools one image at a
# time (lax.map + remat) instead of the whole batch at once (VOC: 20 x 64 x 41 x 41 x 1024 x 4 B
# = 8.8 GB, so per image; the demo: 0.5 MB, all at once).
ROI_BYTES_LIMIT = 1 << 30

# Logged with the loss (all scalars from bap_loss's aux).
METRIC_KEYS = ("accuracy", "fg_accuracy", "bg_accuracy", "box_accuracy", "bap_fraction")


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def loss_options(config) -> dict[str, Any]:
    """bap_loss keywords from `config.loss`."""
    windows = int(config.loss.roi_windows)
    return dict(grid_size=int(config.loss.grid_size), pooling=str(config.loss.pooling),
                gap_fallback_bg_fraction=float(config.loss.gap_fallback_bg_fraction),
                roi_output=(windows, windows))


def pools_per_image(features_shape: tuple[int, ...], max_boxes: int) -> bool:
    """Whether the ROI tensor of a batch is too large to pool all images at once."""
    b, h, w, d = features_shape
    return b * max_boxes * h * w * d * 4 > ROI_BYTES_LIMIT


def combine_group_aux(aux: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Merges bap_loss results of G groups of images `(G,)` into the whole batch's.

    Every ratio is re-weighted by its group's count, so the result equals bap_loss on the whole
    batch (the loss is the mean over all foreground and background vectors of the batch).
    """
    def weighted(value, count):
        total = count.sum()
        return (value * count).sum() / jnp.maximum(total, 1.0), total

    vectors = aux["num_fg"] + aux["num_bg"]
    loss, _ = weighted(aux["loss"], vectors)
    out = {"loss": loss}
    out["accuracy"], _ = weighted(aux["accuracy"], vectors)
    out["fg_accuracy"], out["num_fg"] = weighted(aux["fg_accuracy"], aux["num_fg"])
    out["bg_accuracy"], out["num_bg"] = weighted(aux["bg_accuracy"], aux["num_bg"])
    out["box_accuracy"], out["num_boxes"] = weighted(aux["box_accuracy"], aux["num_boxes"])
    out["bap_fraction"] = aux["bap_fraction"].mean()
    return loss, out


def make_loss_fn(config, *, num_groups: int = 1, map_over_images: bool | None = None):
    """`loss_fn(model, batch, step) -> (loss, metrics)` of stage 1 for `train_loop`.

    Args:
      config: uses `loss.pooling`, `loss.grid_size`, `loss.gap_fallback_bg_fraction`,
        `loss.roi_windows`.
      num_groups: when pooling image by image, the batch is split into this many groups that are
        processed side by side (vmap) and each pooled image by image (lax.map): pass the number of
        devices, so every device walks through its own images rather than the whole batch.
      map_over_images: force (True) or forbid (False) pooling image by image; None decides from
        the ROI tensor's size (`ROI_BYTES_LIMIT`).
    """
    options = loss_options(config)

    def loss_fn(model, batch, step):
        del step
        # The BAP math runs in float32 whatever the network's compute dtype.
        features = model(batch["image"]).astype(jnp.float32)
        weight = model.classifier.weight
        inputs = (features, batch["bg_mask"], batch["boxes"], batch["box_labels"],
                  batch["box_valid"])
        per_image = (pools_per_image(features.shape, batch["boxes"].shape[1])
                     if map_over_images is None else map_over_images)
        if not per_image:
            loss, aux = bap.bap_loss(*inputs, weight, **options)
        else:
            groups = num_groups if features.shape[0] % num_groups == 0 else 1
            grouped = [x.reshape(groups, x.shape[0] // groups, *x.shape[1:]) for x in inputs]
            _, group_aux = jax.vmap(lambda *xs: bap.bap_loss(
                *xs, weight, map_over_images=True, **options))(*grouped)
            loss, aux = combine_group_aux(group_aux)
        return loss, {key: aux[key] for key in METRIC_KEYS}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def build_model(config) -> nnx.Module:
    """The labeler of `config.model` with its initial weights (`artifacts.init_weights`)."""
    return artifacts.init_weights(builders.build_labeler(config), config)


def export_labeler(model: nnx.Module, config, workdir: str | Path, step: int) -> Path:
    """Writes the trained labeler to `WORKDIR/model/` and `WORKDIR/model.json` (`artifacts`),
    with the step, pooling, grid size and class names. Every process takes part."""
    return artifacts.save_model(model, workdir, artifacts.model_config(
        config, "labeler", step=int(step), pooling=config.loss.pooling, grid_size=int(config.loss.grid_size),
        class_names=list(builders.class_names(config))))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def train(config, workdir: str | Path, *, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None, batches=None) -> TrainResult:
    """Builds labeler, parameter groups, batches and loss, and runs `train_loop`."""
    # Before the model is built: its init compiles too.
    configure_compilation_cache(config.train.compilation_cache, workdir)
    mesh = mesh_lib.mesh_for_batch(int(config.data.batch_size)) if mesh is None else mesh
    model = build_model(config)
    labels = models.param_group_labels(model)
    batches = builders.training_batches(config) if batches is None else batches
    loss_fn = make_loss_fn(config, num_groups=int(mesh.devices.size))
    return train_loop(config, workdir, model, loss_fn, batches, labels, mesh=mesh,
                      stop_after=stop_after)


def train_frozen(config, workdir: str | Path, *, mesh: jax.sharding.Mesh | None = None,
                 stop_after: int | None = None) -> tuple[TrainResult, nnx.Module, list]:
    """`model.freeze_backbone`: trains the classifier (and `model.trainable_blocks`) on cached
    views of the frozen backbone's output (`bana_jax.stage1_frozen`).

    Returns the train result and, when the run finished, the labeler with the trained weights and
    the training images' first views pooled (for the box accuracy; None otherwise).
    """
    configure_compilation_cache(config.train.compilation_cache, workdir)
    mesh = mesh_lib.mesh_for_batch(int(config.data.batch_size)) if mesh is None else mesh
    labeler = build_model(config)
    options = loss_options(config)
    views, sampler = stage1_frozen.training_views(config, labeler, workdir, options,
                                                  progress=bool(config.train.progress_bar))
    batches = stage1_frozen.ViewBatches(views, int(config.data.batch_size), int(config.train.seed), sampler)
    start_block = stage1_frozen.frozen_blocks(config, labeler.backbone)
    if start_block is None:
        def loss_fn(classifier, batch, step):
            del step
            loss, aux = bap.vector_loss(batch, batch["box_labels"], batch["box_valid"], classifier.weight)
            return loss, {key: aux[key] for key in METRIC_KEYS}

        trainable = labeler.classifier
    else:
        loss_fn = make_loss_fn(config, num_groups=int(mesh.devices.size))
        trainable = stage1_frozen.TailLabeler(labeler, start_block)
    result = train_loop(config, workdir, trainable, loss_fn, batches, models.param_group_labels(trainable),
                        mesh=mesh, stop_after=stop_after)
    if int(jax.device_get(result.state.step)) < int(config.train.num_steps):
        return result, labeler, None
    nnx.update(trainable, nnx.state(result.model()))  # into the labeler: the layers are shared
    tail = None if start_block is None else trainable
    return result, labeler, stage1_frozen.first_views_pooled(views, options, tail)


def main(config, workdir: str | Path, *, mesh: jax.sharding.Mesh | None = None,
         stop_after: int | None = None) -> dict:
    """`bana stage1`: trains (or resumes), exports the labeler, reports GT-box accuracy.

    `stop_after` ends the run early at that global step (with a checkpoint; no export), as when
    a job is cut off; a later call on the same workdir resumes it.
    """
    workdir = Path(workdir)
    if config.model.freeze_backbone:
        result, labeler, first_views = train_frozen(config, workdir, mesh=mesh, stop_after=stop_after)
    else:
        result = train(config, workdir, mesh=mesh, stop_after=stop_after)
    step = int(jax.device_get(result.state.step))
    summary: dict[str, Any] = {"step": step, "num_steps": int(config.train.num_steps),
                               "last_metrics": result.last_metrics}
    if step < config.train.num_steps:
        logger.info("stopped at step %d of %d; run again on %s to resume", step,
                    config.train.num_steps, workdir)
        return summary

    model = labeler if config.model.freeze_backbone else result.model()
    model.eval()
    export_labeler(model, config, workdir, step)
    logger.info("trained labeler written to %s", workdir / artifacts.MODEL_DIR)

    if config.model.freeze_backbone:  # on the training views
        split = "training images, first view"
        accuracy = stage1_frozen.box_accuracy(model.classifier.weight, first_views, int(config.model.num_classes))
    else:
        split = config.eval.split
        try:
            accuracy = evaluate_cams.box_accuracy(model, config, split, max_images=int(config.eval.max_images))
        except (OSError, DataError) as err:  # a missing evaluation split must not lose the run
            logger.warning("no box accuracy: split %r unreadable (%s)", split, err)
            accuracy = None
    if accuracy is not None and mesh_lib.is_main_process():  # every host computes it; one logs
        logger.info("classification accuracy on ground-truth boxes (%s, %d boxes, %s): %.2f%%\n%s",
                    split, accuracy["num_boxes"], config.loss.pooling, 100 * accuracy["accuracy"],
                    evaluate_cams.format_box_accuracy(accuracy, builders.class_names(config)))
    summary["box_accuracy"] = accuracy
    if mesh_lib.is_main_process():
        (workdir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(value):
    if isinstance(value, (np.generic, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
