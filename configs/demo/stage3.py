"""Demo, stage 3: a tiny DeepLab-style network with the noise-aware loss on the synthetic data.

`bana demo` sets `model.init` to its stage-1 workdir: the box-trained labeler's trunk stands in for
the ImageNet init of the paper (from scratch, the demo's steps learn little beyond background), and
with `model.init_head` its classifier starts the DeepLab's. Run alone, pass the stage-1 workdir:
    bana stage3 --config=configs/demo/stage3.py --workdir=/tmp/demo_stage3 \
        --config.model.init=/tmp/demo_stage1 --config.data.pseudo_labels=/tmp/demo_stage2/pseudo_labels
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
    config.data.color_jitter = (1.0, 1.0)     # as stage 1: the classes differ in hue

    config.model.name = "vgg_tiny"
    config.model.init = "none"
    config.model.num_classes = 5             # background + the 4 synthetic shapes (at most 6)
    config.model.classifier = "cosine"
    config.model.dropout = 0.1
    config.model.vgg_norm = "batch"          # the stage-1 trunk's (bana demo shares the field)
    # The labeler's w_c for the same classes: from a random head, a class could end up winning no
    # pixel at all in the demo's few steps (which class, and whether, changed with the seed).
    config.model.init_head = True

    config.optim.lr = 1e-2
    config.optim.schedule = "poly"
    config.optim.step_boundaries = ()
    config.train.num_steps = 300
    config.train.log_every = 10
    config.train.checkpoint_every = 150
    config.train.keep_checkpoints = 1

    config.loss.name = "nal"
    config.eval.split = "val"
    config.eval.scales = (1.0,)
    config.eval.flip = False
    return config
