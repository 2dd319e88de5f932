"""Demo, stage 1: a tiny VGG-style labeler on the embedded synthetic dataset (CPU, about 90 s).

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
    config.data.synthetic_size = 128
    config.data.batch_size = 8
    config.data.crop_size = 128
    config.data.max_boxes = 4
    config.data.num_workers = 0

    config.model.name = "vgg_tiny"
    config.model.init = "none"
    config.model.num_classes = 5             # background + the 4 synthetic shapes (as stage 3)
    config.model.dropout = 0.1

    # From scratch (no pretrained tiny trunk), so more steps and a higher rate than the official
    # fine-tuning recipe; the classifier stays at 1x: at 10x it collapses to background here.
    # At 64 px (8 x 8 features) every feature sees the whole image and fg/bg cannot be told apart.
    config.optim.lr = 3e-3
    config.optim.groups.new_weight.lr_mult = 1.0
    config.optim.schedule = "step"
    config.optim.step_boundaries = (450,)
    config.train.num_steps = 600
    config.train.log_every = 10
    config.train.checkpoint_every = 300
    config.train.keep_checkpoints = 1

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.split = "val"
    config.eval.cam_split = "val"
    return config
