"""Data: sources (synthetic, COCO, VOC+SBD), transforms, batching and loading.

    from bana_jax.data import loader
    batches = loader.train_batches(config.data)   # iterator of fixed-shape batch dicts

Modules import lazily from here so that `import bana_jax.data` stays light.
"""
