"""One-shot GPU check: every GPU figure the project wants, in one run of at most ~8 minutes.

    python bench/gpu_check.py [--out DIR]        # on a machine with one GPU (JAX and torch on CUDA)
    python bench/gpu_check.py --cpu-smoke        # the same code paths at tiny shapes on the CPU

Measures, in this order (the most wanted first, so a run cut short by `--budget-s` still has them):
- train-step throughput (images/s), JAX vs PyTorch, at the paper's batch and crop: stage 1 (VGG16
  labeler + BAP loss, batch 20, crop 321), stage 3 DeepLab-V1 (batch 20) and DeepLab-V2 (batch 10,
  crop 321), float32 first (true float32 in both: JAX precision 'highest', torch TF32 off), then
  bfloat16 (JAX `model.dtype=bfloat16`, torch `autocast`). JAX: the jitted `bana` step
  (bench/train_step.py); PyTorch: the torch.nn reference networks of
  bana_jax.models.torch_reference with the same loss, SGD groups and random batch. The PyTorch
  stage-1 step pools box by box in a Python loop, as the official code does.
- stage 2: `generate_pseudo_labels` on VOC-sized images (500 x 375, 3 boxes) with the VGG16
  labeler: median seconds per image of the device part ("features": backbone + unaries +
  retrieval) and of the DenseCRF (CPU), and wall seconds per image (compiled, second run).
- evaluation: `evaluate_model` of a DeepLab-V1 on VOC-sized labelled images, with the config's
  settings (4 scales x flip + CRF) and single-scale without CRF (the device part): seconds/image.

Needs the project installed with its dependencies (`pip install -e ".[torch]"`: ml-collections,
grain and the built `crf_ext` come with it; on a machine without network, bring their wheels).
Weights and data are random (times do not depend on them; no dataset is needed). Writes
`gpu_check.json` (every figure, the versions and the device) and `gpu_check.md` (a table) to
`--out`, and prints the table. A measurement that fails is recorded with its error and the run
goes on. `--cpu-smoke` (CI): tiny models (the tiny VGG stands in for VGG16 and ResNet-101), batch 2,
crop 65, 64 x 48 images, one timed step: it checks the code paths, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

if "--cpu-smoke" in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
# JAX and torch share the GPU: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import train_step as ts  # noqa: E402  (bench/train_step.py)

# As the `bana` command line does (bana_jax.cli): the steps measured are the ones `bana` runs (the
# partitionable threefry lowering also compiles several times slower on the CPU).
try:
    jax.config.update("jax_threefry_partitionable", False)
except AttributeError:  # a JAX without the option: only the partitionable lowering is left
    pass

# Paper settings (configs/voc): stage 1 and V1 batch 20, V2 batch 10, crop 321.
PAPER = {"stage1": (20, 321), "v1": (20, 321), "v2": (10, 321)}
VOC_IMAGE = (375, 500)  # height, width of a typical VOC 2012 image


def mode_settings(smoke: bool) -> SimpleNamespace:
    if smoke:
        return SimpleNamespace(batch={"stage1": 2, "v1": 2, "v2": 2}, crop=65, steps=1, warmup=0,
                               stage1_model="vgg_tiny", stage3_model="vgg_tiny", image=(48, 64),
                               stage2_images=2, eval_images=2, eval_scales=(1.0, 0.5), runs=1)
    return SimpleNamespace(batch={k: v[0] for k, v in PAPER.items()}, crop=321, steps=10, warmup=2,
                           stage1_model="vgg16_labeler", stage3_model=None, image=VOC_IMAGE,
                           stage2_images=8, eval_images=8, eval_scales=None, runs=2)


def set_float32_precision(dtype: str) -> None:
    # float32 means float32 on the GPU (no TF32) in both frameworks, as bench/train_step.py does.
    jax.config.update("jax_default_matmul_precision", "highest" if dtype == "float32" else None)


def numpy_init(build):
    """The module `build()` makes, with He-normal kernels drawn by NumPy on its abstract shapes:
    no initialiser is compiled (a jitted VGG16 / ResNet-101 init costs a compilation per
    measurement; the times do not depend on the values). BatchNorm scale and variance 1."""
    import jax.numpy as jnp

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(0)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        if name in ("scale", "var"):
            return jnp.ones(x.shape, x.dtype)
        if len(x.shape) >= 2 and jnp.issubdtype(x.dtype, jnp.floating):
            std = np.sqrt(2.0 / max(1, int(np.prod(x.shape[:-1]))))
            return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)
        return jnp.zeros(x.shape, x.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Train steps


def stage1_config(settings, dtype: str):
    from bana_jax.config import apply_overrides, load_config, validate_config

    batch = settings.batch["stage1"]
    overrides = [("data.batch_size", str(batch)), ("data.crop_size", str(settings.crop)),
                 ("model.name", settings.stage1_model), ("model.init", "none"), ("model.dtype", dtype)]
    return validate_config(apply_overrides(load_config(ROOT / "configs/voc/stage1.py"), overrides))


def jax_stage1(config, batch: dict, steps: int, warmup: int) -> dict:
    from bana_jax import stage1
    from bana_jax.train import mesh as mesh_lib

    mesh = mesh_lib.mesh_for_batch(int(config.data.batch_size))
    model = numpy_init(lambda: stage1.build_model(config))
    loss_fn = stage1.make_loss_fn(config, num_groups=int(mesh.devices.size))
    timing = ts.time_steps(ts.jax_step_runner(model, loss_fn, config, batch, mesh), steps, warmup)
    return {**timing, "devices": int(mesh.devices.size)}


def jax_stage3(config, batch: dict, steps: int, warmup: int) -> dict:
    from bana_jax import builders, stage3
    from bana_jax.train import mesh as mesh_lib

    mesh = mesh_lib.mesh_for_batch(int(config.data.batch_size))
    model = numpy_init(lambda: builders.build_deeplab(config))
    step_once = ts.jax_step_runner(model, stage3.make_loss_fn(config), config, batch, mesh)
    return {**ts.time_steps(step_once, steps, warmup), "devices": int(mesh.devices.size)}


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_stage1(config, batch: dict, steps: int, warmup: int, dtype: str) -> dict:
    """The stage-1 step in PyTorch: LabelerRef backbone (autocast for bfloat16), BAP vectors and
    classifier in float32 (as the JAX loss), box by box as the official code, SGD groups."""
    import torch
    import torch.nn.functional as F

    from bana_jax import stage1
    from bana_jax.models import torch_reference as ref
    from bana_jax.models import vgg

    device = torch_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    tiny = config.model.name == "vgg_tiny"
    model = ref.LabelerRef(int(config.model.num_classes), vgg.TINY_WIDTHS if tiny else vgg.VGG16_WIDTHS,
                           64 if tiny else 1024, dilation=int(config.model.fc6_dilation) or 1)
    model = model.to(device).train()
    optimizer = ts.torch_optimizer(model, config.optim)
    valid = batch["box_valid"]
    image = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous().to(device)
    boxes = torch.from_numpy(batch["boxes"][valid]).to(device)
    box_labels = torch.from_numpy(batch["box_labels"][valid]).long().to(device)
    batch_of_box = torch.from_numpy(np.nonzero(valid)[0]).to(device)
    bg_mask = torch.from_numpy(batch["bg_mask"]).to(device)
    options = stage1.loss_options(config)  # grid_size, pooling, gap_fallback_bg_fraction, roi_output
    bf16 = dtype == "bfloat16"

    def step_once():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model.backbone(image)
        out = ref.stage1_vectors_ref(features.float(), bg_mask, boxes, batch_of_box, **options)
        vectors = torch.cat([out["fg_vectors"].flatten(0, 1), out["bg_vectors"]])
        logits = model.classifier(vectors[:, :, None, None]).flatten(1)
        windows = out["fg_vectors"].shape[1]
        targets = torch.cat([box_labels.repeat_interleave(windows),
                             torch.zeros(len(out["bg_vectors"]), dtype=torch.long, device=device)])
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss.detach()

    return ts.time_steps(step_once, steps, warmup)


def stage3_config(settings, arch: str, dtype: str):
    from bana_jax.config import apply_overrides, load_config, validate_config

    config = load_config(ROOT / ts.STAGE3_CONFIGS[arch])
    overrides = [("model.init", "none"), ("model.dtype", dtype),
                 ("data.batch_size", str(settings.batch[arch])), ("data.crop_size", str(settings.crop))]
    if settings.stage3_model:
        overrides.append(("model.name", settings.stage3_model))
    return validate_config(apply_overrides(config, overrides))


def train_measurements(settings, dtype: str):
    """(name, stage, framework, run) for the six train steps of one dtype."""
    out = []
    for stage in ("stage1", "v1", "v2"):
        def run(framework, stage=stage):
            set_float32_precision(dtype)
            if stage == "stage1":
                config = stage1_config(settings, dtype)
                batch = ts.random_batch(int(config.data.batch_size), int(config.data.crop_size),
                                        int(config.data.max_boxes), valid_boxes=3)
                if framework == "jax":
                    return jax_stage1(config, batch, settings.steps, settings.warmup), config
                return torch_stage1(config, batch, settings.steps, settings.warmup, dtype), config
            config = stage3_config(settings, stage, dtype)
            batch = ts.random_stage3_batch(int(config.data.batch_size), int(config.data.crop_size),
                                           int(config.model.num_classes))
            if framework == "jax":
                return jax_stage3(config, batch, settings.steps, settings.warmup), config
            args = SimpleNamespace(tf32=False, channels_last=False, dtype=dtype,
                                   steps=settings.steps, warmup=settings.warmup)
            timing, _ = ts.run_torch_stage3(config, batch, args)
            return timing, config

        for framework in ("jax", "torch"):
            out.append((f"{stage}/{dtype}/{framework}", stage, framework,
                        lambda framework=framework, run=run: run(framework)))
    return out


def train_record(name, stage, framework, dtype, result) -> dict:
    timing, config = result
    batch = int(config.data.batch_size)
    return {"name": name, "kind": "train_step", "stage": stage, "framework": framework, "dtype": dtype,
            "model": config.model.name, "batch": batch, "crop": int(config.data.crop_size),
            "devices": timing.get("devices", 1), "compile_s": timing["compile_s"],
            "step_s_median": timing["median"], "step_s": timing["times"],
            "images_per_s": batch / timing["median"], "first_loss": timing["first_loss"]}


# ----------------------------------------------------------------------------------------------
# Stage 2 and evaluation on random VOC-sized images


class ListSource:
    def __init__(self, samples, class_names):
        self.samples, self.class_names = samples, class_names

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def random_samples(count: int, hw: tuple[int, int], num_classes: int, seed: int = 0) -> list[dict]:
    """Images of size `hw` with 3 boxes each (inclusive pixels), and a label map inside them."""
    rng = np.random.default_rng(seed)
    height, width = hw
    samples = []
    for i in range(count):
        image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        label = np.zeros((height, width), np.uint8)
        boxes, labels = [], []
        for _ in range(3):
            x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            x1 = int(rng.integers(x0 + 4, width))
            y1 = int(rng.integers(y0 + 4, height))
            cls = int(rng.integers(1, num_classes))
            boxes.append([x0, y0, x1, y1])
            labels.append(cls)
            label[y0 + (y1 - y0) // 4:y1 - (y1 - y0) // 4, x0 + (x1 - x0) // 4:x1 - (x1 - x0) // 4] = cls
        samples.append({"id": f"img{i:03d}", "image": image, "boxes": np.array(boxes, np.float32),
                        "box_labels": np.array(labels, np.int64), "label": label})
    return samples


def random_labeler(name: str, num_classes: int):
    from bana_jax import builders
    from bana_jax.config import base_config

    config = base_config()
    config.model.name, config.model.init, config.model.num_classes = name, "none", num_classes
    return numpy_init(lambda: builders.build_labeler(config))


def stage2_measurement(settings, out_dir: Path) -> dict:
    """generate_pseudo_labels on the same images `settings.runs` times (the first run compiles),
    the last timed."""
    from bana_jax import stage2
    from bana_jax.config import base_config

    set_float32_precision("float32")
    num_classes = 21
    labeler = random_labeler(settings.stage1_model, num_classes)
    config = base_config()
    config.model.num_classes = num_classes
    samples = random_samples(settings.stage2_images, settings.image, num_classes)
    names = tuple(f"class_{c}" for c in range(num_classes))
    runs = []
    for attempt in range(settings.runs):  # into a fresh folder each time (else all is done)
        start = time.perf_counter()
        summary = stage2.generate_pseudo_labels(labeler, ListSource(samples, names), config,
                                                out_dir / f"stage2_run{attempt}", baselines=(),
                                                progress=False, report=False)
        runs.append((time.perf_counter() - start, summary))
    first_s, (wall_s, summary) = runs[0][0], runs[-1]
    seconds = summary["seconds_per_image"]
    return {"name": "stage2/float32/jax", "kind": "stage2", "model": settings.stage1_model,
            "images": len(samples), "image_hw": list(settings.image),
            "features_s_per_image": seconds["features"], "features_s_mean": seconds["features_mean"],
            "crf_s_per_image": seconds["crf"], "retrieval_s_per_image": seconds["retrieval"],
            "wall_s_per_image": wall_s / len(samples), "first_run_s": first_s,
            "cpu_workers": os.cpu_count()}


def eval_measurement(settings, full: bool) -> dict:
    """evaluate_model of a random DeepLab-V1 `settings.runs` times on the same images (the first
    compiles), the last timed."""
    from bana_jax import builders
    from bana_jax.evaluate import evaluate_model
    from bana_jax.config import apply_overrides, load_config, validate_config

    set_float32_precision("float32")
    overrides = [("model.init", "none")]
    if settings.stage3_model:
        overrides.append(("model.name", settings.stage3_model))
    if settings.eval_scales:
        overrides.append(("eval.scales", ",".join(map(str, settings.eval_scales))))
    if not full:
        overrides += [("eval.scales", "1.0"), ("eval.flip", "false"), ("eval.crf", "false")]
    config = validate_config(apply_overrides(load_config(ROOT / ts.STAGE3_CONFIGS["v1"]), overrides))
    model = numpy_init(lambda: builders.build_deeplab(config))
    num_classes = int(config.model.num_classes)
    samples = random_samples(settings.eval_images, settings.image, num_classes, seed=1)
    source = ListSource(samples, tuple(f"class_{c}" for c in range(num_classes)))
    times = []
    for _ in range(settings.runs):
        start = time.perf_counter()
        result = evaluate_model(model, source, config, progress=False)
        times.append(time.perf_counter() - start)
    name = "eval_msf_crf" if full else "eval_single_scale"
    return {"name": f"{name}/float32/jax", "kind": "eval", "model": config.model.name,
            "images": result["num_images"], "image_hw": list(settings.image),
            "scales": list(config.eval.scales), "flip": bool(config.eval.flip), "crf": bool(config.eval.crf),
            "s_per_image": times[-1] / len(samples), "first_run_s": times[0]}


# ----------------------------------------------------------------------------------------------
# Report


def environment() -> dict:
    info = {"python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "jax_devices": [d.device_kind for d in jax.devices()],
            "host": platform.node(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except ImportError:
        info["torch"] = None
    return info


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({report['mode']})", "",
             f"JAX {env['jax']} on {', '.join(sorted(set(env['jax_devices'])))} "
             f"({env['jax_backend']}); PyTorch {env.get('torch')} on {env.get('torch_device')}; "
             f"{report['total_s']:.0f} s in all.", "",
             "| train step | dtype | model | batch x crop | JAX img/s | PyTorch img/s | JAX / PyTorch |",
             "|---|---|---|---|---|---|---|"]
    records = {r["name"]: r for r in report["results"]}
    fmt = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    for dtype in ("float32", "bfloat16"):
        for stage in ("stage1", "v1", "v2"):
            j = records.get(f"{stage}/{dtype}/jax", {})
            t = records.get(f"{stage}/{dtype}/torch", {})
            if not j and not t:
                continue
            ji, ti = j.get("images_per_s"), t.get("images_per_s")
            ratio = ji / ti if ji and ti else None
            model = j.get("model") or t.get("model") or "?"
            shape = f"{j.get('batch', t.get('batch', '?'))} x {j.get('crop', t.get('crop', '?'))}"
            lines.append(f"| {stage} | {dtype} | {model} | {shape} | {fmt(ji)} | {fmt(ti)} | {fmt(ratio)} |")
    lines += ["", "| other | seconds per image | detail |", "|---|---|---|"]
    s2 = records.get("stage2/float32/jax")
    if s2 and "error" not in s2:
        lines.append(f"| stage 2 features ({s2['image_hw'][1]} x {s2['image_hw'][0]}, {s2['model']}) | "
                     f"{fmt(s2['features_s_per_image'], '.3f')} | CRF {fmt(s2['crf_s_per_image'], '.3f')} s "
                     f"(one CPU thread), wall {fmt(s2['wall_s_per_image'], '.3f')} s/image with "
                     f"{s2['cpu_workers']} CPU workers |")
    for key in ("eval_msf_crf/float32/jax", "eval_single_scale/float32/jax"):
        e = records.get(key)
        if e and "error" not in e:
            lines.append(f"| evaluation {e['model']}, scales {e['scales']}, flip {e['flip']}, CRF {e['crf']} | "
                         f"{fmt(e['s_per_image'], '.3f')} | {e['images']} images of "
                         f"{e['image_hw'][1]} x {e['image_hw'][0]} |")
    failed = [r for r in report["results"] if "error" in r]
    if failed:
        lines += ["", "Not measured:"] + [f"- {r['name']}: {r['error'].splitlines()[-1]}" for r in failed]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU (CI): the code paths, not the figures")
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no measurement after this many seconds (default 360: with the "
                             "longest measurement, ~2 minutes of compiling, the run stays under 8)")
    parser.add_argument("--only", default="", help="comma-separated name prefixes to run (e.g. stage1,v2)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch steps")
    parser.add_argument("--compilation-cache", default="",
                        help="JAX persistent compilation cache folder (compile times then shrink on a rerun)")
    args = parser.parse_args(argv)
    if args.compilation_cache:
        from bana_jax.train.loop import configure_compilation_cache

        configure_compilation_cache(args.compilation_cache, args.out)
    smoke = args.cpu_smoke
    if not smoke and jax.default_backend() != "gpu":
        parser.error(f"JAX sees no GPU (backend {jax.default_backend()!r}); use --cpu-smoke for a CPU run")
    settings = mode_settings(smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # (name, run, record) in order of priority.
    plan = []
    for dtype in ("float32", "bfloat16"):
        plan += [(name, run, lambda result, name=name, stage=stage, framework=framework, dtype=dtype:
                  train_record(name, stage, framework, dtype, result))
                 for name, stage, framework, run in train_measurements(settings, dtype)]
        if dtype == "float32":  # the stage-2 and evaluation figures before the bfloat16 steps
            plan += [("stage2/float32/jax", lambda: stage2_measurement(settings, out), lambda r: r),
                     ("eval_msf_crf/float32/jax", lambda: eval_measurement(settings, True), lambda r: r),
                     ("eval_single_scale/float32/jax", lambda: eval_measurement(settings, False), lambda r: r)]
    only = tuple(p for p in args.only.split(",") if p)
    start = time.perf_counter()
    results = []
    for name, run, record in plan:
        if (only and not name.startswith(only)) or (args.no_torch and name.endswith("/torch")):
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            results.append({"name": name, "error": f"skipped: time budget of {args.budget_s:.0f} s spent"})
            continue
        print(f"[{elapsed:6.1f} s] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            entry = record(run())
        except Exception as err:  # noqa: BLE001 - one failed figure must not cost the others
            traceback.print_exc()
            entry = {"name": name, "error": f"{type(err).__name__}: {err}"}
        entry["seconds"] = time.perf_counter() - t0
        results.append(entry)
        jax.clear_caches()  # compiled steps of the previous measurement hold device memory
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
    report = {"mode": "cpu-smoke" if smoke else "gpu", "environment": environment(),
              "total_s": time.perf_counter() - start, "results": results}
    write_atomic(out / "gpu_check.json", json.dumps(report, indent=2))
    table = markdown(report)
    write_atomic(out / "gpu_check.md", table)
    print(table)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
