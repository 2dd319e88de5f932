"""BANA in JAX/Flax: box-supervised semantic segmentation with background-aware pooling."""

__version__ = "0.1.0"
