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
`backbone.` prefix; `load_vgg_init`). `load_checkpoint` tells the two layouts apart by their keys,
so a config's `model.init` may name either. Every key must be accounted for: the official code
loads with `strict=False` and can silently train from random weights; here a missing or unused
key is a ValueError listing them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from bana_jax.models import torch_io, vgg
from bana_jax.models.networks import Labeler, make_backbone, path_names

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


def _read_normalised(state_dict: Mapping[str, np.ndarray] | str | os.PathLike) -> dict[str, np.ndarray]:
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch_io.read_state_dict(state_dict)
    return _normalise_keys(state_dict)


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    ignore_prefixes: Sequence[str] = (),
    optional_prefixes: Sequence[str] = (),
    rng_seed: int = 0,
) -> nnx.Module:
    """Copy a PyTorch state dict (or a `.pt`/`.pth` path) into `module`, in place; returns it.

    Works on abstract modules from `nnx.eval_shape` too (no costly random init needed); their
    dropout RNG state is then seeded with `rng_seed`.
    `optional_prefixes`: layers (e.g. `"fc6."`) the state dict may lack altogether; they then keep
    their current values. A layer with only some of its keys present is still an error.
    Raises ValueError listing missing keys, unused keys (those not starting with one of
    `ignore_prefixes`; BatchNorm `num_batches_tracked` counters are accepted) and shape mismatches.
    """
    sd = _read_normalised(state_dict)
    state, flat = _flat_state(module)
    expected = {_torch_key(n): (n, leaf) for n, leaf in flat}
    bn_prefixes = {k[: -len("running_mean")] for k in expected if k.endswith(".running_mean")}
    absent = tuple(p for p in optional_prefixes if not any(k.startswith(p) for k in sd))
    missing = sorted(k for k in expected if k not in sd and not k.startswith(absent))
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
        if key not in sd:  # an absent optional layer: its current value (or abstract shape) stays
            new_leaves.append(leaf)
            continue
        value = _from_torch_layout(np.asarray(sd[key], np.float32), names[-1], len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            bad_shapes.append(f"{key}: got {tuple(sd[key].shape)}, expected a tensor giving {tuple(leaf.shape)}")
        new_leaves.append(jax.numpy.asarray(value))
    if bad_shapes:
        raise ValueError("state dict shape mismatch: " + "; ".join(bad_shapes))
    treedef = jax.tree_util.tree_structure(state)
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, new_leaves))
    materialize_rng_state(module, seed=rng_seed)
    return module


def materialize_rng_state(module: nnx.Module, *, seed: int = 0) -> None:
    """Give concrete values to RNG keys/counters left abstract by `nnx.eval_shape`.

    A model created with `nnx.eval_shape` and then filled by `load_torch_state_dict` has no
    concrete dropout stream; this seeds it (`seed`, folded with the variable's index). Concrete
    variables are left alone.
    """
    state = nnx.state(module, nnx.RngState)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if not any(isinstance(v, jax.ShapeDtypeStruct) for v in leaves):
        return
    new = []
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            new.append(leaf)
        elif jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            new.append(jax.random.fold_in(jax.random.key(seed), i))
        else:
            new.append(jax.numpy.zeros(leaf.shape, leaf.dtype))
    nnx.update(module, jax.tree_util.tree_unflatten(treedef, new))


# Official full checkpoints: everything under the network's top-level modules.
OFFICIAL_PREFIXES = ("backbone.", "classifier.", "c1.", "c2.", "c3.", "c4.")
# The VGG init's layers: conv1_1 ... conv5_3, fc6, fc7 and (Caffe's classifier) fc8.
_VGG_INIT_KEY = re.compile(r"(conv[1-5]_[1-3]|fc[678])\.(weight|bias)")
# Skipped when a VGG init is loaded through `load_checkpoint`: its classifier, whose classes are
# not ours (the model's classifier keeps its N(0, 0.01) init, as in the official code).
VGG_INIT_SKIPPED = ("fc8.",)


def _key_preview(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def checkpoint_layout(state_dict: Mapping[str, np.ndarray]) -> str:
    """'official' (keys `backbone.*`, `classifier.weight`, ...) or 'vgg_init' (`vgg_caffe.pth`:
    `conv1_1.weight` ... `fc7.bias` without the `backbone.` prefix) from a state dict's keys.

    The loaders then check every key; a state dict of neither layout is a ValueError listing
    its keys.
    """
    keys = list(state_dict)
    if any(k.startswith(OFFICIAL_PREFIXES) for k in keys):
        return "official"
    if "conv1_1.weight" in state_dict and all(_VGG_INIT_KEY.fullmatch(k) for k in keys):
        return "vgg_init"
    raise ValueError(
        "unrecognised checkpoint layout: expected an official BANA checkpoint (keys backbone.*, "
        "classifier.weight; DeepLab-ASPP also c1..c4.weight) or the DeepLab VGG16 init "
        f"(conv1_1.weight ... conv5_3.bias, optionally fc6/fc7/fc8), got {len(keys)} keys "
        f"{_key_preview(keys)}")


def load_checkpoint(model: nnx.Module, checkpoint, **kwargs) -> nnx.Module:
    """A PyTorch checkpoint (state dict or `.pt`/`.pth` path) into `model`, in place, by layout.

    - official (labeler `.pt`, DeepLab-LargeFOV, DeepLab-ASPP): every parameter of `model`;
    - VGG init (`vgg_caffe.pth`): the backbone only (`load_vgg_init`), its `fc8.*` skipped.
    kwargs go to the loader (`ignore_prefixes`, `rng_seed`).
    """
    sd = _read_normalised(checkpoint)
    if checkpoint_layout(sd) == "vgg_init":
        ignore = tuple(kwargs.pop("ignore_prefixes", ())) + VGG_INIT_SKIPPED
        return load_vgg_init(model, sd, ignore_prefixes=ignore, **kwargs)
    return load_torch_state_dict(model, sd, **kwargs)


def load_vgg_init(model: nnx.Module, checkpoint, *, ignore_prefixes: Sequence[str] = (),
                  rng_seed: int = 0) -> nnx.Module:
    """The DeepLab VGG16 init (`vgg_caffe.pth`, keys `conv1_1.weight` ... `fc7.bias`) into
    `model.backbone` (a `VGGTrunk`), in place.

    The 13 convs must all be there; fc6 and fc7 are loaded when the file has them and otherwise
    keep their current values. Extra layers in the file (e.g. an `fc8` classifier) must be named
    in `ignore_prefixes`, e.g. `("fc8",)`; the classifier keeps its N(0, 0.01) init.
    """
    trunk = getattr(model, "backbone", None)
    if not isinstance(trunk, vgg.VGGTrunk):
        raise ValueError("a VGG16 init (conv1_1.weight ... fc7.bias) needs a model with a VGG "
                         f"backbone, got {type(model).__name__} with {type(trunk).__name__}")
    load_torch_state_dict(trunk, checkpoint, ignore_prefixes=ignore_prefixes,
                          optional_prefixes=("fc6.", "fc7."), rng_seed=rng_seed)
    return model


def official_labeler(checkpoint, *, where: str = "labeler") -> nnx.Module:
    """The official stage-1 `Labeler` (VGG16 trunk, fc6 dilation 1, classifier without bias) of a
    PyTorch state dict (or `.pt`/`.pth` path), as our `Labeler` in eval mode.

    The widths come from the file (`backbone.conv<b>_1.weight`, `backbone.fc6.weight`,
    `classifier.weight`), so reduced-width exports load too. Every key must match: a ValueError
    prefixed with `where` lists the missing and unused ones (e.g. a DeepLab-ASPP file's `c1.weight`).
    """
    sd = _read_normalised(checkpoint)
    shape_keys = [f"backbone.conv{b}_1.weight" for b in range(1, 6)] + ["backbone.fc6.weight",
                                                                        "classifier.weight"]
    absent = [k for k in shape_keys if k not in sd]
    if absent:
        raise ValueError(f"{where}: not an official Labeler state dict: it lacks {absent} "
                         f"(it has {len(sd)} keys {_key_preview(list(sd))})")
    widths = tuple(int(sd[k].shape[0]) for k in shape_keys[:5])
    fc_dim, num_classes = int(sd["backbone.fc6.weight"].shape[0]), int(sd["classifier.weight"].shape[0])
    model = nnx.eval_shape(lambda: Labeler(make_backbone("vgg16", fc6_dilation=1, vgg_widths=widths, fc_dim=fc_dim,
                                                         rngs=nnx.Rngs(0)), num_classes, rngs=nnx.Rngs(0)))
    try:
        load_torch_state_dict(model, sd)
    except ValueError as err:
        raise ValueError(f"{where}: not an official Labeler state dict: {err}") from None
    model.eval()
    return model
