"""1x1 classifier heads without bias (supplement Eq. 2 and Eq. 3).

The weight is stored as `kernel` `(D, C)`; the PyTorch checkpoint holds it as
`classifier.weight` `(C, D, 1, 1)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bana_jax.models import layers

HEAD_TYPES = ("dot", "cosine")


class Classifier(nnx.Module):
    """`scores(p, c) = f(p) . w_c` (dot) or `cos(f(p), w_c)` (cosine, tau NOT applied).

    Features `(..., D)` -> scores `(..., C)`, computed in float32 (cosines in bfloat16 are too
    coarse for the noise-aware loss). Init N(0, 0.01) as in the official code.
    """

    def __init__(self, feature_dim: int, num_classes: int, *, kind: str = "dot", rngs: nnx.Rngs):
        if kind not in HEAD_TYPES:
            raise ValueError(f"classifier kind must be one of {HEAD_TYPES}, got {kind!r}")
        self.kind = kind
        self.kernel = nnx.Param(layers.normal_001(rngs.params(), (feature_dim, num_classes)))

    @property
    def weight(self) -> jax.Array:
        """Classifier weights `(D, C)`."""
        return self.kernel[...]

    def __call__(self, features: jax.Array) -> jax.Array:
        f = features.astype(jnp.float32)
        w = self.kernel[...]
        if self.kind == "cosine":
            f = layers.l2_normalize(f, axis=-1)
            w = layers.l2_normalize(w, axis=0)
        return jnp.einsum("...d,dc->...c", f, w, precision=jax.lax.Precision.HIGHEST)
