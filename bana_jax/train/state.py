"""A functional train state for a Flax NNX model, and the jit-able train step.

The model is split once into a static `graphdef` and pytrees of arrays:

    params       nnx.Param variables                 (trained by the optimizer)
    model_state  everything else except RNG streams  (BatchNorm statistics, ...)
    rng          uint32 (2,) raw key data             (the run's base key, from train.seed)

RNG streams (dropout) are not carried between steps: at step t every stream key is rebuilt as
`fold_in(fold_in(base_key, t), stream_index)`, so the dropout masks depend only on the seed and
the step. That makes a resumed run draw exactly the masks of an uninterrupted one, and a sharded
step the masks of a single-device step (JAX's partitionable threefry).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from bana_jax.train.mesh import batch_sharding, replicated_sharding

# loss_fn(model, batch, step) -> (scalar loss, {name: scalar}); `model` is in train mode.
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array],
                  tuple[jax.Array, Mapping[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of updates applied
    params: Any              # nnx.State of nnx.Param
    model_state: Any         # nnx.State of the other non-RNG variables
    opt_state: Any           # optax state
    rng: jax.Array           # uint32 (2,) base key data


def split_model(model: nnx.Module):
    """`model` -> (graphdef, params, rng_template, model_state), train mode baked in."""
    model.train()
    graphdef, params, rngs, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    return graphdef, params, rngs, model_state


def step_rngs(rng_template: Any, base_rng: jax.Array, step: jax.Array) -> Any:
    """RNG stream state for one step: fresh keys from (base key, step), counters at 0."""
    key = jax.random.fold_in(jax.random.wrap_key_data(base_rng), step)
    leaves, treedef = jax.tree.flatten(rng_template)
    new_leaves = []
    for index, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            new_leaves.append(jax.random.fold_in(key, index))
        else:  # RngCount
            new_leaves.append(jnp.zeros_like(leaf))
    return jax.tree.unflatten(treedef, new_leaves)


def _keypath_tuple(keypath) -> tuple:
    out = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            out.append(key.key)
        elif isinstance(key, jax.tree_util.SequenceKey):
            out.append(key.idx)
        # GetAttrKey('value') of an nnx.Variable: not part of the parameter's name.
    return tuple(out)


def label_tree(params: Any, labels: Any) -> Any:
    """Group labels laid out like `params` (an nnx.State of Params).

    `labels` may be an nnx.State with string leaves, a nested dict (as `nnx.to_pure_dict`
    gives), or a callable `params -> either of those`.
    """
    if callable(labels) and not isinstance(labels, (dict, nnx.State)):
        labels = labels(params)
    if isinstance(labels, nnx.State):
        labels = nnx.to_pure_dict(labels)
    if not isinstance(labels, Mapping):
        raise TypeError(
            f"param_labels must be an nnx.State, a nested dict or a callable, got {type(labels)}")
    flat = {tuple(k): v for k, v in traverse_util.flatten_dict(dict(labels)).items()}
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    out, missing = [], []
    for keypath, _ in leaves_with_path:
        path = _keypath_tuple(keypath)
        if path not in flat:
            missing.append("/".join(map(str, path)))
            out.append(None)
        else:
            out.append(flat[path])
    if missing:
        raise ValueError(f"param_labels has no group for parameters {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return jax.tree.unflatten(treedef, out)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """Splits `model` and initialises the optimizer. Returns (graphdef, rng_template, state)."""
    graphdef, params, rngs, model_state = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return graphdef, rngs, state


def merge_model(graphdef, rng_template, state: TrainState) -> nnx.Module:
    """Rebuilds the NNX model from a train state (train mode; call `.eval()` for inference)."""
    return nnx.merge(graphdef, state.params, rng_template, state.model_state)


def make_train_step(graphdef, rng_template, tx: optax.GradientTransformation, loss_fn: LossFn):
    """The pure step `(state, batch) -> (state, metrics)`; metrics include "loss"."""

    def train_step(state: TrainState, batch):
        rngs = step_rngs(rng_template, state.rng, state.step)

        def compute_loss(params, rngs, model_state, batch, step):
            # Fresh Variable objects at the gradient's trace level (NNX refuses to mutate
            # BatchNorm statistics through variables created at an outer trace).
            rngs, model_state = jax.tree.map(lambda x: x, (rngs, model_state))
            model = nnx.merge(graphdef, params, rngs, model_state)
            loss, metrics = loss_fn(model, batch, step)
            _, _, _, new_model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return loss, (dict(metrics), new_model_state)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params, rngs, state.model_state, batch, state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["loss"] = loss
        new_state = state.replace(step=state.step + 1, params=params,
                                  model_state=model_state, opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(train_step, mesh: jax.sharding.Mesh, donate: bool = True):
    """`jax.jit` with a replicated state and a batch split over the "data" axis."""
    replicated = replicated_sharding(mesh)
    return jax.jit(train_step,
                   in_shardings=(replicated, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated),
                   donate_argnums=(0,) if donate else ())
