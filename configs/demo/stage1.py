"""Demo, stage 1: a tiny VGG-style labeler on the embedded synthetic dataset (CPU, about a minute).

Used by `bana demo` (configs/demo/demo.py) and runnable alone:
    bana stage1 --config=configs/demo/stage1.py --workdir=/tmp/demo_stage1
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "synthetic"
    config.data.split = "train"
    config.data.synthetic_images = 64
    config.data.synthetic_size = 128
    config.data.batch_size = 8
    config.data.crop_size = 96
    config.data.max_boxes = 4
    config.data.num_workers = 0
    # The synthetic classes differ in hue: saturation and contrast jitter blur the cue that tells
    # them apart, and 64 scenes leave little to regularise against.
    config.data.color_jitter = (1.0, 1.0)

    config.model.name = "vgg_tiny"
    config.model.init = "none"
    config.model.num_classes = 5             # background + the 4 synthetic shapes (as stage 3)
    config.model.dropout = 0.1
    # From scratch, a plain 15-layer tiny trunk trains slowly with SGD (it told few box classes
    # apart in the demo's time); with BatchNorm it learns the classes in a few hundred steps.
    # Stage 3 starts from this trunk, so both stages have the same norm (a demo SHARED_FIELD).
    config.model.vgg_norm = "batch"

    # From scratch (no pretrained tiny trunk), so more steps and a higher rate than the official
    # fine-tuning recipe; the classifier stays at 1x: at 10x it collapses to background here.
    # Crops of 96 px (12 x 12 features) pay for BatchNorm within the demo's time; at 64 px
    # (8 x 8 features) every feature sees the whole image and fg/bg cannot be told apart.
    config.optim.lr = 1e-2
    config.optim.groups.new_weight.lr_mult = 1.0
    config.optim.schedule = "step"
    config.optim.step_boundaries = (300,)
    config.train.num_steps = 400
    config.train.log_every = 10
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 1

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.split = "val"
    config.eval.cam_split = "val"
    return config
