"""Grouped SGD against a hand-written NumPy transcription of torch.optim.SGD; the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bana_jax.config import base_config
from bana_jax.train.optim import check_labels, make_optimizer, make_schedule

GROUPS = {  # name: (lr_mult, weight_decay), deliberately not the defaults
    "pretrained_weight": (1.0, 5e-4),
    "pretrained_bias": (2.0, 0.0),
    "new_weight": (10.0, 1e-2),
    "new_bias": (20.0, 0.0),
}


def _optim_config(schedule, **kw):
    config = base_config().optim
    config.schedule = schedule
    config.lr = 0.05
    config.momentum = 0.9
    for name, (mult, wd) in GROUPS.items():
        config.groups[name].lr_mult = mult
        config.groups[name].weight_decay = wd
    for key, value in kw.items():
        config[key] = value
    return config


def _torch_sgd_reference(params, labels, grads_per_step, lr_at, momentum):
    """PyTorch SGD (dampening 0, no Nesterov), one loop per parameter, as in torch/optim/sgd.py."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    buffers = {}
    for it, grads in enumerate(grads_per_step):
        for name, p in params.items():
            mult, wd = GROUPS[labels[name]]
            d_p = grads[name].astype(np.float64)
            if wd != 0:
                d_p = d_p + wd * p
            if name not in buffers:
                buffers[name] = d_p.copy()
            else:
                buffers[name] = momentum * buffers[name] + d_p
            params[name] = p - lr_at(it) * mult * buffers[name]
    return params


@pytest.mark.parametrize("schedule", ["step", "poly"])
def test_grouped_sgd_matches_pytorch_sgd(schedule):
    num_steps = 6
    config = _optim_config(schedule, step_boundaries=(3,), step_gamma=0.1, poly_power=0.9)
    rng = np.random.default_rng(0)
    params = {"conv_w": rng.normal(size=(3, 4)), "conv_b": rng.normal(size=(4,)),
              "head_w": rng.normal(size=(4, 2)), "head_b": rng.normal(size=(2,))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    labels = {"conv_w": "pretrained_weight", "conv_b": "pretrained_bias",
              "head_w": "new_weight", "head_b": "new_bias"}
    grads_per_step = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
                      for _ in range(num_steps)]

    tx, _ = make_optimizer(config, num_steps, labels)
    jax_params = {k: jnp.asarray(v) for k, v in params.items()}
    opt_state = tx.init(jax_params)
    for grads in grads_per_step:
        updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in grads.items()},
                                       opt_state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)

    if schedule == "step":
        def lr_at(it):
            return 0.05 * (0.1 if it >= 3 else 1.0)
    else:
        def lr_at(it):
            return 0.05 * (1 - it / num_steps) ** 0.9
    expected = _torch_sgd_reference(params, labels, grads_per_step, lr_at, 0.9)
    for name in params:
        np.testing.assert_allclose(np.asarray(jax_params[name]), expected[name],
                                   rtol=2e-6, atol=2e-7, err_msg=name)


def test_schedules_by_hand():
    step = make_schedule(_optim_config("step", lr=1e-3, step_boundaries=(5000,),
                                       step_gamma=0.1), 8000)
    np.testing.assert_allclose([float(step(0)), float(step(4999)), float(step(5000)),
                                float(step(7999))], [1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-6)
    poly = make_schedule(_optim_config("poly", lr=1e-3, poly_power=0.9), 100)
    np.testing.assert_allclose([float(poly(0)), float(poly(50)), float(poly(99))],
                               [1e-3, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.01 ** 0.9], rtol=1e-5)
    with pytest.raises(ValueError, match="optim.schedule"):
        make_schedule(_optim_config("cosine"), 10)


def test_labels_must_cover_params_and_name_known_groups():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="new_wieght"):
        check_labels({"a": "pretrained_weight", "b": "new_wieght"}, params, tuple(GROUPS))
    with pytest.raises(ValueError, match="without a label"):
        check_labels({"a": "pretrained_weight"}, params, tuple(GROUPS))


def test_label_tree_accepts_state_dict_and_callable():
    from flax import nnx

    from bana_jax.train.state import label_tree

    class Two(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.layers = nnx.List([nnx.Linear(2, 2, rngs=rngs), nnx.Linear(2, 1, rngs=rngs)])

    params = nnx.state(Two(), nnx.Param)
    as_dict = {"layers": {0: {"kernel": "pretrained_weight", "bias": "pretrained_bias"},
                          1: {"kernel": "new_weight", "bias": "new_bias"}}}
    as_state = jax.tree_util.tree_map_with_path(
        lambda path, _: "y" if "kernel" in jax.tree_util.keystr(path) and "[1]" in
        jax.tree_util.keystr(path) else "x", params)
    for labels, expected in [(as_dict, ["pretrained_bias", "pretrained_weight", "new_bias",
                                        "new_weight"]),
                             (as_state, ["x", "x", "x", "y"]),
                             (lambda p: as_dict, ["pretrained_bias", "pretrained_weight",
                                                  "new_bias", "new_weight"])]:
        tree = label_tree(params, labels)
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        assert jax.tree.leaves(tree) == expected
    with pytest.raises(ValueError, match="no group for parameters.*layers/1/bias"):
        label_tree(params, {"layers": {0: as_dict["layers"][0], 1: {"kernel": "new_weight"}}})
