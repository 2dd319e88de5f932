"""VGG16 trunk in the DeepLab `vgg16_20M` layout (output stride 8), NHWC.

Attribute names follow the official PyTorch module (`conv1_1` ... `conv5_3`, `fc6`, `fc7`) so that
state-dict keys map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bana_jax.models import layers

VGG16_WIDTHS = (64, 128, 256, 512, 512)
TINY_WIDTHS = (8, 16, 32, 32, 32)
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)
NORMS = ("none", "batch")
# PyTorch's BatchNorm2d default: the demo's runs are a few hundred steps, too short for the
# slow 0.999 of the official ResNet to settle the running statistics.
BN_MOMENTUM = 0.1


class VGGTrunk(nnx.Module):
    """Images `(B, H, W, 3)` -> fc7 features `(B, ceil(H/8), ceil(W/8), fc_dim)`.

    conv1..conv5 (3x3, ReLU; conv5 dilation 2); max-pool 3x3 stride 2 pad 1 after blocks 1-3,
    stride 1 after blocks 4 and 5; avg-pool 3x3 stride 1 pad 1 (zero padding counted);
    fc6 3x3 (dilation `fc6_dilation`: 1 for the stage-1 labeler, 12 for DeepLab-LargeFOV);
    fc7 1x1; ReLU + channel dropout after fc6 and fc7.

    widths: output channels of the five conv blocks (VGG16: 64, 128, 256, 512, 512).
    norm: 'none' (the official VGG) or 'batch': each conv of the five blocks without bias and
      followed by BatchNorm (`bn<block>_<i>`) before its ReLU, as torchvision's vgg16_bn; fc6
      and fc7 keep their bias and have none. A from-scratch trunk trains much faster with it.
    """

    def __init__(
        self,
        *,
        fc6_dilation: int = 1,
        widths: Sequence[int] = VGG16_WIDTHS,
        fc_dim: int = 1024,
        dropout_rate: float = 0.5,
        norm: str = "none",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if len(widths) != 5:
            raise ValueError(f"widths must list 5 block widths, got {tuple(widths)}")
        if fc6_dilation < 1:
            raise ValueError(f"fc6_dilation must be >= 1, got {fc6_dilation}")
        self.widths = tuple(int(w) for w in widths)
        self.feature_dim = fc_dim
        self.norm = norm
        self.dtype = dtype
        batch_norm = norm == "batch"
        in_ch = 3
        for block, (width, n_convs) in enumerate(zip(self.widths, CONVS_PER_BLOCK), start=1):
            dilation = 2 if block == 5 else 1
            for i in range(1, n_convs + 1):
                # BatchNorm undoes any input scale, and under it a conv's effective step size
                # grows as its weights shrink: the Caffe-scaled init would make conv1_1's huge.
                init = layers.he_normal_caffe_input if in_ch == 3 and not batch_norm else layers.he_normal
                conv = layers.conv2d(in_ch, width, 3, padding=dilation, dilation=dilation,
                                     use_bias=not batch_norm, kernel_init=init, dtype=dtype, rngs=rngs)
                setattr(self, f"conv{block}_{i}", conv)
                if batch_norm:
                    setattr(self, f"bn{block}_{i}",
                            layers.BatchNorm(width, momentum=BN_MOMENTUM, dtype=dtype))
                in_ch = width
        self.fc6 = layers.conv2d(
            in_ch, fc_dim, 3, padding=fc6_dilation, dilation=fc6_dilation, dtype=dtype, rngs=rngs
        )
        self.dropout1 = layers.channel_dropout(dropout_rate, rngs)
        self.fc7 = layers.conv2d(fc_dim, fc_dim, 1, dtype=dtype, rngs=rngs)
        self.dropout2 = layers.channel_dropout(dropout_rate, rngs)

    def __call__(self, images: jax.Array, *, return_stages: bool = False):
        """fc7 features, or with `return_stages` a dict pool1..pool5, fc6, fc7 of activations."""
        layers.check_images(images)
        x = images.astype(self.dtype)
        stages = {}
        for block, n_convs in enumerate(CONVS_PER_BLOCK, start=1):
            for i in range(1, n_convs + 1):
                x = getattr(self, f"conv{block}_{i}")(x)
                if self.norm == "batch":
                    x = getattr(self, f"bn{block}_{i}")(x)
                x = jax.nn.relu(x)
            x = layers.max_pool(x, 3, 2 if block <= 3 else 1, 1)
            stages[f"pool{block}"] = x
        x = layers.avg_pool_count_pad(x, 3, 1, 1)
        x = self.dropout1(jax.nn.relu(self.fc6(x)))
        stages["fc6"] = x
        x = self.dropout2(jax.nn.relu(self.fc7(x)))
        stages["fc7"] = x
        return stages if return_stages else x
