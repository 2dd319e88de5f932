"""Demo, stage 3: a tiny DeepLab-style network with the noise-aware loss on the synthetic data.

`bana demo` sets `model.init` to its stage-1 workdir: the box-trained labeler's trunk stands in for
the ImageNet init of the paper (from scratch, 400 steps learn little beyond background).
"""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage3"
    config.data.name = "synthetic"
    config.data.split = "train"
    config.data.synthetic_images = 64
    config.data.synthetic_size = 128
    config.data.batch_size = 8
    config.data.crop_size = 128
    config.data.max_boxes = 4
    config.data.num_workers = 0

    config.model.name = "vgg_tiny"
    config.model.init = "none"
    config.model.num_classes = 5             # background + the 4 synthetic shapes (at most 6)
    config.model.classifier = "cosine"
    config.model.dropout = 0.1

    config.optim.lr = 1e-2
    config.optim.schedule = "poly"
    config.optim.step_boundaries = ()
    config.train.num_steps = 400
    config.train.log_every = 10
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 1

    config.loss.name = "nal"
    config.eval.split = "val"
    config.eval.scales = (1.0,)
    config.eval.flip = False
    return config
