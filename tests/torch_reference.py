"""The PyTorch reference networks live in the package (`bana compare-torch` uses them too)."""

from bana_jax.models.torch_reference import *  # noqa: F401,F403
from bana_jax.models.torch_reference import randomise_  # noqa: F401
