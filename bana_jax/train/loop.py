"""The generic training loop shared by stage 1 (BAP classifier) and stage 3 (DeepLab + NAL).

    train_loop(config, workdir, model, loss_fn, batch_iterator, param_labels)

- `model`: a Flax NNX module (initialised, pretrained weights loaded); it is split into a
  functional `TrainState` (see `state.py`).
- `loss_fn(model, batch, step) -> (loss, {name: scalar})`, `batch` a dict of global arrays
  sharded over "data" (the batch layout of `bana_jax/data/common.py`), `step` the int32 iteration.
- `batch_iterator`: yields this process's slice of each batch (dict of NumPy arrays, leading axis
  `data.batch_size / process_count`); if it has `get_state()` / `set_state(dict)` (like grain's
  DatasetIterator), its position is checkpointed and restored.
- `param_labels`: group names laid out like the parameters (or a callable), see `optim.py`.

A workdir holding a checkpoint resumes from the latest one, data position included.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from bana_jax import io as bio
from bana_jax.train import mesh as mesh_lib
from bana_jax.train.checkpoint import Checkpointer, abstract_like
from bana_jax.train.metrics_log import MetricLogger
from bana_jax.train.optim import check_labels, make_optimizer
from bana_jax.train.state import (LossFn, TrainState, create_train_state, jit_train_step,
                                  label_tree, make_train_step, merge_model)

logger = logging.getLogger("bana_jax.train")


def configure_compilation_cache(setting: str, workdir: str | Path) -> str | None:
    """Turns on JAX's persistent compilation cache.

    `setting`: "" -> off; "workdir" -> `WORKDIR/jax_cache`; anything else is a directory.
    Returns the directory used (or None).
    """
    if not setting:
        return None
    path = Path(workdir) / "jax_cache" if setting == "workdir" else Path(setting).expanduser()
    try:
        bio.check_writable(path)
    except OSError as err:  # the cache only saves compile time: run without it
        logger.warning("compilation cache off: cannot write to %s (%s)", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)


@dataclasses.dataclass
class TrainResult:
    state: TrainState            # final state (replicated global arrays)
    graphdef: Any
    rng_template: Any
    last_metrics: dict           # the last logged record
    resumed_from: int | None     # checkpoint step the run started from, if any

    def model(self) -> nnx.Module:
        """The trained NNX model (train mode; call `.eval()` for inference)."""
        return merge_model(self.graphdef, self.rng_template, self.state)


def _batch_images(batch: dict) -> int:
    leaf = jax.tree.leaves(batch)[0]
    return int(np.shape(leaf)[0])


def train_loop(config, workdir: str | Path, model: nnx.Module, loss_fn: LossFn,
               batch_iterator: Iterator[dict], param_labels: Any, *,
               mesh: jax.sharding.Mesh | None = None,
               stop_after: int | None = None) -> TrainResult:
    """Trains `model` for `config.train.num_steps` iterations (resuming if possible).

    Args:
      config: ConfigDict with the `train`, `optim` and `data.batch_size` fields.
      workdir: run directory: `checkpoints/`, `metrics.jsonl`, `config.json`, `tensorboard/`.
      stop_after: stop (with a checkpoint) once this global step is reached, e.g. to split a run
        into pieces; None runs to `train.num_steps`.
    """
    workdir = Path(workdir)
    train_cfg = config.train
    num_steps = int(train_cfg.num_steps)
    end_step = num_steps if stop_after is None else min(num_steps, int(stop_after))
    main = mesh_lib.is_main_process()
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        bio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    configure_compilation_cache(train_cfg.compilation_cache, workdir)

    mesh = mesh_lib.make_data_mesh() if mesh is None else mesh
    local_batch = mesh_lib.check_batch_size(int(config.data.batch_size), mesh)

    # Optimizer over the parameter groups.
    params = nnx.state(model, nnx.Param)
    labels = label_tree(params, param_labels)
    check_labels(labels, params, tuple(config.optim.groups.keys()))
    tx, schedule = make_optimizer(config.optim, num_steps, labels)
    graphdef, rng_template, state = create_train_state(model, tx, int(train_cfg.seed))
    state = mesh_lib.replicate(state, mesh)

    checkpointer = Checkpointer(workdir / "checkpoints", int(train_cfg.keep_checkpoints))
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, data_state = checkpointer.restore(resumed_from, abstract_like(state))
        if data_state is not None:
            if not hasattr(batch_iterator, "set_state"):
                raise ValueError("the checkpoint holds a data position but the batch iterator "
                                 "has no set_state()")
            batch_iterator.set_state(data_state)
        logger.info("resumed from %s at step %d", checkpointer.directory, resumed_from)
    step = int(jax.device_get(state.step))

    step_fn = jit_train_step(make_train_step(graphdef, rng_template, tx, loss_fn), mesh)
    metric_logger = MetricLogger(workdir, num_steps, step, enabled=main,
                                 tensorboard=bool(train_cfg.tensorboard),
                                 progress_bar=bool(train_cfg.progress_bar))
    log_every = max(1, int(train_cfg.log_every))
    checkpoint_every = int(train_cfg.checkpoint_every)
    pending: list[dict] = []
    images_since_log = 0
    record: dict = {}
    has_state = hasattr(batch_iterator, "get_state")

    def save(at_step: int) -> None:
        data_state = batch_iterator.get_state() if has_state else None
        checkpointer.save(at_step, state, data_state)

    try:
        while step < end_step:
            local = next(batch_iterator)
            if _batch_images(local) != local_batch:
                raise ValueError(
                    f"batch iterator gave {_batch_images(local)} images; expected the per-process"
                    f" batch data.batch_size / process_count = {local_batch}")
            batch = mesh_lib.shard_batch(local, mesh)
            state, metrics = step_fn(state, batch)
            checkpointer.check_for_errors()  # a failed background save stops the run now
            step += 1
            pending.append(metrics)
            images_since_log += local_batch * jax.process_count()
            if step % log_every == 0 or step == end_step:
                means = {k: float(np.mean([jax.device_get(m[k]) for m in pending]))
                         for k in pending[0]}
                means["lr"] = float(schedule(step - 1))
                record = metric_logger.write(step, means, images=images_since_log)
                if not np.isfinite(means["loss"]):
                    raise FloatingPointError(f"loss is {means['loss']} at step {step}: training diverged "
                                             "(a lower optim.lr, or a look at the data, may help)")
                pending, images_since_log = [], 0
            if (checkpoint_every > 0 and step % checkpoint_every == 0) or step == end_step:
                save(step)
    finally:
        metric_logger.close()
        checkpointer.close()
    if main and step == num_steps:
        with open(workdir / "train_done.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "num_steps": num_steps, "time": time.time()}, f)
    return TrainResult(state=state, graphdef=graphdef, rng_template=rng_template,
                       last_metrics=record, resumed_from=resumed_from)
