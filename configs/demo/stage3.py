"""Demo, stage 3: a tiny DeepLab-style network with the noise-aware loss on the synthetic data."""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage3"
    config.data.name = "synthetic"
    config.data.split = "train"
    config.data.synthetic_images = 64
    config.data.synthetic_size = 64
    config.data.batch_size = 8
    config.data.crop_size = 64
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
    config.train.num_steps = 200
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 1

    config.loss.name = "nal"
    config.crf.bi_xy_std = 30.0            # the images are 64 px: a smaller spatial range
    config.eval.split = "val"
    config.eval.scales = (1.0,)
    config.eval.flip = False
    return config
