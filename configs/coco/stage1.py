"""MS-COCO 2017, stage 1: BAP classifier over the 80 COCO classes (+ background).

    bana stage1 --config=configs/coco/stage1.py --workdir=runs/coco_stage1 \
        --config.data.root=/data/coco2017

Optimisation as VOC stage 1 (the paper gives no separate COCO schedule); boxes per image are
capped at `data.max_boxes` (COCO images have up to ~90 objects).
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "coco"
    config.data.root = ""                  # folder with train2017/ and annotations/
    config.data.split = "train2017"
    config.data.classes = "coco"
    config.data.batch_size = 20
    config.data.crop_size = 321
    config.data.max_boxes = 100

    config.model.name = "vgg16_labeler"
    config.model.init = "hed_vgg16"
    config.model.num_classes = 81
    config.model.fc6_dilation = 1

    config.optim.lr = 1e-3
    config.optim.schedule = "step"
    config.optim.step_boundaries = (5000,)
    config.train.num_steps = 8000
    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.split = "val2017"
    config.eval.cam_split = "val2017"
    return config
