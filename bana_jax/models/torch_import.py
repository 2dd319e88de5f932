"""PyTorch state dicts (official BANA key names) <-> our Flax NNX modules.

Our module attributes carry the official names, so a parameter's path gives its PyTorch key:
`('backbone', 'layer2', 'block1', 'reduce', 'conv', 'kernel')` <->
`backbone.layer2.block1.reduce.conv.weight`. Leaf renames and layouts:

| ours | PyTorch |
|---|---|
| conv `kernel` `(kh, kw, in, out)` | `weight` `(out, in, kh, kw)` |
| classifier `kernel` `(D, C)` | `classifier.weight` `(C, D, 1, 1)` |
| conv / BN `bias` | `bias` |
| BN `scale`, `mean`, `var` | `weight`, `running_mean`, `running_var` (+ `num_batches_tracked`, unused) |

Checkpoints covered: stage-1 labeler (`backbone.*`, `classifier.weight`), DeepLab-LargeFOV (same
keys, fc6 dilation 12), DeepLab-ASPP (`backbone.layer1..layer5.*`, `c1..c4.weight`,
`classifier.weight`), and the VGG init `vgg_caffe.pth` (the backbone's keys without the
`backbone.` prefix; `load_vgg_init`). Every key must be accounted for: the official code loads
with `strict=False` and can silently train from random weights; here a missing or unused key is
a ValueError listing them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from bana_jax.models import torch_io
from bana_jax.models.networks import path_names

_LEAF_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
                  "var": "running_var"}


def _torch_key(names: tuple[str, ...]) -> str:
    return ".".join(names[:-1] + (_LEAF_TO_TORCH[names[-1]],))


def _to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:  # (D, C) -> (C, D, 1, 1)
        return value.T[:, :, None, None]
    return value


def _from_torch_layout(value: np.ndarray, leaf: str, ndim: int) -> np.ndarray:
    if leaf == "kernel" and ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and ndim == 2:
        if value.ndim == 4 and value.shape[2:] != (1, 1):
            raise ValueError(f"classifier weight must be (C, D, 1, 1), got {value.shape}")
        return value.reshape(value.shape[0], value.shape[1]).T
    return value


def _flat_state(module: nnx.Module):
    """[(names, leaf array or ShapeDtypeStruct)] for params and batch statistics."""
    state = nnx.state(module, (nnx.Param, nnx.BatchStat))
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return state, [(path_names(path), leaf) for path, leaf in flat]


def torch_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """Our params/statistics as a PyTorch-keyed, PyTorch-layout `{key: float32 array}`."""
    _, flat = _flat_state(module)
    return {_torch_key(n): np.ascontiguousarray(_to_torch_layout(np.asarray(v, np.float32), n[-1]))
            for n, v in flat}


def _normalise_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = torch_io.to_numpy_state_dict(dict(state_dict))
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    ignore_prefixes: Sequence[str] = (),
) -> nnx.Module:
    """Copy a PyTorch state dict (or a `.pt`/`.pth` path) into `module`, in place; returns it.

    Works on abstract modules from `nnx.eval_shape` too (no costly random init needed).
    Raises ValueError listing missing keys, unused keys (those not starting with one of
    `ignore_prefixes`; BatchNorm `num_batches_tracked` counters are accepted) and shape mismatches.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch_io.read_state_dict(state_dict)
    sd = _normalise_keys(state_dict)
    state, flat = _flat_state(module)
    expected = {_torch_key(n): (n, leaf) for n, leaf in flat}
    bn_prefixes = {k[: -len("running_mean")] for k in expected if k.endswith(".running_mean")}
    missing = sorted(k for k in expected if k not in sd)
    unused = sorted(
        k for k in sd
        if k not in expected
        and not (k.endswith(".num_batches_tracked") and k[: -len("num_batches_tracked")] in bn_prefixes)
        and not any(k.startswith(p) for p in ignore_prefixes))
    if missing or unused:
        raise ValueError(
            f"state dict does not match {type(module).__name__}: {len(missing)} missing keys "
            f"{missing}, {len(unused)} unused keys {unused}")
    new_leaves, bad_shapes = [], []
    for key, (names, leaf) in expected.items():
        value = _from_torch_layout(np.asarray(sd[key], np.float32), names[-1], len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            bad_shapes.append(f"{key}: got {tuple(sd[key].shape)}, expected a tensor giving {tuple(leaf.shape)}")
        new_leaves.append(value)
    if bad_shapes:
        raise ValueError("state dict shape mismatch: " + "; ".join(bad_shapes))
    treedef = jax.tree_util.tree_structure(state)
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(v) for v in new_leaves]))
    return module


def load_checkpoint(model: nnx.Module, checkpoint, **kwargs) -> nnx.Module:
    """A full official checkpoint (labeler `.pt`, DeepLab-LargeFOV, DeepLab-ASPP) into `model`."""
    return load_torch_state_dict(model, checkpoint, **kwargs)


def load_vgg_init(model: nnx.Module, checkpoint, *, ignore_prefixes: Sequence[str] = ()) -> nnx.Module:
    """The DeepLab VGG16 init (`vgg_caffe.pth`, keys `conv1_1.weight` ... `fc7.bias`) into
    `model.backbone`. Extra layers in the file (e.g. an `fc8` classifier) must be named in
    `ignore_prefixes`, e.g. `("fc8",)`; the classifier keeps its N(0, 0.01) init."""
    load_torch_state_dict(model.backbone, checkpoint, ignore_prefixes=ignore_prefixes)
    return model
