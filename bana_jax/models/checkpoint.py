"""Save / load our own parameters (params + BatchNorm statistics) with orbax, atomically.

orbax writes into a temporary directory and renames it on completion, so an interrupted save
never leaves a half-written checkpoint at `path`.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

_SAVED = (nnx.Param, nnx.BatchStat)


def save_params(model: nnx.Module, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write `model`'s params and batch statistics to the directory `path` (absolute or relative)."""
    path = os.path.abspath(os.fspath(path))
    state = nnx.to_pure_dict(nnx.state(model, _SAVED))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state, force=overwrite)
        checkpointer.wait_until_finished()


def load_params(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Restore params and batch statistics saved by `save_params` into `model` (in place).

    `model` may be abstract (`nnx.eval_shape`); shapes must match what was saved.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    state = nnx.state(model, _SAVED)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    from bana_jax.models.torch_import import materialize_rng_state  # noqa: PLC0415

    materialize_rng_state(model)
    return model
