"""Demo, stage 1: a tiny VGG-style labeler on the embedded synthetic dataset (CPU, about a minute).

Used by `bana demo` (configs/demo/demo.py) and runnable alone:
    bana stage1 --config=configs/demo/stage1.py --workdir=/tmp/demo_stage1
"""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage1"
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
    config.model.num_classes = 5             # background + the 4 synthetic shapes (as stage 3)
    config.model.dropout = 0.1

    # From scratch on raw Caffe-range inputs the random tiny trunk's features are large (~50), so
    # the official recipe's 10x classifier rate diverges (lr 1e-2: NaN within 5 steps); 1e-3 with
    # the classifier at 1x is stable.
    config.optim.lr = 1e-3
    config.optim.groups.new_weight.lr_mult = 1.0
    config.optim.schedule = "step"
    config.optim.step_boundaries = (150,)
    config.train.num_steps = 200
    config.train.log_every = 10
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 1

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.split = "val"
    config.eval.cam_split = "val"
    return config
