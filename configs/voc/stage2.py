"""VOC 2012 + SBD, stage 2: pseudo labels Y_crf and Y_ret from a trained stage-1 network.

    bana stage2 --config=configs/voc/stage2.py --workdir=runs/voc_stage2 \
        --config.data.root=/data/VOC2012 --config.pseudo.stage1_workdir=runs/voc_stage1

Eval mode, full-resolution images, batch 1, one background prototype (grid 1), DenseCRF with the
official `[bi_w 4, bi_xy_std 55, bi_rgb_std 3, pos_w 3, pos_xy_std 3]`, 10 iterations.
`--config.pseudo.use_u0=false` gives the "without u_0" ablation.
"""

from bana_jax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "voc"
    config.data.root = ""

    config.model.num_classes = 21          # for scoring; the network is the stage-1 run's

    config.pseudo.stage1_workdir = ""
    config.pseudo.split = "train_aug"
    config.pseudo.use_u0 = True
    config.pseudo.output_dir = ""          # -> WORKDIR/pseudo_labels
    config.pseudo.save_visualisations = True
    config.pseudo.box_convention = "official"  # the official code's box pixels (bana_jax.baselines.official_half_open_boxes)

    config.crf.iterations = 10
    config.crf.bi_w = 4.0
    config.crf.bi_xy_std = 55.0
    config.crf.bi_rgb_std = 3.0
    config.crf.pos_w = 3.0
    config.crf.pos_xy_std = 3.0

    return config
