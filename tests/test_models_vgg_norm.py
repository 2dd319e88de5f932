"""The VGG trunk with BatchNorm (`model.vgg_norm='batch'`, the demo's tiny trunk): layout, what the
normalisation does in train and eval mode, and the stage-1 -> stage-3 init carrying its statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bana_jax import artifacts, builders
from bana_jax.models import DeepLab, layers, make_backbone, vgg
from bana_jax.stage1 import export_labeler
from bana_jax.config import base_config

TINY = vgg.TINY_WIDTHS
BLOCK_CONVS = [f"conv{b}_{i}" for b, n in enumerate(vgg.CONVS_PER_BLOCK, start=1) for i in range(1, n + 1)]


def trunk(norm: str = "batch", seed: int = 0) -> vgg.VGGTrunk:
    return vgg.VGGTrunk(widths=TINY, fc_dim=16, dropout_rate=0.0, norm=norm, rngs=nnx.Rngs(seed))


def images(seed: int = 0, shape=(2, 24, 24)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(0, 60, (*shape, 3)), jnp.float32)


def test_batch_norm_layout_and_init():
    """A BatchNorm after each of the 13 block convs, which lose their bias; fc6/fc7 keep theirs.
    conv1_1 is He-initialised for unit inputs: the Caffe-pixel scaling of the plain trunk, under
    BatchNorm, would only make its effective step size ~60^2 times larger."""
    net = trunk("batch")
    for name in BLOCK_CONVS:
        conv = getattr(net, name)
        assert conv.bias is None, name
        bn = getattr(net, name.replace("conv", "bn"))
        assert isinstance(bn, layers.BatchNorm) and bn.scale.shape == (conv.out_features,), name
        assert bn.momentum == vgg.BN_MOMENTUM
    assert net.fc6.bias is not None and net.fc7.bias is not None
    fan_in_std = np.sqrt(2.0 / 27)  # 3 x 3 x 3 inputs
    assert np.std(np.asarray(net.conv1_1.kernel[...])) == pytest.approx(fan_in_std, rel=0.25)
    plain = trunk("none")
    assert not any(hasattr(plain, name.replace("conv", "bn")) for name in BLOCK_CONVS)
    assert plain.conv1_1.bias is not None
    assert np.std(np.asarray(plain.conv1_1.kernel[...])) < fan_in_std / 20


def test_train_mode_normalises_with_the_batch_and_updates_running_statistics():
    """In train mode the features do not depend on the input scale (conv1_1 has no bias and each
    BatchNorm removes the scale), and each running mean moves by momentum x the batch mean; in eval
    mode the running statistics are used, so the scale shows."""
    net = trunk("batch")
    x = images()
    net.train()
    first = np.asarray(net(x))
    conv_out = np.asarray(net.conv1_1(x))
    np.testing.assert_allclose(net.bn1_1.mean[...], vgg.BN_MOMENTUM * conv_out.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(net(3.0 * x)), first, rtol=1e-3, atol=1e-3)
    net.eval()
    assert not np.allclose(np.asarray(net(3.0 * x)), np.asarray(net(x)), rtol=1e-2, atol=1e-2)


def test_vgg_norm_is_checked_and_only_for_vgg():
    with pytest.raises(ValueError, match="norm must be one of"):
        trunk("layer")
    with pytest.raises(ValueError, match="VGG trunks only"):
        make_backbone("efficientnet_lite0", vgg_norm="batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="VGG trunks only"):
        nnx.eval_shape(lambda: DeepLab("v2", 3, vgg_norm="batch", resnet_blocks=(1, 1, 1, 1),
                                       resnet_base_width=8, aspp_dim=8, rngs=nnx.Rngs(0)))


def tiny_config(vgg_norm: str):
    config = base_config()
    config.data.name = "synthetic"
    config.model.name = "vgg_tiny"
    config.model.num_classes = 5
    config.model.init = "none"
    config.model.vgg_norm = vgg_norm
    return config


def test_config_builds_both_networks_with_the_norm():
    for vgg_norm, has_bn in (("none", False), ("batch", True)):
        labeler = nnx.eval_shape(lambda: builders.build_labeler(tiny_config(vgg_norm)))
        deeplab = nnx.eval_shape(lambda: builders.build_deeplab(tiny_config(vgg_norm)))
        assert hasattr(labeler.backbone, "bn3_3") == has_bn == hasattr(deeplab.backbone, "bn3_3")


def test_stage1_init_brings_batch_norm_statistics(tmp_path):
    """`model.init=<stage-1 workdir>` copies the labeler's trunk into the DeepLab: its weights and
    its BatchNorm running statistics (without them, eval mode would normalise with fresh ones)."""
    stage1 = tiny_config("batch")
    labeler = builders.build_labeler(stage1)
    rng = np.random.default_rng(5)
    for name in BLOCK_CONVS:
        bn = getattr(labeler.backbone, name.replace("conv", "bn"))
        bn.mean[...] = jnp.asarray(rng.normal(size=bn.mean.shape), jnp.float32)
        bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=bn.var.shape), jnp.float32)
    export_labeler(labeler, stage1, tmp_path, step=1)

    stage3 = tiny_config("batch")
    stage3.model.init = str(tmp_path)
    deeplab = artifacts.init_weights(builders.build_deeplab(stage3), stage3)
    expected = nnx.to_pure_dict(nnx.state(labeler.backbone, (nnx.Param, nnx.BatchStat)))
    copied = nnx.to_pure_dict(nnx.state(deeplab.backbone, (nnx.Param, nnx.BatchStat)))
    assert jax.tree.structure(copied) == jax.tree.structure(expected)
    assert sum("mean" in bn for bn in (copied[n.replace("conv", "bn")] for n in BLOCK_CONVS)) == 13
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(copied)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))


def test_stage1_init_head_copies_the_classifier_only_when_asked(tmp_path):
    """`model.init_head` starts the stage-3 classifier from the labeler's `w_c`; without it the head
    keeps its own random init. It needs a stage-1 workdir and a classifier of the same shape."""
    stage1 = tiny_config("batch")
    labeler = builders.build_labeler(stage1)
    labeler.classifier.kernel[...] = jnp.asarray(
        np.random.default_rng(3).normal(size=labeler.classifier.kernel.shape), jnp.float32)
    export_labeler(labeler, stage1, tmp_path, step=1)
    stage3 = tiny_config("batch")
    stage3.model.init = str(tmp_path)

    plain = artifacts.init_weights(builders.build_deeplab(stage3), stage3)
    assert not np.allclose(np.asarray(plain.classifier.kernel[...]), np.asarray(labeler.classifier.kernel[...]))
    stage3.model.init_head = True
    headed = artifacts.init_weights(builders.build_deeplab(stage3), stage3)
    np.testing.assert_array_equal(np.asarray(headed.classifier.kernel[...]),
                                  np.asarray(labeler.classifier.kernel[...]))
    # The trunk is copied either way.
    np.testing.assert_array_equal(np.asarray(headed.backbone.conv3_1.kernel[...]),
                                  np.asarray(plain.backbone.conv3_1.kernel[...]))

    stage3.model.num_classes = 4
    with pytest.raises(ValueError, match="classifier"):
        artifacts.init_weights(builders.build_deeplab(stage3), stage3)
    stage3.model.init = "none"
    with pytest.raises(ValueError, match="stage-1 workdir"):
        artifacts.init_weights(builders.build_deeplab(stage3), stage3)
