"""Flax networks vs PyTorch reference networks (tests/torch_reference.py) with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

# Random init compiles slowly on CPU: models here are abstract (nnx.eval_shape) and filled from the
# PyTorch reference weights; forwards are jit'd once per shape.
jax.config.update("jax_compilation_cache_dir", "/tmp/bana_jax_test_jit_cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from bana_jax.models import (  # noqa: E402
    PARAM_GROUPS,
    DeepLab,
    Labeler,
    build_deeplab,
    build_labeler,
    layers,
    param_group_labels,
)
from bana_jax.models.torch_import import load_checkpoint, load_vgg_init, torch_state_dict  # noqa: E402

TINY = (8, 16, 32, 32, 32)
SIZES = [(2, 37, 45), (1, 40, 48)]  # odd and even


def from_torch(factory, net, *, train=False):
    """Abstract model from `factory`, filled with the torch reference's weights."""
    model = nnx.eval_shape(factory)
    load_checkpoint(model, net.state_dict())
    model.train() if train else model.eval()
    return model


@nnx.jit
def forward(model, x):
    return model(x)


@nnx.jit
def segment(model, x):
    return model.segment(x)


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))


def nhwc(t):
    return t.detach().permute(0, 2, 3, 1).numpy()


def images(shape, seed=0):
    b, h, w = shape
    return np.random.default_rng(seed).normal(0, 60, (b, h, w, 3)).astype(np.float32)


def torch_in(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("shape", SIZES)
def test_labeler_tiny_matches_torch(shape):
    net = ref.randomise_(ref.LabelerRef(21, TINY, 64), seed=1).eval()
    model = from_torch(lambda: Labeler("tiny", 21, rngs=nnx.Rngs(0)), net)
    x = images(shape)
    with torch.no_grad():
        feats_t = net(torch_in(x))
        scores_t = ref.dot_scores(feats_t, net.classifier)
    feats = forward(model, jnp.asarray(x))
    assert feats.shape == (shape[0], -(-shape[1] // 8), -(-shape[2] // 8), 64)
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    assert rel_diff(segment(model, jnp.asarray(x)), nhwc(scores_t)) <= 1e-5
    # The classifier weight is exposed as (D, C).
    np.testing.assert_array_equal(model.classifier.weight, net.classifier.weight[:, :, 0, 0].T.detach().numpy())


@pytest.mark.parametrize("head", ["cosine", "dot"])
def test_deeplab_v1_tiny_matches_torch(head):
    net = ref.randomise_(ref.DeepLabV1Ref(5, TINY, 64), seed=2).eval()
    model = from_torch(lambda: DeepLab("tiny", 5, classifier=head, rngs=nnx.Rngs(0)), net)
    x = images((2, 41, 35), seed=3)
    with torch.no_grad():
        feats_t = net(torch_in(x))
        score_fn = ref.cosine_scores if head == "cosine" else ref.dot_scores
        scores_t = score_fn(feats_t, net.classifier)
    feats, scores = forward(model, jnp.asarray(x))
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    assert rel_diff(scores, nhwc(scores_t)) <= 1e-5
    if head == "cosine":
        assert float(jnp.max(jnp.abs(scores))) <= 1.0 + 1e-6


def test_vgg16_full_width_matches_torch_on_small_input():
    """Full VGG16 widths (abstract init + import, no 13 s random init), LargeFOV dilation 12."""
    net = ref.randomise_(ref.DeepLabV1Ref(21), seed=4).eval()
    model = from_torch(lambda: DeepLab("v1", 21, rngs=nnx.Rngs(0)), net)
    x = images((1, 19, 22), seed=5)
    with torch.no_grad():
        stages_t = net.backbone(torch_in(x), return_stages=True)
        feats_t = net(torch_in(x))
        scores_t = ref.cosine_scores(feats_t, net.classifier)
    feats, scores = forward(model, jnp.asarray(x))
    stages = nnx.jit(lambda m, x: m.backbone(x, return_stages=True))(model, jnp.asarray(x))
    for name in ("pool1", "pool2", "pool3", "pool4", "pool5", "fc6"):
        assert rel_diff(stages[name], nhwc(stages_t[name])) <= 1e-5, name
    assert feats.shape == (1, 3, 3, 1024)
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    assert rel_diff(scores, nhwc(scores_t)) <= 1e-5


RES_SMALL = dict(n_blocks=(1, 2, 2, 1), base=8, aspp_dim=16)


def small_v2(**kw):
    return DeepLab("v2", 6, resnet_blocks=RES_SMALL["n_blocks"], resnet_base_width=RES_SMALL["base"],
                   aspp_dim=RES_SMALL["aspp_dim"], rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("shape", SIZES)
def test_deeplab_v2_reduced_depth_matches_torch_eval(shape):
    net = ref.randomise_(ref.DeepLabV2Ref(6, **RES_SMALL), seed=6).eval()
    model = from_torch(small_v2, net)
    x = images(shape, seed=7)
    with torch.no_grad():
        stages_t = net.backbone(torch_in(x), return_stages=True)
        feats_t = net(torch_in(x))
        scores_t = ref.cosine_scores(feats_t, net.classifier)
    stages = nnx.jit(lambda m, x: m.backbone(x, return_stages=True))(model, jnp.asarray(x))
    assert list(stages) == list(stages_t)
    for name, stage in stages.items():
        assert stage.shape == nhwc(stages_t[name]).shape, name
        assert rel_diff(stage, nhwc(stages_t[name])) <= 1e-5, name
    feats, scores = forward(model, jnp.asarray(x))
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    assert rel_diff(scores, nhwc(scores_t)) <= 1e-5


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_deeplab_v2_train_mode_batchnorm_matches_torch(freeze_bn):
    """Batch statistics in train mode and the running-stat update (torch momentum, unbiased var)."""
    net = ref.randomise_(ref.DeepLabV2Ref(6, momentum=0.3, **RES_SMALL), seed=8).train()
    if freeze_bn:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    model = from_torch(lambda: small_v2(bn_momentum=0.3, freeze_bn=freeze_bn), net, train=True)
    x = images((2, 33, 30), seed=9)
    with torch.no_grad():
        feats_t = net(torch_in(x))
    feats, _ = forward(model, jnp.asarray(x))
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    ours = torch_state_dict(model)
    for key, value in net.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(ours[key], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_resnet101_full_depth_matches_torch_on_tiny_input():
    net = ref.randomise_(ref.DeepLabV2Ref(21), seed=10).eval()
    model = from_torch(lambda: DeepLab("v2", 21, rngs=nnx.Rngs(0)), net)
    x = images((1, 17, 18), seed=11)
    with torch.no_grad():
        feats_t = net(torch_in(x))
        scores_t = ref.cosine_scores(feats_t, net.classifier)
    feats, scores = forward(model, jnp.asarray(x))
    assert feats.shape == (1, 3, 3, 256)
    assert rel_diff(feats, nhwc(feats_t)) <= 1e-5
    assert rel_diff(scores, nhwc(scores_t)) <= 1e-5


@pytest.mark.parametrize("size", [5, 6, 7, 8, 33])
@pytest.mark.parametrize("stride,ceil", [(2, True), (2, False), (1, False)])
def test_max_pool_matches_torch(size, stride, ceil):
    x = images((1, size, size + 1), seed=size)
    theirs = torch.nn.functional.max_pool2d(torch_in(x), 3, stride, 1, ceil_mode=ceil)
    np.testing.assert_array_equal(layers.max_pool(jnp.asarray(x), 3, stride, 1, ceil_mode=ceil), nhwc(theirs))


@pytest.mark.parametrize("size", [(7, 9), (8, 12), (13, 13)])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (5, 2, 1), (3, 2, 1), (3, 1, 4), (5, 1, 2)])
def test_depthwise_conv_matches_torch_grouped_conv(size, kernel, stride, dilation):
    """Shift-and-add depthwise conv == torch's grouped conv after TF "SAME" padding, and its
    output size is ceil(size / stride) like TF."""
    x = images((2, *size), seed=kernel + stride)
    conv = layers.DepthwiseConv(3, kernel, stride=stride, dilation=dilation, rngs=nnx.Rngs(0))
    kernel_t = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1).copy())  # (C, 1, k, k)
    pads = [layers.same_padding(n, kernel, stride, dilation) for n in size]
    padded = torch.nn.functional.pad(torch_in(x), (*pads[1], *pads[0]))
    theirs = torch.nn.functional.conv2d(padded, kernel_t, stride=stride, dilation=dilation, groups=3)
    ours = np.asarray(conv(jnp.asarray(x)))
    assert ours.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 3)
    assert rel_diff(ours, nhwc(theirs)) <= 1e-6


def test_channel_dropout_drops_whole_channels():
    """Dropout2d semantics: per (sample, channel) keep-or-drop shared over H, W; kept x 2."""
    dropout = layers.channel_dropout(0.5, nnx.Rngs(dropout=3))
    out = np.asarray(dropout(jnp.ones((4, 5, 6, 64))))
    per_channel = out.reshape(4, 30, 64)
    assert np.all(per_channel == per_channel[:, :1]), "mask varies inside a channel"
    assert set(np.unique(out)) == {0.0, 2.0}
    assert 0.3 < (per_channel[:, 0] == 0).mean() < 0.7
    dropout.eval()
    np.testing.assert_array_equal(dropout(jnp.ones((1, 2, 2, 3))), 1.0)
    # In the network (train mode), whole fc7 channels vanish.
    net = ref.randomise_(ref.DeepLabV1Ref(3, TINY, 64), seed=12)
    model = from_torch(lambda: DeepLab("tiny", 3, rngs=nnx.Rngs(0)), net, train=True)
    feats = np.asarray(forward(model, jnp.asarray(images((2, 32, 32))))[0])
    assert np.all(feats == 0, axis=(1, 2)).mean() > 0.3


def test_missing_and_unused_keys_are_listed():
    net = ref.LabelerRef(4, TINY, 64)
    sd = net.state_dict()
    model = nnx.eval_shape(lambda: DeepLab("tiny", 4, classifier="dot", rngs=nnx.Rngs(0)))
    bad = {k: v for k, v in sd.items() if k != "backbone.fc7.bias"}
    bad["backbone.fc8.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \['backbone.fc7.bias'\].*unused keys \['backbone.fc8.weight'\]"):
        load_checkpoint(model, bad)
    wrong = dict(sd)
    wrong["classifier.weight"] = torch.zeros(5, 64, 1, 1)
    with pytest.raises(ValueError, match="classifier.weight"):
        load_checkpoint(model, wrong)


def test_vgg_init_keys_and_ignore():
    net = ref.VGGRef(12, TINY, 64)
    sd = {**net.state_dict(), "fc8.weight": torch.zeros(3, 64, 1, 1)}
    model = nnx.eval_shape(lambda: DeepLab("tiny", 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="fc8.weight"):
        load_vgg_init(model, sd)
    load_vgg_init(model, sd, ignore_prefixes=("fc8",))
    np.testing.assert_array_equal(model.backbone.conv3_2.kernel[...], net.conv3_2.weight.detach().numpy().transpose(2, 3, 1, 0))
    assert isinstance(nnx.to_pure_dict(nnx.state(model))["classifier"]["kernel"], jax.ShapeDtypeStruct)


def test_param_group_labels_and_builders():
    model = nnx.eval_shape(lambda: build_deeplab(dict(arch="tiny", num_classes=4)))
    labels = nnx.to_pure_dict(param_group_labels(model))
    assert labels["backbone"]["conv1_1"]["kernel"] == "pretrained_weight"
    assert labels["backbone"]["fc7"]["bias"] == "pretrained_bias"
    assert labels["classifier"]["kernel"] == "new_weight"
    assert jax.tree.structure(param_group_labels(model)) == jax.tree.structure(nnx.state(model, nnx.Param))
    v2 = nnx.eval_shape(lambda: small_v2())
    v2_labels = nnx.to_pure_dict(param_group_labels(v2))
    assert v2_labels["c3"]["kernel"] == "new_weight"
    assert v2_labels["backbone"]["layer2"]["block1"]["reduce"]["bn"]["bias"] == "pretrained_bias"
    assert v2_labels["backbone"]["layer2"]["block1"]["reduce"]["bn"]["scale"] == "pretrained_weight"
    net = ref.randomise_(ref.LabelerRef(4, TINY, 64), seed=13).eval()
    labeler = from_torch(lambda: build_labeler(dict(backbone="tiny", num_classes=4, dtype="bfloat16")), net)
    assert labeler.classifier.weight.shape == (64, 4)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(labeler, nnx.Param)))
    x = images((1, 24, 24), seed=14)
    feats = forward(labeler, jnp.asarray(x))
    assert feats.dtype == jnp.bfloat16
    with torch.no_grad():
        assert rel_diff(feats, nhwc(net(torch_in(x)))) < 0.05  # bfloat16 compute
    # The labels drive optax.multi_transform inside nnx.Optimizer (structure must match).
    tx = optax.multi_transform({g: optax.sgd(0.1) for g in PARAM_GROUPS}, param_group_labels(labeler))
    nnx.Optimizer(labeler, tx, wrt=nnx.Param)


def test_bad_input_is_rejected():
    model = nnx.eval_shape(lambda: DeepLab("tiny", 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\).*\(2, 3, 16, 16\)"):
        model(jnp.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match="arch"):
        DeepLab("v3", 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="classifier kind"):
        DeepLab("tiny", 3, classifier="euclid", rngs=nnx.Rngs(0))


def test_cosine_head_matches_torch_and_has_a_finite_gradient_at_a_zero_feature():
    """F.normalize's forward; the gradient at an all-zero feature (a ReLU'd pixel) used to be NaN
    (the derivative of sqrt at 0), poisoning the whole update."""
    import torch.nn.functional as F

    from bana_jax.models.heads import Classifier

    head = Classifier(4, 3, kind="cosine", rngs=nnx.Rngs(0))
    features = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    features[0, 0] = 0.0
    expected = F.normalize(torch.from_numpy(features), dim=-1) @ F.normalize(
        torch.from_numpy(np.asarray(head.kernel[...])), dim=0)
    np.testing.assert_allclose(head(jnp.asarray(features)), expected.numpy(), rtol=1e-6, atol=1e-7)
    grads = jax.grad(lambda f: jnp.sum(head(f) ** 2))(jnp.asarray(features))
    assert np.all(np.isfinite(grads))
