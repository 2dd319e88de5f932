"""Demo, stage 2: pseudo labels on the synthetic dataset (official CRF parameters)."""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage2"
    config.data.name = "synthetic"
    config.data.split = "train"
    config.data.synthetic_images = 64
    config.data.synthetic_size = 128
    config.data.batch_size = 1
    config.data.max_boxes = 4
    config.data.num_workers = 0

    config.model.name = "vgg_tiny"
    config.model.init = "none"
    config.model.num_classes = 5             # background + the 4 synthetic shapes (as stage 3)
    config.model.vgg_norm = "batch"          # as stage 1 (the labeler is rebuilt from its labeler.json)

    config.pseudo.split = "train"
    config.pseudo.save_visualisations = True
    config.pseudo.box_convention = "pixels"  # tight synthetic boxes: each keeps all its pixels
    config.pseudo.baselines = ("box_fill", "grabcut")  # the demo's table scores them beside Y_crf / Y_ret
    config.eval.split = "train"
    return config
