"""Images/s of the stage-1 training step (labeler forward + BAP loss + backward + SGD update).

    python bench/train_step.py                                  # paper: batch 20, crop 321, VGG16
    python bench/train_step.py --batch 2 --crop 129 --steps 3   # a CPU-sized run

Runs the jitted, data-parallel step of `bana stage1` (the same `make_loss_fn`, optimizer groups and
`jit_train_step`) on a fixed random batch over all devices JAX sees, and prints the device, dtype,
the median step time after warm-up and images/s. Boxes: `--valid-boxes` real boxes per image out
of `--max-boxes` slots (padding slots cost the same as real ones: shapes are fixed).

`--stage3 {v1,v2}` (DeepLab + noise-aware loss) is not written yet.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def random_batch(batch: int, crop: int, max_boxes: int, valid_boxes: int, seed: int = 0) -> dict:
    """A training batch in the HELPERS.md layout with random images and boxes."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, size=(batch, crop, crop, 3)).astype(np.float32)
    boxes = np.zeros((batch, max_boxes, 4), np.float32)
    bg_mask = np.ones((batch, crop, crop), np.float32)
    for b in range(batch):
        for k in range(min(valid_boxes, max_boxes)):
            x0, y0 = rng.integers(0, crop // 2, size=2)
            x1, y1 = x0 + rng.integers(8, crop // 2, size=2)
            bg_mask[b, y0:y1 + 1, x0:x1 + 1] = 0
            boxes[b, k] = np.array([x0, y0, x1, y1]) / ((crop - 1) / 2) - 1
    box_valid = np.arange(max_boxes)[None].repeat(batch, 0) < valid_boxes
    box_labels = np.where(box_valid, rng.integers(1, 21, size=(batch, max_boxes)), 0)
    return {"image": image, "bg_mask": bg_mask, "boxes": boxes,
            "box_labels": box_labels.astype(np.int32), "box_valid": box_valid}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=20, help="global batch (paper: 20)")
    parser.add_argument("--crop", type=int, default=321, help="crop size (paper: 321)")
    parser.add_argument("--model", default="vgg16_labeler",
                        choices=("vgg16_labeler", "vgg_tiny", "efficientnet_lite0_labeler"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--pooling", default="bap", choices=("bap", "gap"))
    parser.add_argument("--max-boxes", type=int, default=None,
                        help="box slots per image (default: the VOC config's data.max_boxes)")
    parser.add_argument("--valid-boxes", type=int, default=3, help="real boxes per image")
    parser.add_argument("--per-image", choices=("auto", "yes", "no"), default="auto",
                        help="pool image by image (lax.map) or the whole batch at once")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--stage3", choices=("v1", "v2"), default=None,
                        help="benchmark the stage-3 step instead (not written yet)")
    args = parser.parse_args(argv)
    if args.stage3:
        parser.error("--stage3 is not implemented yet (stage 3 is benchmarked by its own helper)")

    from bana_jax import stage1
    from bana_jax.models import param_group_labels
    from bana_jax.train import mesh as mesh_lib
    from bana_jax.train.config import apply_overrides, load_config, validate_config
    from bana_jax.train.optim import make_optimizer
    from bana_jax.train.state import (create_train_state, jit_train_step, label_tree,
                                      make_train_step)

    root = Path(__file__).resolve().parents[1]
    overrides = [("data.batch_size", str(args.batch)), ("data.crop_size", str(args.crop)),
                 ("model.name", args.model), ("model.init", "none"),
                 ("model.dtype", args.dtype), ("loss.pooling", args.pooling)]
    if args.max_boxes:
        overrides.append(("data.max_boxes", str(args.max_boxes)))
    config = validate_config(apply_overrides(load_config(root / "configs/voc/stage1.py"),
                                             overrides))
    devices = jax.devices()
    mesh = stage1.mesh_for_batch(args.batch)
    num_devices = int(mesh.devices.size)

    t0 = time.perf_counter()
    # Shapes only, then a jitted init: eager init of VGG16 compiles every layer separately.
    stage1.ensure_differentiable_pools()
    model = nnx.jit(lambda: stage1.build_model(config))()
    init_s = time.perf_counter() - t0
    per_image = {"auto": None, "yes": True, "no": False}[args.per_image]
    loss_fn = stage1.make_loss_fn(config, num_groups=num_devices, map_over_images=per_image)
    labels = label_tree(nnx.state(model, nnx.Param), param_group_labels(model))
    tx, _ = make_optimizer(config.optim, int(config.train.num_steps), labels)
    graphdef, rng_template, state = create_train_state(model, tx, 0)
    state = mesh_lib.replicate(state, mesh)
    step = jit_train_step(make_train_step(graphdef, rng_template, tx, loss_fn), mesh)
    batch = mesh_lib.shard_batch(
        random_batch(args.batch, args.crop, int(config.data.max_boxes), args.valid_boxes), mesh)

    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    first_loss = float(metrics["loss"])  # later steps may diverge: random init, fixed batch
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    feature = -(-args.crop // 8)
    auto = stage1.pools_per_image((args.batch, feature, feature, model.feature_dim),
                                  int(config.data.max_boxes))
    print(f"device: {num_devices} x {devices[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    print(f"model: {args.model}, dtype {args.dtype}, pooling {args.pooling}, batch {args.batch}, "
          f"crop {args.crop}, box slots {config.data.max_boxes} ({args.valid_boxes} real), "
          f"per-image pooling: {auto if per_image is None else per_image}")
    print(f"init {init_s:.1f} s, first step (compile) {compile_s:.1f} s, first loss "
          f"{first_loss:.3f}")
    print(f"step: median {1000 * median:.1f} ms over {args.steps} steps "
          f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
    print(f"images/s: {args.batch / median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
