"""Any COCO-format folder (images + instances json), the 20 VOC classes, stage 1.

    bana stage1 --config=configs/coco_subset/stage1.py --workdir=runs/coco128_stage1 \
        --config.data.images=../shared/data/coco128/train2017 \
        --config.data.annotations=../shared/data/coco128/annotations/instances_train2017.json

COCO categories that are VOC classes are mapped to them; other boxes are dropped. The paper's
VGG16 trunk with the offline HED-VGG16 conv init, sized for a CPU: batch 4, crop 161, 150 steps
(about 10 minutes on 2 cores; docs/RESULTS.md). EfficientNet-Lite0
(`--config.model.name=efficientnet_lite0_labeler --config.model.init=imagenet`) is lighter in
FLOPs but about 2x slower per image on XLA:CPU (its depthwise convolutions); on a GPU use the
paper's batch 20 and crop 321.
"""

from bana_jax.train.config import base_config


def get_config():
    config = base_config()
    config.stage = "stage1"
    config.data.name = "coco_subset"
    config.data.images = ""
    config.data.annotations = ""
    config.data.classes = "voc"
    config.data.batch_size = 4
    config.data.crop_size = 161
    config.data.max_boxes = 32
    config.data.num_workers = 2

    config.model.name = "vgg16_labeler"
    config.model.init = "hed_vgg16"
    config.model.num_classes = 21

    config.optim.lr = 5e-4
    # fc6/fc7 start from scratch here (HED has no fc layers) and their outputs are large: the
    # official 10x classifier rate diverged (NaN by step 20 with lr 1e-3); 1x / 2x and 5e-4 do not.
    config.optim.groups.new_weight.lr_mult = 1.0
    config.optim.groups.new_bias.lr_mult = 2.0
    config.optim.schedule = "step"
    config.optim.step_boundaries = (100,)
    config.train.num_steps = 150
    config.train.log_every = 10
    config.train.checkpoint_every = 50

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.cam_split = "train"
    return config
