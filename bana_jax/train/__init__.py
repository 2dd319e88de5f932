"""Training machinery shared by stage 1 and stage 3: mesh, optimizer, state, checkpoints, loop."""

from bana_jax.train.checkpoint import Checkpointer
from bana_jax.train.loop import TrainResult, configure_compilation_cache, train_loop
from bana_jax.train.mesh import (batch_sharding, is_main_process, make_data_mesh,
                                 maybe_initialize_distributed, replicated_sharding, shard_batch)
from bana_jax.train.optim import GROUP_NAMES, make_optimizer, make_schedule
from bana_jax.train.state import (TrainState, create_train_state, jit_train_step, label_tree,
                                  make_train_step, merge_model)

__all__ = [
    "Checkpointer", "GROUP_NAMES", "TrainResult", "TrainState", "batch_sharding",
    "configure_compilation_cache", "create_train_state", "is_main_process", "jit_train_step",
    "label_tree", "make_data_mesh", "make_optimizer", "make_schedule", "make_train_step",
    "maybe_initialize_distributed", "merge_model", "replicated_sharding", "shard_batch", "train_loop",
]
