"""Any COCO-format folder, 20 VOC classes, stage 2: pseudo labels from a coco_subset stage-1 run.

    bana stage2 --config=configs/coco_subset/stage2.py --workdir=runs/coco128_stage2 \
        --config.data.images=/data/coco128/train2017 \
        --config.data.annotations=/data/coco128/annotations/instances_train2017.json \
        --config.pseudo.stage1_workdir=runs/coco128_stage1

Pseudo labels are scored against the masks in the annotations (as BANA does on VOC train).
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "coco_subset"
    config.data.images = ""
    config.data.annotations = ""
    config.data.classes = "voc"

    config.model.num_classes = 21          # for scoring; the network is the stage-1 run's

    config.pseudo.stage1_workdir = ""
    config.pseudo.split = "train"
    config.pseudo.use_u0 = True
    config.pseudo.save_visualisations = True
    config.pseudo.box_convention = "pixels"  # COCO boxes are not VOC XML values: each box keeps all its pixels

    config.crf.iterations = 10
    config.crf.bi_w = 4.0
    config.crf.bi_xy_std = 55.0
    config.crf.bi_rgb_std = 3.0
    config.crf.pos_w = 3.0
    config.crf.pos_xy_std = 3.0
    return config
