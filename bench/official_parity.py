"""The official PyTorch stage 2 (cvlab-yonsei/BANA, unmodified, CPU) against `bana stage2` on the same
weights and images: pixel agreement of Y_crf / Y_ret and the speed ratio.

    python bench/official_parity.py OFFICIAL_DIR [--weights FILE.pth | --stage1 RUN] [--images 24]
        [--data ../shared/data/coco128] [--work /tmp/bana_parity] [--dump N] [--skip-official]

OFFICIAL_DIR: a local snapshot of the official repository (models/, configs/stage2.yml, stage2.py,
utils/densecrf.py, ...). Its code is GPL-3.0: it is run from its own folder, in a separate process,
never copied here. That process makes `.cuda()` a no-op and stubs the unused torchvision import
before `runpy` runs its `stage2.py` as `__main__`; nothing of it is edited. Needs torch (CPU) and
pydensecrf (the `torch` and `test` extras) and yacs (the official code's config library).

Steps (everything under --work):
1. `voc/`: the first --images photos of --data with VOC-class boxes laid out as PASCAL VOC by
   ../shared/tools/coco_to_voc.py (JPEGImages, Annotations, BgMaskfromBoxes, ...).
2. `ClsNet.pt`: the Labeler weights, an official state dict: --weights, or `bana export-torch` of a
   stage-1 run (--stage1), or by default the HED VGG16 convolutions with seeded random fc6, fc7 and
   classifier (our `model.init=hed_vgg16` build, exported).
3. The official stage 2 (its config, `DATA.ROOT` pointed at voc/), timed as one process; its labels
   are moved to `official/`. With --dump N it also records, for its first N images, the features
   (`get_features`) and the CRF input and output (`DENSE_CRF.inference`) by wrapping them at run time.
4. `bana stage2 --config=configs/voc/stage2.py --config.pseudo.labeler=ClsNet.pt` with
   `pseudo.baselines=()`, no visualisations, a compilation cache shared across runs
   (`--work/jax_cache`), twice: cold (empty cache) and warm; each timed as one process.
5. Agreement per image (mean and worst) of Y_crf and Y_ret; with --dump, where the differences come
   from: features (ours vs official, relative), the CRF input, the CRF alone (crf_ext on the official
   input vs pydensecrf's output), and Y_crf / Y_ret of our pipeline fed the official features.
Prints one table and writes `--work/parity.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_TO_VOC = SHARED / "tools" / "coco_to_voc.py"


# ------------------------------------------------------------------------------------------------
# The official stage 2, in its own process (`--official-worker`).


def official_worker(official: Path, voc_root: Path, run_dir: Path, weights: Path, dump_dir: Path | None,
                    dump_count: int) -> None:
    """Runs OFFICIAL/stage2.py as `__main__` from `run_dir` (it reads ./weights/ClsNet.pt and writes
    ./logs/); labels land in VOC/Generation/{Y_crf,Y_ret}."""
    import runpy
    import types

    import torch

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    stub = types.ModuleType("torchvision")
    stub.transforms = types.ModuleType("torchvision.transforms")
    stub.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                        "torchvision.transforms.functional": stub.transforms.functional})
    sys.path.insert(0, str(official))
    (run_dir / "weights").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    shutil.copy(weights, run_dir / "weights" / "ClsNet.pt")
    shutil.rmtree(voc_root / "Generation", ignore_errors=True)
    config = (official / "configs" / "stage2.yml").read_text()
    if '"../data/VOCdevkit/VOC2012"' not in config:
        raise SystemExit(f"{official}/configs/stage2.yml: DATA.ROOT is not the expected default")
    (run_dir / "stage2.yml").write_text(config.replace('"../data/VOCdevkit/VOC2012"', f'"{voc_root}"'))
    if dump_dir is not None:
        _record_intermediates(dump_dir, dump_count, voc_root)
    os.chdir(run_dir)
    sys.argv = ["stage2.py", "--config-file", str(run_dir / "stage2.yml")]
    runpy.run_path(str(official / "stage2.py"), run_name="__main__")


def _record_intermediates(dump_dir: Path, count: int, voc_root: Path) -> None:
    """Wraps the official `Labeler.get_features` and `DENSE_CRF.inference` (call order = image order)
    to save, for the first `count` images, features `(D, h, w)`, CRF input and output `(C, H, W)`."""
    from models.ClsNet import Labeler
    from utils.densecrf import DENSE_CRF

    ids = (voc_root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    dump_dir.mkdir(parents=True, exist_ok=True)
    calls = {"features": 0, "crf": 0}
    get_features, inference = Labeler.get_features, DENSE_CRF.inference

    def features_hook(self, x):
        out = get_features(self, x)
        if calls["features"] < count:
            np.save(dump_dir / f"{ids[calls['features']]}.features.npy", out[0].detach().numpy())
        calls["features"] += 1
        return out

    def crf_hook(self, image, prob):
        out = inference(self, image, prob)
        if calls["crf"] < count:
            np.savez(dump_dir / f"{ids[calls['crf']]}.crf.npz", prob=prob, q=out)
        calls["crf"] += 1
        return out

    Labeler.get_features, DENSE_CRF.inference = features_hook, crf_hook


# ------------------------------------------------------------------------------------------------
# Preparation.


def prepare_voc(data: Path, out: Path, images: int) -> list[str]:
    if not (out / "ImageSets" / "Segmentation" / "train_aug.txt").is_file():
        if not COCO_TO_VOC.is_file():
            raise SystemExit(f"{COCO_TO_VOC} not found: pass --voc-root with a VOC layout instead")
        subprocess.run([sys.executable, str(COCO_TO_VOC), str(data / "train2017"),
                        str(data / "annotations" / "instances_train2017.json"), str(out), str(images)], check=True)
    return (out / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()


def prepare_weights(args, work: Path) -> Path:
    from bana_jax import export_torch

    target = work / "ClsNet.pt"
    if args.weights:
        return Path(args.weights).absolute()
    if args.stage1:
        return export_torch.export(args.stage1, target)[0]
    if target.is_file():
        return target
    # HED VGG16 convs, seeded random fc6 / fc7 / classifier: the same weights on both sides.
    from bana_jax import artifacts, builders
    from bana_jax.config import base_config

    config = base_config()
    config.model.name, config.model.init, config.model.num_classes = "vgg16_labeler", "hed_vgg16", 21
    config.train.seed = args.seed
    model = artifacts.init_weights(builders.build_labeler(config), config)
    return export_torch.write_state_dict(export_torch.official_state_dict(model), target)


def timed(cmd, log: Path, env=None) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed (exit {done.returncode}); see {log}")
    return seconds


def run_ours(work: Path, voc: Path, weights: Path, name: str, log_name: str) -> float:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bana_jax.cli", "stage2", "--config=configs/voc/stage2.py", f"--workdir={out}",
           f"--config.data.root={voc}", f"--config.pseudo.labeler={weights}", "--config.pseudo.baselines=()",
           "--config.pseudo.save_visualisations=false", f"--config.train.compilation_cache={work / 'jax_cache'}",
           "--config.train.progress_bar=false", "--config.data.num_workers=0"]
    return timed(cmd, work / f"{log_name}.log")


# ------------------------------------------------------------------------------------------------
# Comparison.


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im)


def agreement(a_dir: Path, b_dir: Path, ids) -> dict:
    per_image = {}
    for image_id in ids:
        a, b = read_png(a_dir / f"{image_id}.png"), read_png(b_dir / f"{image_id}.png")
        per_image[image_id] = float((a == b).mean())
    values = list(per_image.values())
    worst = min(per_image, key=per_image.get)
    return {"mean": float(np.mean(values)), "worst": per_image[worst], "worst_id": worst, "per_image": per_image}


def diagnose(work: Path, voc: Path, ids, dump: Path, weights: Path) -> dict:
    """Where the differences come from, on the dumped images (see the module docstring)."""
    import functools

    import crf_ext

    from bana_jax import pseudo_labels as pl, stage2
    from bana_jax.data.voc import VocSource

    labeler = stage2.load_official_labeler(weights)
    extractor = stage2.FeatureExtractor(labeler)
    weight = extractor.classifier_weight
    source = VocSource(str(voc), "train_aug")
    crf = functools.partial(crf_ext.dense_crf, bi_w=4, bi_xy_std=55, bi_rgb_std=3, pos_w=3, pos_xy_std=3,
                            n_iter=10, num_threads=1)
    rows = []
    for index, image_id in enumerate(ids):
        feats_file, crf_file = dump / f"{image_id}.features.npy", dump / f"{image_id}.crf.npz"
        if not (feats_file.is_file() and crf_file.is_file()):
            continue
        sample = source[index]
        assert str(sample["id"]) == image_id
        official_features = np.load(feats_file).transpose(1, 2, 0)  # (h, w, D)
        ours, (h, w) = extractor(sample["image"])
        ours = np.asarray(ours)[:h, :w]
        recorded = np.load(crf_file)
        boxes, region = stage2.stage2_boxes(sample["boxes"], sample["image"].shape[:2], "official")
        mine = pl.pseudo_labels(ours, sample["image"], boxes, sample["box_labels"], weight, crf=crf,
                                region_boxes=region)
        theirs_in = pl.pseudo_labels(official_features, sample["image"], boxes, sample["box_labels"], weight,
                                     crf=crf, region_boxes=region)
        official = {k: read_png(work / "official" / k / f"{image_id}.png") for k in ("Y_crf", "Y_ret")}
        q_ours = crf(sample["image"], np.ascontiguousarray(recorded["prob"], np.float32))
        row = {
            "id": image_id,
            "features_rel": float(np.abs(ours - official_features).max() / np.abs(official_features).max()),
            "crf_input_max_abs": (float(np.abs(mine["probs"] - recorded["prob"]).max())
                                  if mine["probs"].shape == recorded["prob"].shape else None),
            "crf_input_argmax": (float((mine["probs"].argmax(0) == recorded["prob"].argmax(0)).mean())
                                 if mine["probs"].shape == recorded["prob"].shape else None),
            "crf_alone_argmax": float((q_ours.argmax(0) == recorded["q"].argmax(0)).mean()),
            "y_crf_official_features": float((theirs_in["y_crf"] == official["Y_crf"]).mean()),
            "y_ret_official_features": float((theirs_in["y_ret"] == official["Y_ret"]).mean()),
            "y_crf_ours": float((mine["y_crf"] == official["Y_crf"]).mean()),
            "y_ret_ours": float((mine["y_ret"] == official["Y_ret"]).mean()),
        }
        rows.append(row)
    return {"images": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("official", type=Path, help="local snapshot of cvlab-yonsei/BANA")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "coco128")
    parser.add_argument("--voc-root", type=Path, default=None, help="an existing VOC layout to use")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bana_parity"))
    parser.add_argument("--weights", default=None, help="an official Labeler state dict")
    parser.add_argument("--stage1", default=None, help="a bana stage1 run to export")
    parser.add_argument("--seed", type=int, default=0, help="seed of the default random head")
    parser.add_argument("--dump", type=int, default=0, help="record official intermediates of the first N images")
    parser.add_argument("--skip-official", action="store_true", help="reuse WORK/official from an earlier run")
    parser.add_argument("--warm-runs", type=int, default=1, help="timed runs of ours with a warm cache")
    parser.add_argument("--official-worker", nargs=5, metavar=("VOC", "RUN", "WEIGHTS", "DUMP", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    official = args.official.absolute()
    if args.official_worker:
        voc, run, weights, dump, count = args.official_worker
        official_worker(official, Path(voc), Path(run), Path(weights), Path(dump) if dump != "-" else None, int(count))
        return
    if not (official / "stage2.py").is_file() or not (official / "models" / "ClsNet.py").is_file():
        raise SystemExit(f"{official} is not a snapshot of cvlab-yonsei/BANA (no stage2.py, models/ClsNet.py)")
    missing = [name for name in ("torch", "pydensecrf", "yacs") if importlib.util.find_spec(name) is None]
    if missing and not args.skip_official:
        raise SystemExit(f"the official stage 2 needs {', '.join(missing)}: pip install -e \".[torch,test]\" yacs")
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    voc = (args.voc_root or work / "voc").absolute()
    ids = prepare_voc(args.data.absolute(), voc, args.images) if args.voc_root is None else \
        (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    weights = prepare_weights(args, work)
    n = len(ids)
    load = os.getloadavg()
    times = {}
    if not args.skip_official:
        dump = work / "dump" if args.dump else None
        times["official"] = timed([sys.executable, str(Path(__file__).absolute()), str(official), "--official-worker",
                                   str(voc), str(work / "official_run"), str(weights), str(dump or "-"),
                                   str(args.dump)], work / "official.log")
        shutil.rmtree(work / "official", ignore_errors=True)
        shutil.move(str(voc / "Generation"), str(work / "official"))
        (work / "official_seconds.json").write_text(json.dumps({"seconds": times["official"], "images": n}))
    else:
        times["official"] = json.loads((work / "official_seconds.json").read_text())["seconds"]
    shutil.rmtree(work / "jax_cache", ignore_errors=True)
    times["ours_cold"] = run_ours(work, voc, weights, "ours", "ours_cold")
    warm = [run_ours(work, voc, weights, "ours", f"ours_warm{i}") for i in range(args.warm_runs)]
    times["ours_warm"] = float(np.median(warm))
    labels = work / "ours" / "pseudo_labels"
    result = {"images": n, "load_average_at_start": load, "seconds": times,
              "seconds_per_image": {k: v / n for k, v in times.items()},
              "speed_ratio": {k: times["official"] / times[k] for k in ("ours_cold", "ours_warm")},
              "y_crf": agreement(work / "official" / "Y_crf", labels / "Y_crf", ids),
              "y_ret": agreement(work / "official" / "Y_ret", labels / "Y_ret", ids)}
    summary = json.loads((labels / "summary.json").read_text())
    result["ours_seconds_per_image"] = summary["seconds_per_image"]
    if args.dump:
        result["diagnosis"] = diagnose(work, voc, ids, work / "dump", weights)
    (work / "parity.json").write_text(json.dumps(result, indent=2))
    print(f"{n} images ({args.data.name if args.voc_root is None else voc}), load average at start "
          f"{load[0]:.1f}")
    for key in ("y_crf", "y_ret"):
        r = result[key]
        print(f"{key}: agreement mean {100 * r['mean']:.3f}%, worst image {100 * r['worst']:.2f}% ({r['worst_id']})")
    sp = result["seconds_per_image"]
    print(f"seconds per image (process wall, incl. start-up): official {sp['official']:.2f}, ours cold cache "
          f"{sp['ours_cold']:.2f} ({result['speed_ratio']['ours_cold']:.2f}x), warm {sp['ours_warm']:.2f} "
          f"({result['speed_ratio']['ours_warm']:.2f}x)")
    for row in result.get("diagnosis", {}).get("images", []):
        print("  " + "  ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
