"""Any COCO-format folder (images + instances json), the 20 VOC classes, stage 1: the CPU recipe.

    bana stage1 --config=configs/coco_subset/stage1.py --workdir=runs/coco128_stage1 \
        --config.data.images=/data/coco128/train2017 \
        --config.data.annotations=/data/coco128/annotations/instances_train2017.json

COCO categories that are VOC classes are mapped to them; other boxes are dropped. The recipe for a
small set on a CPU (docs/RESULTS.md has its figures and an ablation of each choice):
- ImageNet EfficientNet-Lite0 at output stride 8 (dilated last stages, 320-d features), frozen:
  its features are computed once per training image and view and cached in WORKDIR/feature_cache
  (bana_jax.stage1_frozen), and only the BAP classifier trains, 2000 steps in seconds;
- views: each image at long sides 640, 448 and 320, padded square, and mirrored;
- images drawn uniformly: class-balanced sampling (`data.class_balanced=true`) scored lower on
  coco128 and the same on coco_mini (docs/RESULTS.md, ablation).
The paper's recipe (VGG16, every layer trained, random crops) is configs/voc/stage1.py; here it is
`--config.model.freeze_backbone=false --config.model.name=vgg16_labeler
--config.model.init=hed_vgg16` with a crop size and a learning rate for that network.
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "coco_subset"
    config.data.images = ""
    config.data.annotations = ""
    config.data.classes = "voc"
    config.data.batch_size = 16                # views per step
    config.data.max_boxes = 32
    config.data.num_workers = 2
    config.data.class_balanced = False
    config.data.view_sizes = (640, 448, 320)   # the first view also gives the box accuracy

    config.model.name = "efficientnet_lite0_labeler"
    config.model.init = "imagenet"
    config.model.num_classes = 21
    config.model.freeze_backbone = True

    config.optim.lr = 1e-3                     # x10 for the classifier (optim.groups.new_weight)
    config.optim.schedule = "poly"
    config.optim.step_boundaries = ()
    config.train.num_steps = 2000
    config.train.log_every = 100
    config.train.checkpoint_every = 1000

    config.loss.pooling = "bap"
    config.loss.grid_size = 4
    config.eval.cam_split = "train"
    return config
