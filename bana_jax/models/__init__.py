"""Flax NNX networks of BANA and their PyTorch checkpoint import."""

from bana_jax.models.heads import Classifier
from bana_jax.models.networks import (
    DEEPLAB_ARCHS,
    LABELER_BACKBONES,
    PARAM_GROUPS,
    DeepLab,
    Labeler,
    build_deeplab,
    build_labeler,
    deeplab_config,
    labeler_config,
    make_backbone,
    param_group_labels,
)
from bana_jax.models.resnet import ResNetDeepLab, set_bn_frozen
from bana_jax.models.vgg import VGGTrunk

__all__ = [
    "DEEPLAB_ARCHS", "LABELER_BACKBONES", "PARAM_GROUPS", "Classifier", "DeepLab", "Labeler",
    "ResNetDeepLab", "VGGTrunk", "build_deeplab", "build_labeler", "deeplab_config",
    "labeler_config", "make_backbone", "param_group_labels", "set_bn_frozen",
]
