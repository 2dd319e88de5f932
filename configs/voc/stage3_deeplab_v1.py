"""VOC 2012, stage 3: DeepLab-V1 (VGG16 LargeFOV) with the noise-aware loss.

    bana stage3 --config=configs/voc/stage3_deeplab_v1.py --workdir=runs/voc_v1 \
        --config.data.root=/data/VOC2012 --config.data.pseudo_labels=runs/voc_stage2/pseudo_labels
    bana evaluate --config=configs/voc/stage3_deeplab_v1.py --workdir=runs/voc_v1

lr 1e-3, batch 20, crop 321, 23805 iterations, poly 0.9; weights 1x / biases 2x / classifier 10x;
cosine classifier tau 20; NAL gamma 7, lambda 0.1. Evaluation: 4 scales x flip, CRF
`[4, 121, 5, 3, 3]`. Loss variants: --config.loss.name=ce_s|ce_crf|ce_ret|er|bs.
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "voc"
    config.data.root = ""
    config.data.split = "train_aug"
    config.data.pseudo_labels = ""
    config.data.batch_size = 20
    config.data.crop_size = 321
    config.data.scale_range = (0.5, 1.5)
    config.data.flip = True
    config.data.color_jitter = (0.5, 1.5)

    config.model.name = "deeplab_v1"
    config.model.init = "hed_vgg16"        # ImageNet VGG16 in the paper
    config.model.num_classes = 21
    config.model.fc6_dilation = 12
    config.model.dropout = 0.5
    config.model.classifier = "cosine"

    config.optim.lr = 1e-3
    config.optim.momentum = 0.9
    config.optim.schedule = "poly"
    config.optim.poly_power = 0.9
    config.optim.step_boundaries = ()
    config.optim.groups.pretrained_weight.update(lr_mult=1.0, weight_decay=5e-4)
    config.optim.groups.pretrained_bias.update(lr_mult=2.0, weight_decay=0.0)
    config.optim.groups.new_weight.update(lr_mult=10.0, weight_decay=5e-4)
    config.optim.groups.new_bias.update(lr_mult=20.0, weight_decay=0.0)

    config.train.num_steps = 23805
    config.train.log_every = 20
    config.train.checkpoint_every = 2000

    config.loss.name = "nal"
    config.loss.tau = 20.0
    config.loss.gamma = 7.0
    config.loss.weight = 0.1
    config.loss.detach_sigma = False

    config.crf.iterations = 10
    config.crf.bi_w = 4.0
    config.crf.bi_xy_std = 121.0
    config.crf.bi_rgb_std = 5.0
    config.crf.pos_w = 3.0
    config.crf.pos_xy_std = 3.0

    config.eval.split = "val"
    config.eval.scales = (1.0, 0.5, 0.75, 1.5)
    config.eval.flip = True
    config.eval.crf = True
    return config
