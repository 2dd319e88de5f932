"""VOC 2012 + SBD, stage 1: the BAP classification network, paper / official-code values.

    bana stage1 --config=configs/voc/stage1.py --workdir=runs/voc_stage1 \
        --config.data.root=/data/VOC2012

Field reference: bana_jax/config.py. `--config.loss.pooling=gap` trains the GAP baseline.
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()

    config.data.name = "voc"
    config.data.root = ""                 # VOC2012 folder with JPEGImages/, Annotations/, ...
    config.data.split = "train_aug"       # 10582 images
    config.data.batch_size = 20
    config.data.crop_size = 321
    config.data.scale_range = (0.5, 1.5)
    config.data.flip = True
    config.data.color_jitter = (0.5, 1.5)  # brightness, contrast, saturation

    # DeepLab "vgg16_20M" trunk, fc6 dilation 1, 1024-d fc7, dropout 0.5, 21-way dot classifier.
    # The official init is ImageNet VGG16; the offline default is the HED-finetuned VGG16
    # (set a path to a converted DeepLab init for an exact reproduction).
    config.model.name = "vgg16_labeler"
    config.model.init = "hed_vgg16"
    config.model.num_classes = 21
    config.model.fc6_dilation = 1
    config.model.dropout = 0.5
    config.model.classifier = "dot"

    config.optim.lr = 1e-3
    config.optim.momentum = 0.9
    config.optim.schedule = "step"
    config.optim.step_boundaries = (5000,)
    config.optim.step_gamma = 0.1
    config.optim.groups.pretrained_weight.update(lr_mult=1.0, weight_decay=5e-4)
    config.optim.groups.pretrained_bias.update(lr_mult=2.0, weight_decay=0.0)
    config.optim.groups.new_weight.update(lr_mult=10.0, weight_decay=5e-4)
    config.optim.groups.new_bias.update(lr_mult=20.0, weight_decay=0.0)

    config.train.num_steps = 8000
    config.train.log_every = 20
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.loss.gap_fallback_bg_fraction = 0.125
    config.loss.roi_windows = 2

    config.eval.cam_split = "train_aug"
    return config
