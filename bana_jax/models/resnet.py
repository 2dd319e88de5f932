"""ResNet-101 in the DeepLab-V2 (MSRA/Caffe) layout + the DeepLab-V2 ASPP, NHWC.

Module names follow the official PyTorch code (`layer1.conv1.{conv,bn}`,
`layer2.block1.{reduce,conv3x3,increase,shortcut}.{conv,bn}`, ...), so state-dict keys map one to
one. Differences from torchvision's ResNet: the stride sits in the first 1x1 conv of a stage, the
stem max-pool uses ceil mode, layer4/layer5 use dilation 2/4 instead of striding (output stride 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bana_jax.models import layers

RESNET101_BLOCKS = (3, 4, 23, 3)
# Official _ConvBnReLU: BatchNorm2d(eps=1e-5, momentum=0.999), PyTorch convention.
OFFICIAL_BN_MOMENTUM = 0.999
ASPP_RATES = (6, 12, 18, 24)


class ConvBN(nnx.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU (the official `_ConvBnReLU`)."""

    def __init__(self, in_ch, out_ch, kernel, stride, padding, dilation, *, relu, bn_kwargs,
                 dtype, rngs):
        self.conv = layers.conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding,
                                  dilation=dilation, use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = layers.BatchNorm(out_ch, dtype=dtype, **bn_kwargs)
        self.relu = relu

    def __call__(self, x):
        x = self.bn(self.conv(x))
        return jax.nn.relu(x) if self.relu else x


class Bottleneck(nnx.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1 expansion, plus projection shortcut when asked."""

    def __init__(self, in_ch, out_ch, stride, dilation, downsample, *, bn_kwargs, dtype, rngs):
        mid = out_ch // 4
        kw = dict(bn_kwargs=bn_kwargs, dtype=dtype, rngs=rngs)
        self.reduce = ConvBN(in_ch, mid, 1, stride, 0, 1, relu=True, **kw)
        self.conv3x3 = ConvBN(mid, mid, 3, 1, dilation, dilation, relu=True, **kw)
        self.increase = ConvBN(mid, out_ch, 1, 1, 0, 1, relu=False, **kw)
        self.shortcut = ConvBN(in_ch, out_ch, 1, stride, 0, 1, relu=False, **kw) if downsample else None

    def __call__(self, x):
        h = self.increase(self.conv3x3(self.reduce(x)))
        return jax.nn.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResLayer(nnx.Module):
    """`n_blocks` bottlenecks named block1..blockN; only the first strides and projects."""

    def __init__(self, n_blocks, in_ch, out_ch, stride, dilation, **kw):
        self.n_blocks = n_blocks
        for i in range(n_blocks):
            setattr(self, f"block{i + 1}", Bottleneck(
                in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation, i == 0, **kw))

    def __call__(self, x):
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        return x


class Stem(nnx.Module):
    """7x7/2 conv + BN + ReLU, then 3x3/2 max-pool with ceil mode."""

    def __init__(self, out_ch, **kw):
        self.conv1 = ConvBN(3, out_ch, 7, 2, 3, 1, relu=True, **kw)

    def __call__(self, x):
        return layers.max_pool(self.conv1(x), 3, 2, 1, ceil_mode=True)


class ResNetDeepLab(nnx.Module):
    """Images `(B, H, W, 3)` -> `(B, h, w, 32 * base_width)` at output stride 8.

    n_blocks: bottlenecks per stage (ResNet-101: 3, 4, 23, 3; smaller for tests).
    base_width: stem width (64); stage outputs are 4, 8, 16, 32 times it.
    bn_momentum: PyTorch convention (official: 0.999). freeze_bn: BN always uses running stats.
    """

    def __init__(
        self,
        *,
        n_blocks: Sequence[int] = RESNET101_BLOCKS,
        base_width: int = 64,
        bn_momentum: float = OFFICIAL_BN_MOMENTUM,
        bn_epsilon: float = 1e-5,
        freeze_bn: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(n_blocks) != 4 or min(n_blocks) < 1:
            raise ValueError(f"n_blocks must be 4 positive counts, got {tuple(n_blocks)}")
        ch = [base_width * 2**p for p in range(6)]
        kw = dict(bn_kwargs=dict(momentum=bn_momentum, epsilon=bn_epsilon, frozen=freeze_bn),
                  dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.feature_dim = ch[5]
        self.layer1 = Stem(ch[0], **kw)
        self.layer2 = ResLayer(n_blocks[0], ch[0], ch[2], 1, 1, **kw)
        self.layer3 = ResLayer(n_blocks[1], ch[2], ch[3], 2, 1, **kw)
        self.layer4 = ResLayer(n_blocks[2], ch[3], ch[4], 1, 2, **kw)
        self.layer5 = ResLayer(n_blocks[3], ch[4], ch[5], 1, 4, **kw)

    def __call__(self, images: jax.Array, *, return_stages: bool = False):
        layers.check_images(images)
        x = images.astype(self.dtype)
        stages = []
        for name in ("layer1", "layer2", "layer3", "layer4", "layer5"):
            x = getattr(self, name)(x)
            stages.append(x)
        return stages if return_stages else x


def set_bn_frozen(module: nnx.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) every BatchNorm inside `module`."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, layers.BatchNorm):
            m.frozen = frozen
