"""VOC 2012, stage 3: DeepLab-V2 (ResNet-101 + ASPP) with the noise-aware loss.

    bana stage3 --config=configs/voc/stage3_deeplab_v2.py --workdir=runs/voc_v2 \
        --config.data.root=/data/VOC2012 --config.data.pseudo_labels=runs/voc_stage2/pseudo_labels \
        --config.model.init=/path/to/deeplab_resnet101_init.pth

lr 2.5e-4, batch 10, crop 321, 20000 iterations, poly 0.9; backbone 1x, ASPP + classifier 10x
(weight decay 5e-4 on every trained parameter: the backbone has no conv biases and its BatchNorm
is frozen by default); cosine classifier tau 20; evaluation CRF `[4, 67, 3, 3, 1]`.
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "voc"
    config.data.root = ""
    config.data.split = "train_aug"
    config.data.pseudo_labels = ""
    config.data.batch_size = 10
    config.data.crop_size = 321
    config.data.scale_range = (0.5, 1.5)
    config.data.flip = True
    config.data.color_jitter = (0.5, 1.5)

    config.model.name = "deeplab_v2"
    # No offline ResNet-101 weights ship with pip: pass the official ImageNet init (a PyTorch file
    # with the official key names) on the command line; "none" trains from scratch.
    config.model.init = "none"
    config.model.num_classes = 21
    config.model.classifier = "cosine"
    config.model.freeze_bn = True

    config.optim.lr = 2.5e-4
    config.optim.momentum = 0.9
    config.optim.schedule = "poly"
    config.optim.poly_power = 0.9
    config.optim.step_boundaries = ()
    config.optim.groups.pretrained_weight.update(lr_mult=1.0, weight_decay=5e-4)
    config.optim.groups.pretrained_bias.update(lr_mult=1.0, weight_decay=5e-4)
    config.optim.groups.new_weight.update(lr_mult=10.0, weight_decay=5e-4)
    config.optim.groups.new_bias.update(lr_mult=10.0, weight_decay=5e-4)

    config.train.num_steps = 20000
    config.train.log_every = 20
    config.train.checkpoint_every = 2000

    config.loss.name = "nal"
    config.loss.tau = 20.0
    config.loss.gamma = 7.0
    config.loss.weight = 0.1
    config.loss.detach_sigma = False

    config.crf.iterations = 10
    config.crf.bi_w = 4.0
    config.crf.bi_xy_std = 67.0
    config.crf.bi_rgb_std = 3.0
    config.crf.pos_w = 3.0
    config.crf.pos_xy_std = 1.0

    config.eval.split = "val"
    config.eval.scales = (1.0, 0.5, 0.75, 1.5)
    config.eval.flip = True
    config.eval.crf = True
    return config
