"""Any COCO-format folder (images + instances json), the 20 VOC classes, stage 1.

    bana stage1 --config=configs/coco_subset/stage1.py --workdir=runs/coco128_stage1 \
        --config.data.images=../shared/data/coco128/train2017 \
        --config.data.annotations=../shared/data/coco128/annotations/instances_train2017.json

COCO categories that are VOC classes are mapped to them; other boxes are dropped. A light
ImageNet-derived backbone (EfficientNet-Lite0) so that a CPU run takes tens of minutes; switch to
`--config.model.name=vgg16_labeler --config.model.init=hed_vgg16` for the paper's trunk.
"""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage1"
    config.data.name = "coco_subset"
    config.data.images = ""
    config.data.annotations = ""
    config.data.classes = "voc"
    config.data.batch_size = 8
    config.data.crop_size = 321
    config.data.max_boxes = 64
    config.data.num_workers = 2

    config.model.name = "efficientnet_lite0_labeler"
    config.model.init = "imagenet"
    config.model.num_classes = 21

    config.optim.lr = 1e-3
    config.optim.schedule = "step"
    config.optim.step_boundaries = (600,)
    config.train.num_steps = 1000
    config.train.log_every = 10
    config.train.checkpoint_every = 200

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.cam_split = "train"
    return config
