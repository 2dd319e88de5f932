"""The BANA networks: the stage-1 labeler and the stage-3 DeepLab models.

- `Labeler`: images `(B, H, W, 3)` -> features `(B, h, w, D)` (output stride 8) plus a
  dot-product classifier with weights `(D, C)` (`labeler.classifier.weight`).
- `DeepLab`: images -> `(features (B, h, w, D), scores (B, h, w, C))`; scores are `cos(phi, W_c)`
  for the cosine head (tau is NOT applied; `model.tau` is for the losses) or `phi . W_c` for the
  dot head.

Model configs (`ml_collections.ConfigDict`, see `labeler_config()` / `deeplab_config()`):

| field | meaning | default |
|---|---|---|
| `backbone` (labeler) | 'vgg16', 'tiny' or 'efficientnet_lite0' | 'vgg16' |
| `arch` (deeplab) | 'v1' (VGG16 LargeFOV), 'v2' (ResNet-101 + ASPP), 'tiny', 'efficientnet_lite0' | 'v1' |
| `num_classes` | classes including background | 21 |
| `classifier` (deeplab) | 'cosine' or 'dot' | 'cosine' |
| `tau` (deeplab) | cosine temperature used by the losses | 20.0 |
| `dtype` | compute dtype, 'float32' or 'bfloat16' (params stay float32) | 'float32' |
| `seed` | parameter-init seed (dropout stream uses seed + 1) | 0 |
| `fc6_dilation` | VGG fc6 dilation; None = 1 (labeler) / 12 (deeplab) | None |
| `vgg_widths` | VGG block widths; None = VGG16 (tiny: 8, 16, 32, 32, 32) | None |
| `fc_dim` | VGG fc6/fc7 width; None = 1024 (tiny: 64) | None |
| `dropout_rate` | channel dropout after fc6/fc7 | 0.5 |
| `vgg_norm` | VGG trunks: 'none' or 'batch' (BatchNorm after each block conv, see `VGGTrunk`) | 'none' |
| `resnet_blocks` | bottlenecks per stage | (3, 4, 23, 3) |
| `resnet_base_width` | ResNet stem width | 64 |
| `aspp_dim` | ASPP output channels | 256 |
| `aspp_rates` | ASPP dilation rates | (6, 12, 18, 24) |
| `bn_momentum` | BatchNorm momentum, PyTorch convention (official 0.999) | 0.999 |
| `freeze_bn` | BatchNorm always in eval mode (ResNet, EfficientNet-Lite0) | False |
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bana_jax.models import efficientnet, heads, layers, resnet, vgg

LABELER_BACKBONES = ("vgg16", "tiny", "efficientnet_lite0")
DEEPLAB_ARCHS = ("v1", "v2", "tiny", "efficientnet_lite0")
PARAM_GROUPS = ("pretrained_weight", "pretrained_bias", "new_weight", "new_bias")


def _dtype(name) -> jnp.dtype:
    if name in ("float32", jnp.float32):
        return jnp.float32
    if name in ("bfloat16", jnp.bfloat16):
        return jnp.bfloat16
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {name!r}")


def make_backbone(
    name: str,
    *,
    fc6_dilation: int = 1,
    vgg_widths: Sequence[int] | None = None,
    fc_dim: int | None = None,
    dropout_rate: float = 0.5,
    vgg_norm: str = "none",
    freeze_bn: bool = False,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A backbone mapping images `(B, H, W, 3)` to `(B, h, w, backbone.feature_dim)`, stride 8.

    `vgg_norm` applies to the VGG trunks ('vgg16', 'tiny'); `freeze_bn` to the EfficientNet-Lite0
    BatchNorms."""
    if name in ("vgg16", "tiny"):
        tiny = name == "tiny"
        return vgg.VGGTrunk(
            fc6_dilation=fc6_dilation,
            widths=vgg_widths or (vgg.TINY_WIDTHS if tiny else vgg.VGG16_WIDTHS),
            fc_dim=fc_dim or (64 if tiny else 1024),
            dropout_rate=dropout_rate,
            norm=vgg_norm,
            dtype=dtype,
            rngs=rngs,
        )
    if vgg_norm != "none":
        raise ValueError(f"vgg_norm={vgg_norm!r} applies to the VGG trunks only, not to {name!r}")
    if name == "efficientnet_lite0":
        # Output stride 8 (dilated), features = the last MBConv block's 320 channels, without the
        # 1x1 head conv to 1280: stage 2 works on full-resolution (H, W, D) feature maps and its
        # memory and Gram/prototype work grow with D (a 500 x 375 image: 240 MB at D = 320, 960 MB
        # at 1280, 768 MB for VGG's 1024); the head conv adds no spatial context, only a costly
        # 320 -> 1280 projection at 1/8 resolution, and was trained for global-pool classification
        # (DeepLab's MobileNetV2 backbone drops it likewise). The features are signed (linear
        # bottleneck); BANA only uses them through ReLU(cos) and ReLU(CAM), which allow that.
        return efficientnet.EfficientNetLite0(freeze_bn=freeze_bn, dtype=dtype, rngs=rngs)
    raise ValueError(f"backbone must be one of {LABELER_BACKBONES}, got {name!r}")


class Labeler(nnx.Module):
    """Stage-1 classification network: backbone + dot-product classifier (no bias).

    `labeler(images)` -> features `(B, h, w, D)` (after dropout in train mode, as in the official
    code); `labeler.classifier(vectors (..., D))` -> scores `(..., C)`;
    `labeler.classifier.weight` -> `(D, C)`.
    """

    def __init__(self, backbone: str | nnx.Module = "vgg16", num_classes: int = 21, *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(backbone, str):
            backbone = make_backbone(backbone, fc6_dilation=1, dtype=_dtype(dtype), rngs=rngs)
        self.backbone = backbone
        self.num_classes = num_classes
        self.classifier = heads.Classifier(backbone.feature_dim, num_classes, kind="dot", rngs=rngs)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.backbone(images)

    def segment(self, images: jax.Array) -> jax.Array:
        """Dense dot-product scores `(B, h, w, C)` (the official `Labeler.segment`)."""
        return self.classifier(self.backbone(images))


class DeepLab(nnx.Module):
    """DeepLab-V1 (VGG16 LargeFOV), DeepLab-V2 (ResNet-101 + ASPP) or a light variant.

    `model(images)` -> `(features (B, h, w, D), scores (B, h, w, C))`, output stride 8.
    """

    def __init__(
        self,
        arch: str = "v1",
        num_classes: int = 21,
        *,
        classifier: str = "cosine",
        tau: float = 20.0,
        fc6_dilation: int = 12,
        vgg_widths: Sequence[int] | None = None,
        fc_dim: int | None = None,
        dropout_rate: float = 0.5,
        vgg_norm: str = "none",
        resnet_blocks: Sequence[int] = resnet.RESNET101_BLOCKS,
        resnet_base_width: int = 64,
        aspp_dim: int = 256,
        aspp_rates: Sequence[int] = resnet.ASPP_RATES,
        bn_momentum: float = resnet.OFFICIAL_BN_MOMENTUM,
        freeze_bn: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if arch not in DEEPLAB_ARCHS:
            raise ValueError(f"arch must be one of {DEEPLAB_ARCHS}, got {arch!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        dtype = _dtype(dtype)
        self.arch = arch
        self.num_classes = num_classes
        self.tau = float(tau)
        self.dtype = dtype
        self.aspp_rates = tuple(aspp_rates)
        if arch == "v2":
            if vgg_norm != "none":
                raise ValueError(f"vgg_norm={vgg_norm!r} applies to the VGG trunks only, not to arch 'v2'")
            self.backbone = resnet.ResNetDeepLab(
                n_blocks=resnet_blocks, base_width=resnet_base_width, bn_momentum=bn_momentum,
                freeze_bn=freeze_bn, dtype=dtype, rngs=rngs)
            # Official DeepLab_ASPP: c1..c4, 3x3, no bias, N(0, 0.01); summed, then ReLU.
            for i, rate in enumerate(self.aspp_rates, start=1):
                setattr(self, f"c{i}", layers.conv2d(
                    self.backbone.feature_dim, aspp_dim, 3, padding=rate, dilation=rate,
                    use_bias=False, kernel_init=layers.normal_001, dtype=dtype, rngs=rngs))
            feature_dim = aspp_dim
        else:
            self.backbone = make_backbone(
                "vgg16" if arch == "v1" else arch, fc6_dilation=fc6_dilation,
                vgg_widths=vgg_widths, fc_dim=fc_dim, dropout_rate=dropout_rate, vgg_norm=vgg_norm,
                freeze_bn=freeze_bn, dtype=dtype, rngs=rngs)
            feature_dim = self.backbone.feature_dim
        self.feature_dim = feature_dim
        self.classifier = heads.Classifier(feature_dim, num_classes, kind=classifier, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """`phi`: `(B, H, W, 3)` -> `(B, h, w, D)` (the official `get_features`)."""
        x = self.backbone(images)
        if self.arch == "v2":
            x = sum(getattr(self, f"c{i}")(x) for i in range(1, len(self.aspp_rates) + 1))
            x = jax.nn.relu(x)
        return x

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = self.features(images)
        return features, self.classifier(features)


def labeler_config() -> ml_collections.ConfigDict:
    """Default labeler model config (see the module docstring for the fields)."""
    return ml_collections.ConfigDict(dict(
        backbone="vgg16", num_classes=21, dtype="float32", seed=0, fc6_dilation=1,
        vgg_widths=None, fc_dim=None, dropout_rate=0.5, vgg_norm="none", freeze_bn=False))


def deeplab_config() -> ml_collections.ConfigDict:
    """Default DeepLab model config (see the module docstring for the fields)."""
    return ml_collections.ConfigDict(dict(
        arch="v1", num_classes=21, classifier="cosine", tau=20.0, dtype="float32", seed=0,
        fc6_dilation=12, vgg_widths=None, fc_dim=None, dropout_rate=0.5, vgg_norm="none",
        resnet_blocks=resnet.RESNET101_BLOCKS, resnet_base_width=64, aspp_dim=256,
        aspp_rates=resnet.ASPP_RATES, bn_momentum=resnet.OFFICIAL_BN_MOMENTUM, freeze_bn=False))


def _rngs(config) -> nnx.Rngs:
    seed = int(config.get("seed", 0))
    return nnx.Rngs(params=seed, dropout=seed + 1)


def _opt_tuple(value):
    return None if value is None else tuple(value)


def build_labeler(config: ml_collections.ConfigDict) -> Labeler:
    """Labeler from a model ConfigDict; missing fields take `labeler_config()` defaults."""
    cfg = labeler_config()
    cfg.update(dict(config))
    rngs = _rngs(cfg)
    backbone = make_backbone(
        cfg.backbone, fc6_dilation=cfg.fc6_dilation or 1, vgg_widths=_opt_tuple(cfg.vgg_widths),
        fc_dim=cfg.fc_dim, dropout_rate=cfg.dropout_rate, vgg_norm=cfg.vgg_norm,
        freeze_bn=cfg.freeze_bn, dtype=_dtype(cfg.dtype), rngs=rngs)
    return Labeler(backbone, cfg.num_classes, rngs=rngs, dtype=cfg.dtype)


def build_deeplab(config: ml_collections.ConfigDict) -> DeepLab:
    """DeepLab from a model ConfigDict; missing fields take `deeplab_config()` defaults."""
    cfg = deeplab_config()
    cfg.update(dict(config))
    return DeepLab(
        cfg.arch, cfg.num_classes, classifier=cfg.classifier, tau=cfg.tau,
        fc6_dilation=cfg.fc6_dilation or 12, vgg_widths=_opt_tuple(cfg.vgg_widths),
        fc_dim=cfg.fc_dim, dropout_rate=cfg.dropout_rate, vgg_norm=cfg.vgg_norm,
        resnet_blocks=tuple(cfg.resnet_blocks), resnet_base_width=cfg.resnet_base_width,
        aspp_dim=cfg.aspp_dim, aspp_rates=tuple(cfg.aspp_rates), bn_momentum=cfg.bn_momentum,
        freeze_bn=cfg.freeze_bn, dtype=cfg.dtype, rngs=_rngs(cfg))


def path_names(path) -> tuple[str, ...]:
    """Attribute/dict names along a pytree path, without a Variable's trailing `value` (which
    trees restored from some saved layouts carry)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
    if names and names[-1] == "value":
        names.pop()
    return tuple(names)


def param_group_label(names: tuple[str, ...]) -> str:
    """Group of one parameter from its path: under `backbone` = pretrained, else new;
    `bias` leaves (conv and BatchNorm biases) = bias, everything else (kernels, BN scales) = weight."""
    origin = "pretrained" if names[0] == "backbone" else "new"
    return f"{origin}_{'bias' if names[-1] == 'bias' else 'weight'}"


def param_group_labels(model: nnx.Module):
    """Labels (one of PARAM_GROUPS) with the structure of `nnx.state(model, nnx.Param)`.

    Usable directly as `optax.multi_transform(transforms, param_group_labels(model))`.
    The VGG fc6/fc7 layers count as pretrained (they are, from `vgg_caffe.pth`) even when they
    start from scratch under the HED init, like the official code; the ResNet and EfficientNet-Lite0
    BatchNorm scale and bias count as pretrained weight / bias (the whole EfficientNet backbone
    is ImageNet-pretrained); ASPP convs and the classifier are new.
    """
    state = nnx.state(model, nnx.Param)
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group_label(path_names(p)), state)
