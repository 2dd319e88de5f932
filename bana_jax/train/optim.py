"""SGD with PyTorch semantics, parameter groups and the BANA learning-rate schedules.

PyTorch's `torch.optim.SGD(momentum=m, weight_decay=wd)` (dampening 0, no Nesterov) does, per
parameter group with learning rate `lr_t * lr_mult`:

    d = g + wd * p                 # coupled L2: decay enters the gradient, before momentum
    buf = m * buf + d              # buf starts at d on the first step (= m * 0 + d)
    p = p - lr_t * lr_mult * buf

optax equivalent per group: `add_decayed_weights(wd) -> trace(m) -> scale(-lr_t * lr_mult)`,
routed by `optax.multi_transform` over a label pytree (one group name per parameter).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

# The official BANA parameter groups (labels come from the model package).
GROUP_NAMES = ("pretrained_weight", "pretrained_bias", "new_weight", "new_bias")


def make_schedule(optim_config, num_steps: int) -> optax.Schedule:
    """Base learning rate as a function of the 0-based iteration (the count of updates done).

    `optim.schedule`:
      - "step": `lr * step_gamma ** (number of step_boundaries <= it)` (BANA stage 1:
        x0.1 at 5000 of 8000, like PyTorch's MultiStepLR stepped once per iteration);
      - "poly": `lr * (1 - it / num_steps) ** poly_power` (DeepLab, every iteration);
      - "constant": `lr`.
    """
    lr = float(optim_config.lr)
    kind = optim_config.schedule
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "step":
        boundaries = [int(b) for b in optim_config.step_boundaries]
        gamma = float(optim_config.step_gamma)
        return optax.piecewise_constant_schedule(lr, {b: gamma for b in boundaries})
    if kind == "poly":
        power = float(optim_config.poly_power)
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive for the poly schedule, got {num_steps}")

        def poly(count):
            frac = jnp.clip(count / num_steps, 0.0, 1.0)
            return lr * (1.0 - frac) ** power

        return poly
    raise ValueError(
        f"optim.schedule must be one of 'step', 'poly', 'constant'; got {kind!r}")


def _sgd_group(schedule: optax.Schedule, lr_mult: float, weight_decay: float,
               momentum: float, nesterov: bool) -> optax.GradientTransformation:
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_schedule(lambda count: -lr_mult * schedule(count)))
    return optax.chain(*parts)


def make_optimizer(optim_config, num_steps: int,
                   param_labels: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds the grouped SGD and returns `(tx, base_schedule)`.

    Args:
      optim_config: the `optim` ConfigDict: `lr`, `momentum`, `nesterov`, `schedule`,
        `step_boundaries`, `step_gamma`, `poly_power`, and `groups.<name>.lr_mult` /
        `groups.<name>.weight_decay` for each group name.
      num_steps: total iterations (the poly schedule's max).
      param_labels: a pytree with the structure of the parameters whose leaves are group names,
        or a callable `params -> labels` (as `optax.multi_transform` accepts).
    """
    schedule = make_schedule(optim_config, num_steps)
    groups = optim_config.groups
    transforms = {}
    for name in groups.keys():
        group = groups[name]
        transforms[name] = _sgd_group(schedule, float(group.lr_mult), float(group.weight_decay),
                                      float(optim_config.momentum), bool(optim_config.nesterov))
    return optax.multi_transform(transforms, param_labels), schedule


def check_labels(labels: Any, params: Any, known: Mapping[str, Any] | tuple[str, ...]) -> None:
    """Raises ValueError when `labels` does not match `params` or names an unknown group."""
    label_leaves = jax.tree_util.tree_flatten_with_path(labels)[0]
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    label_paths = [jax.tree_util.keystr(p) for p, _ in label_leaves]
    param_paths = [jax.tree_util.keystr(p) for p, _ in param_leaves]
    if label_paths != param_paths:
        missing = sorted(set(param_paths) - set(label_paths))
        extra = sorted(set(label_paths) - set(param_paths))
        raise ValueError(
            "param_labels must have the structure of the parameters; "
            f"parameters without a label: {missing[:5]}, labels without a parameter: {extra[:5]}")
    known = tuple(known)
    for path, label in zip(label_paths, (leaf for _, leaf in label_leaves)):
        if label not in known:
            raise ValueError(
                f"param_labels{path} = {label!r} is not a configured group; "
                f"expected one of {known} (optim.groups)")
