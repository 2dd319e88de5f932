"""Demo, stage 2: pseudo labels on the synthetic dataset (official CRF parameters)."""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "synthetic"
    config.data.synthetic_images = 64
    config.data.synthetic_size = 128

    config.model.num_classes = 5             # background + the 4 synthetic shapes (as stage 3)

    config.pseudo.split = "train"
    config.pseudo.save_visualisations = True
    config.pseudo.box_convention = "pixels"  # tight synthetic boxes: each keeps all its pixels
    config.pseudo.baselines = ("box_fill", "grabcut")  # the demo's table scores them beside Y_crf / Y_ret
    return config
