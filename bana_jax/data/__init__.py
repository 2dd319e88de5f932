"""Data: sources (synthetic, COCO, VOC+SBD), transforms, batching and loading.

    from bana_jax import builders
    batches = builders.training_batches(config)   # iterator of fixed-shape batch dicts

Modules import lazily from here so that `import bana_jax.data` stays light.
"""
