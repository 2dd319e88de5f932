"""Images/s of the stage-1 and stage-3 training steps, and of the same stage-3 step in PyTorch.

    python bench/train_step.py                                  # stage 1: batch 20, crop 321, VGG16
    python bench/train_step.py --batch 2 --crop 129 --steps 3   # a CPU-sized run
    python bench/train_step.py --stage3 v1                      # DeepLab-V1, batch 20, crop 321
    python bench/train_step.py --stage3 v2 --dtype bfloat16     # DeepLab-V2, batch 10, crop 321
    python bench/train_step.py --stage3 v1 --model vgg_tiny --batch 2 --crop 65 --steps 2

Stage 1 (default): the jitted, data-parallel step of `bana stage1` (labeler forward + BAP loss +
backward + SGD update; the same `make_loss_fn`, optimizer groups and `jit_train_step`) on a fixed
random batch over all devices JAX sees. Boxes: `--valid-boxes` real boxes per image out of
`--max-boxes` slots (padding slots cost the same as real ones: shapes are fixed).

`--stage3 {v1,v2}`: the step of `bana stage3` with configs/voc/stage3_deeplab_{v1,v2}.py (DeepLab
forward + noise-aware loss + backward + grouped SGD) on a fixed random batch of images and
`y_crf` / `y_ret` pseudo labels (255 padding). `--batch` / `--crop` default to the config's (V1 20,
V2 10; crop 321); `--model vgg_tiny` swaps in the tiny VGG for smoke runs. Unless `--no-torch`
(or torch is not installed), the equivalent PyTorch step runs next on the device torch sees (cuda
if available, else cpu): the torch.nn reference network of bana_jax.models.torch_reference, the
same loss written in torch, SGD with momentum and the same parameter groups; bfloat16 runs it under
`torch.autocast`. float32 is true float32 in both (JAX matmul precision 'highest', torch TF32 off)
unless `--tf32` lets both use TF32.

Prints the device, dtype, the median step time after warm-up and images/s (and, for stage 3 with
torch, the same for torch and the ratio of the two images/s).
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

from bana_jax.constants import IGNORE_INDEX  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE3_CONFIGS = {"v1": "configs/voc/stage3_deeplab_v1.py",
                  "v2": "configs/voc/stage3_deeplab_v2.py"}
STAGE1_MODELS = ("vgg16_labeler", "vgg_tiny", "efficientnet_lite0_labeler")
STAGE3_MODELS = ("deeplab_v1", "deeplab_v2", "vgg_tiny")  # the ones torch_reference can mirror


def random_batch(batch: int, crop: int, max_boxes: int, valid_boxes: int, seed: int = 0) -> dict:
    """A training batch in the layout of bana_jax/data/common.py with random images and boxes."""
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


def random_stage3_batch(batch: int, crop: int, num_classes: int, seed: int = 0) -> dict:
    """A stage-3 batch (stage3.BATCH_KEYS): random images, `y_crf` and `y_ret` uint8 `(B, S, S)`.

    y_ret agrees with y_crf on ~70% of the pixels and is 255 elsewhere (the unreliable region ~S);
    the last eighth of the rows is crop padding, 255 in both. The loss costs the same for any
    label values (fixed shapes); these only make both regions non-empty.
    """
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, size=(batch, crop, crop, 3)).astype(np.float32)
    y_crf = rng.integers(0, num_classes, size=(batch, crop, crop)).astype(np.uint8)
    y_ret = np.where(rng.random((batch, crop, crop)) < 0.7, y_crf, IGNORE_INDEX).astype(np.uint8)
    pad = crop - crop // 8
    y_crf[:, pad:], y_ret[:, pad:] = IGNORE_INDEX, IGNORE_INDEX
    return {"image": image, "y_crf": y_crf, "y_ret": y_ret}


def time_steps(step_once, steps: int, warmup: int) -> dict:
    """Runs `step_once()` (one finished step, returning the loss) 1 + warmup + steps times.

    The first call includes compilation (JAX) or cuDNN autotuning (torch) and is timed apart.
    """
    t0 = time.perf_counter()
    first_loss = float(step_once())  # later steps may diverge: random init, fixed batch
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        step_once()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_once()
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "first_loss": first_loss, "times": times,
            "median": statistics.median(times)}


def print_timing(prefix: str, batch: int, timing: dict, init_s: float | None = None,
                 first: str = "first step (compile)") -> None:
    times = timing["times"]
    init = f"init {init_s:.1f} s, " if init_s is not None else ""
    print(f"{prefix}{init}{first} {timing['compile_s']:.1f} s, first loss "
          f"{timing['first_loss']:.3f}")
    print(f"{prefix}step: median {1000 * timing['median']:.1f} ms over {len(times)} steps "
          f"(min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
    print(f"{prefix}images/s: {batch / timing['median']:.2f}")


def jax_step_runner(model, loss_fn, config, batch: dict, mesh):
    """`step_once` for time_steps: the jitted `bana` train step on a replicated state."""
    from bana_jax.models import param_group_labels
    from bana_jax.train import mesh as mesh_lib
    from bana_jax.train.optim import make_optimizer
    from bana_jax.train.state import (create_train_state, jit_train_step, label_tree,
                                      make_train_step)

    labels = label_tree(nnx.state(model, nnx.Param), param_group_labels(model))
    tx, _ = make_optimizer(config.optim, int(config.train.num_steps), labels)
    graphdef, rng_template, state = create_train_state(model, tx, 0)
    holder = {"state": mesh_lib.replicate(state, mesh)}  # the step donates its input state
    step = jit_train_step(make_train_step(graphdef, rng_template, tx, loss_fn), mesh)
    batch = mesh_lib.shard_batch(batch, mesh)

    def step_once():
        holder["state"], metrics = step(holder["state"], batch)
        return jax.block_until_ready(metrics["loss"])

    return step_once


# ----------------------------------------------------------------------------------------------
# Stage 1.


def run_stage1(args, parser) -> int:
    from bana_jax import stage1
    from bana_jax.train import mesh as mesh_lib
    from bana_jax.config import apply_overrides, load_config, validate_config

    model_name = args.model or "vgg16_labeler"
    if model_name not in STAGE1_MODELS:
        parser.error(f"--model for stage 1 must be one of {STAGE1_MODELS}, got {model_name!r}")
    batch_size, crop = args.batch or 20, args.crop or 321
    overrides = [("data.batch_size", str(batch_size)), ("data.crop_size", str(crop)),
                 ("model.name", model_name), ("model.init", "none"),
                 ("model.dtype", args.dtype), ("loss.pooling", args.pooling)]
    if args.max_boxes:
        overrides.append(("data.max_boxes", str(args.max_boxes)))
    config = validate_config(apply_overrides(load_config(ROOT / "configs/voc/stage1.py"),
                                             overrides))
    mesh = mesh_lib.mesh_for_batch(batch_size)
    num_devices = int(mesh.devices.size)

    t0 = time.perf_counter()
    # A jitted init: eager init of VGG16 compiles every layer separately.
    model = nnx.jit(lambda: stage1.build_model(config))()
    init_s = time.perf_counter() - t0
    per_image = {"auto": None, "yes": True, "no": False}[args.per_image]
    loss_fn = stage1.make_loss_fn(config, num_groups=num_devices, map_over_images=per_image)
    batch = random_batch(batch_size, crop, int(config.data.max_boxes), args.valid_boxes)
    timing = time_steps(jax_step_runner(model, loss_fn, config, batch, mesh),
                        args.steps, args.warmup)
    feature = -(-crop // 8)
    auto = stage1.pools_per_image((batch_size, feature, feature, model.feature_dim),
                                  int(config.data.max_boxes))
    print(f"device: {num_devices} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    print(f"model: {model_name}, dtype {args.dtype}, pooling {args.pooling}, batch {batch_size}, "
          f"crop {crop}, box slots {config.data.max_boxes} ({args.valid_boxes} real), "
          f"per-image pooling: {auto if per_image is None else per_image}")
    print_timing("", batch_size, timing, init_s)
    return 0


# ----------------------------------------------------------------------------------------------
# Stage 3: JAX.


def stage3_config(args, parser):
    from bana_jax.config import apply_overrides, load_config, validate_config

    config = load_config(ROOT / STAGE3_CONFIGS[args.stage3])
    model_name = args.model or config.model.name
    if model_name not in STAGE3_MODELS:
        parser.error(f"--model for stage 3 must be one of {STAGE3_MODELS}, got {model_name!r}")
    overrides = [("model.name", model_name), ("model.init", "none"), ("model.dtype", args.dtype)]
    if args.batch:
        overrides.append(("data.batch_size", str(args.batch)))
    if args.crop:
        overrides.append(("data.crop_size", str(args.crop)))
    config = validate_config(apply_overrides(config, overrides))
    if config.loss.name != "nal":  # the torch mirror implements the noise-aware loss only
        parser.error(f"{STAGE3_CONFIGS[args.stage3]} has loss.name={config.loss.name!r}; "
                     "the benchmark mirrors 'nal'")
    return config


def run_jax_stage3(config, batch: dict, steps: int, warmup: int):
    """(timing, init_s, device count) of the `bana stage3` step."""
    from bana_jax import builders, stage3
    from bana_jax.train import mesh as mesh_lib

    mesh = mesh_lib.mesh_for_batch(int(config.data.batch_size))
    t0 = time.perf_counter()
    model = nnx.jit(lambda: builders.build_deeplab(config))()  # one compile, not one per layer
    init_s = time.perf_counter() - t0
    step_once = jax_step_runner(model, stage3.make_loss_fn(config), config, batch, mesh)
    return time_steps(step_once, steps, warmup), init_s, int(mesh.devices.size)


# ----------------------------------------------------------------------------------------------
# Stage 3: PyTorch.


def torch_deeplab(config):
    """The torch_reference network of `config.model.name`, with BatchNorm frozen as in JAX."""
    from torch import nn

    from bana_jax.models import torch_reference as ref
    from bana_jax.models import vgg

    num_classes = int(config.model.num_classes)
    name = config.model.name
    if name == "deeplab_v2":
        model = ref.DeepLabV2Ref(num_classes)
    else:  # VGG16 LargeFOV or its tiny version, with the config's fc6 dilation as in builders
        tiny = name == "vgg_tiny"
        model = ref.LabelerRef(num_classes, vgg.TINY_WIDTHS if tiny else vgg.VGG16_WIDTHS,
                               64 if tiny else 1024, dilation=int(config.model.fc6_dilation) or 12)
    model.train()
    if config.model.freeze_bn:  # the official freeze_bn(): BN in eval mode, scale/bias still learn
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    return model


def torch_optimizer(model, optim_config):
    """SGD with the parameter groups of the JAX side (models.param_group_label on the torch names:
    the official key names match ours; BatchNorm `weight` = our `scale`, a weight in both).

    Constant learning rates: the poly schedule only changes the lr scalars, which costs nothing.
    """
    import torch

    from bana_jax.models.networks import param_group_label

    members = {name: [] for name in optim_config.groups.keys()}
    for name, param in model.named_parameters():
        members[param_group_label(tuple(name.split(".")))].append(param)
    groups = [dict(params=params, lr=float(optim_config.lr) * float(optim_config.groups[g].lr_mult),
                   weight_decay=float(optim_config.groups[g].weight_decay))
              for g, params in members.items() if params]
    return torch.optim.SGD(groups, lr=float(optim_config.lr),
                           momentum=float(optim_config.momentum),
                           nesterov=bool(optim_config.nesterov))


def _safe_divide(num, den):
    """num / den, 0 where den == 0 (losses._safe_divide: empty regions give 0, not NaN)."""
    import torch

    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def torch_noise_aware_loss(cosine, y_crf, y_ret, *, tau: float, lam: float, gamma: float,
                           detach_sigma: bool):
    """losses.noise_aware_loss in torch, on upsampled cosines `(B, C, S, S)` and int64 labels."""
    import torch
    import torch.nn.functional as F

    labelled = y_crf != IGNORE_INDEX
    agree = y_crf == y_ret
    reliable, unreliable = agree & labelled, ~agree & labelled
    target = torch.where(labelled, y_crf, torch.zeros_like(y_crf)).unsqueeze(1)
    pixel_ce = -F.log_softmax(tau * cosine, dim=1).gather(1, target).squeeze(1)
    loss_ce = _safe_divide((pixel_ce * reliable).sum(), reliable.sum().to(cosine.dtype))
    distance = (1.0 + cosine).clamp_min(0.0)
    ratio = _safe_divide(distance.gather(1, target).squeeze(1), distance.amax(dim=1))
    sigma = torch.where(unreliable, ratio**gamma, torch.zeros_like(ratio))
    if detach_sigma:
        sigma = sigma.detach()
    loss_wce = _safe_divide((sigma * pixel_ce).sum(), sigma.sum())
    return loss_ce + lam * loss_wce


def run_torch_stage3(config, batch: dict, args):
    """(timing, device description) of the equivalent PyTorch step."""
    import torch
    import torch.nn.functional as F

    from bana_jax.models.torch_reference import cosine_scores

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # float32 means float32 (as the JAX side's 'highest'), unless --tf32; fixed shapes, so let
        # cuDNN pick its fastest algorithms as XLA autotunes its own.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = torch_deeplab(config).to(device)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch_optimizer(model, config.optim)
    image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).to(device, memory_format=layout)
    y_crf, y_ret = (torch.from_numpy(batch[k]).long().to(device) for k in ("y_crf", "y_ret"))
    crop = tuple(y_crf.shape[1:])
    loss_options = dict(tau=float(config.loss.tau), lam=float(config.loss.weight),
                        gamma=float(config.loss.gamma), detach_sigma=bool(config.loss.detach_sigma))
    bf16 = args.dtype == "bfloat16"

    def step_once():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model(image)
        # The cosine head and the loss in float32, as heads.Classifier and stage3.make_loss_fn do.
        scores = cosine_scores(features.float(), model.classifier)
        upsampled = F.interpolate(scores, size=crop, mode="bilinear", align_corners=True)
        loss = torch_noise_aware_loss(upsampled, y_crf, y_ret, **loss_options)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.detach()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    layout_name = "channels_last" if args.channels_last else "NCHW"
    return (time_steps(step_once, args.steps, args.warmup),
            f"{name} ({device.type}), torch {torch.__version__}, {layout_name}")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_stage3(args, parser) -> int:
    config = stage3_config(args, parser)
    if args.dtype == "float32" and not args.tf32:
        # JAX's default precision lets GPU convs and matmuls run in TF32; match torch's float32.
        jax.config.update("jax_default_matmul_precision", "highest")
    batch_size, crop = int(config.data.batch_size), int(config.data.crop_size)
    batch = random_stage3_batch(batch_size, crop, int(config.model.num_classes))
    use_torch = torch_available() if args.torch is None else args.torch

    timing, init_s, num_devices = run_jax_stage3(config, batch, args.steps, args.warmup)
    precision = "bfloat16 compute" if args.dtype == "bfloat16" else (
        "TF32 allowed" if args.tf32 else "no TF32")
    print(f"device: {num_devices} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    print(f"stage 3 {args.stage3}: model {config.model.name}, dtype {args.dtype} ({precision}), "
          f"batch {batch_size}, crop {crop}, loss {config.loss.name}")
    print_timing("jax:   ", batch_size, timing, init_s)
    if not use_torch:
        print("torch: skipped" + ("" if args.torch is False else " (torch is not installed)"))
        return 0
    torch_timing, torch_device = run_torch_stage3(config, batch, args)
    print(f"torch: device {torch_device}")
    print_timing("torch: ", batch_size, torch_timing, first="first step")
    devices = "" if num_devices == 1 else f" (jax on {num_devices} devices, torch on 1)"
    print(f"jax/torch images/s: {torch_timing['median'] / timing['median']:.2f}{devices}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage3", choices=tuple(STAGE3_CONFIGS), default=None,
                        help="benchmark the stage-3 step (DeepLab-V1 / V2 + noise-aware loss)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: paper, 20 for stage 1 and V1, 10 for V2)")
    parser.add_argument("--crop", type=int, default=None, help="crop size (default: paper, 321)")
    parser.add_argument("--model", default=None,
                        choices=tuple(dict.fromkeys(STAGE1_MODELS + STAGE3_MODELS)),
                        help="model.name (default: vgg16_labeler; stage 3: the config's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    stage1_group = parser.add_argument_group("stage 1")
    stage1_group.add_argument("--pooling", default="bap", choices=("bap", "gap"))
    stage1_group.add_argument("--max-boxes", type=int, default=None,
                              help="box slots per image (default: the VOC config's data.max_boxes)")
    stage1_group.add_argument("--valid-boxes", type=int, default=3, help="real boxes per image")
    stage1_group.add_argument("--per-image", choices=("auto", "yes", "no"), default="auto",
                              help="pool image by image (lax.map) or the whole batch at once")
    stage3_group = parser.add_argument_group("stage 3")
    stage3_group.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                              help="also time the PyTorch step (default: when torch imports)")
    stage3_group.add_argument("--tf32", action="store_true",
                              help="float32: let both frameworks use TF32 (default: neither)")
    stage3_group.add_argument("--channels-last", action="store_true",
                              help="torch: channels_last memory format (default: NCHW)")
    args = parser.parse_args(argv)
    return run_stage3(args, parser) if args.stage3 else run_stage1(args, parser)


if __name__ == "__main__":
    sys.exit(main())
