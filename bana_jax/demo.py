"""`bana demo`: the whole method on the embedded synthetic dataset, on the CPU, in a few minutes.

    bana demo [--workdir bana_demo] [--shrink] [--config.GROUP.FIELD=VALUE ...]

Stage 1 (tiny VGG-style labeler with BAP) -> stage 2 (Y_crf, Y_ret, box-fill and GrabCut scored on
the training images) -> stage 3 (tiny DeepLab with the noise-aware loss on the pseudo labels) ->
evaluation on the validation images, beside box-fill scored on the same validation images (the
bar a box-supervised network has to clear). The top-level config is stage 1's (the packaged
demo/demo.py); stages 2 and 3 come from demo/stage2.py and stage3.py, and take from the top level
the fields that define the dataset (SHARED_FIELDS), so every stage sees the same images and
classes. `--shrink` shrinks all three.

WORKDIR layout: stage1/, stage2/pseudo_labels/ (with visualisations/index.html), stage3/ (model,
eval_val.json, predictions), report/ (the report's prediction panels), demo_summary.json and
index.html (the report: the table, per-class IoU, seconds, the stage-1 and stage-3 training
curves, the DeepLab's predictions on a few validation images, the stage-2 panels). A second run on
the same workdir resumes each stage where it stopped.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

import numpy as np

from bana_jax import baselines, builders, evaluate, io, metrics, stage1, stage2, stage3, visualize
from bana_jax.config import CONFIGS, load_config, shrink_config, validate_config

logger = logging.getLogger("bana_jax.demo")

# Fields that must agree between the stages: they decide which images, sizes and classes exist,
# and the trunk stage 3 copies from stage 1; `--config.train.seed` reseeds the whole demo.
SHARED_FIELDS = ("data.synthetic_images", "data.synthetic_size", "data.max_boxes",
                 "data.max_images", "model.num_classes", "model.vgg_norm", "eval.max_images",
                 "crf.iterations", "train.seed", "train.compilation_cache", "train.progress_bar")
# (summary key, table row): pseudo labels are scored on the training images, DeepLab and the
# box-fill it is compared with on val.
ROWS = (("box_fill", "box-fill (train)"), ("grabcut", "GrabCut (train)"),
        ("y_crf", "Y_crf (train)"), ("y_ret", "Y_ret (train)"), ("box_fill_val", "box-fill (val)"),
        ("deeplab", "DeepLab + NAL (val)"))
PSEUDO_LABEL_ROWS = ("box_fill", "grabcut", "y_crf", "y_ret")  # from the stage-2 summary
SUMMARY_JSON = "demo_summary.json"
REPORT_DIR = "report"
REPORT_SCENES = 4  # validation images whose predictions the report shows
CURVES = (("stage1", "stage 1 (labeler, BAP) loss"), ("stage3", "stage 3 (DeepLab, NAL) loss"))


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _set(config, dotted: str, value) -> None:
    *groups, name = dotted.split(".")
    for part in groups:
        config = config[part]
    config[name] = value


def stage_configs(config, *, shrink: bool = False) -> dict:
    """{'stage1', 'stage2', 'stage3'}: the demo's three validated configs.

    `config` is the top-level (stage-1) config; stage 2 and 3 are the packaged demo configs, given
    its SHARED_FIELDS and, with `shrink`, shrunk like the top level was by the CLI.
    """
    if config.data.name != "synthetic":
        raise ValueError(f"bana demo runs on the synthetic dataset, got data.name={config.data.name!r}; "
                         "use bana stage1/stage2/stage3 for real data")
    configs = {"stage1": config}
    for stage in ("stage2", "stage3"):
        stage_config = load_config(f"demo/{stage}.py")
        if shrink:
            stage_config = shrink_config(stage_config)
        with stage_config.unlocked():
            for field in SHARED_FIELDS:
                _set(stage_config, field, _get(config, field))
        configs[stage] = validate_config(stage_config)
    return configs


def validation_source(config):
    """The images DeepLab is evaluated on: the first `eval.max_images` (0 = all) of `eval.split`."""
    return builders.data_source(config, config.eval.split, max_images=int(config.eval.max_images))


def box_fill_scores(source, num_classes: int) -> dict:
    """Box-fill (`bana_jax.baselines.box_fill`) scored on `source` (`validation_source`).

    Returns {"miou": percent, "iou": per-class percent (None where undefined), "num_images"}.
    """
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for index in range(len(source)):
        sample = source[index]
        filled = baselines.box_fill(sample["boxes"], sample["box_labels"], sample["label"].shape)
        confusion += metrics.confusion_matrix(filled, sample["label"], num_classes)
    iou = metrics.per_class_iou(confusion)
    return {"miou": 100.0 * metrics.mean_iou(confusion), "num_images": len(source),
            "iou": [None if np.isnan(v) else 100.0 * float(v) for v in iou]}


def evaluate_on_val(configs: dict, stage3_dir: Path, source) -> dict:
    """Stage 3's DeepLab (`bana_jax.evaluate`) and box-fill on the validation images (`source`).

    Returns {"deeplab": WORKDIR/stage3/eval_<split>.json's record, "box_fill": box_fill_scores}.
    """
    evaluate.main(configs["stage3"], stage3_dir)
    split = configs["stage3"].eval.split
    return {"deeplab": json.loads((stage3_dir / f"eval_{split}.json").read_text()),
            "box_fill": box_fill_scores(source, int(configs["stage3"].model.num_classes))}


def _timed(seconds: dict, name: str, fn, *args):
    start = time.perf_counter()
    logger.info("demo: %s", name)
    result = fn(*args)
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def run(configs: dict, workdir) -> dict:
    """Runs the four steps on `workdir`; returns (and writes) the demo summary."""
    workdir = Path(workdir)
    dirs = {name: workdir / name for name in ("stage1", "stage2", "stage3")}
    with configs["stage2"].unlocked():
        configs["stage2"].pseudo.stage1_workdir = str(dirs["stage1"])
    pseudo_dir = dirs["stage2"] / "pseudo_labels"
    with configs["stage3"].unlocked():
        configs["stage3"].data.pseudo_labels = str(pseudo_dir)
        if configs["stage3"].model.init == "none":  # the labeler's trunk as the pretrained init
            configs["stage3"].model.init = str(dirs["stage1"])

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    _timed(seconds, "stage1", stage1.main, configs["stage1"], dirs["stage1"])
    pseudo = _timed(seconds, "stage2", stage2.main, configs["stage2"], dirs["stage2"])
    _timed(seconds, "stage3", stage3.main, configs["stage3"], dirs["stage3"])
    val_source = validation_source(configs["stage3"])
    val = _timed(seconds, "evaluate", evaluate_on_val, configs, dirs["stage3"], val_source)
    seconds["total"] = round(time.perf_counter() - start, 1)

    deeplab = val["deeplab"]
    miou = {key: pseudo["miou"].get(key) for key in PSEUDO_LABEL_ROWS}
    miou["box_fill_val"] = val["box_fill"]["miou"]
    miou["deeplab"] = 100.0 * deeplab["miou"]
    per_class = {name: {"deeplab": None if iou is None else 100.0 * iou, "box_fill_val": fill}
                 for name, iou, fill in zip(deeplab["class_names"], deeplab["iou"], val["box_fill"]["iou"])}
    summary = {"miou": miou, "per_class_val": per_class, "seconds": seconds,
               "images": pseudo["images"], "eval_images": deeplab["num_images"],
               "seconds_per_image": pseudo["seconds_per_image"]}
    io.write_json(workdir / SUMMARY_JSON, summary)
    panels = write_prediction_panels(workdir, val_source, deeplab.get("predictions"))
    report = write_report(workdir, summary, pseudo_dir / "visualisations", panels)
    print(format_table(summary), flush=True)
    print(f"summary: {workdir / SUMMARY_JSON}\nreport:  {report}", flush=True)
    _warn_if_below(miou, "y_crf", "box_fill",
                   "stage 1 has not learned enough (more steps: --config.train.num_steps)")
    # Command-line overrides reach stage 1 only (the top-level config).
    _warn_if_below(miou, "deeplab", "box_fill_val",
                   f"stage 3 has not learned enough (more steps: train.num_steps in {CONFIGS / 'demo/stage3.py'})")
    return summary


def _warn_if_below(miou: dict, method: str, baseline: str, why: str) -> None:
    if miou[method] is not None and miou[baseline] is not None and miou[method] <= miou[baseline]:
        logger.warning("%s (%.1f) is not above %s (%.1f): %s", method, miou[method], baseline,
                       miou[baseline], why)


def _cell(value, width: int = 0) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.1f}"


def format_table(summary: dict) -> str:
    """The demo's one table: mIoU per method, DeepLab's IoU per class, then seconds per stage."""
    lines = [f"{'method':<22} mIoU (%)"]
    lines += [f"{title:<22} {_cell(summary['miou'][key], 5)}" for key, title in ROWS]
    lines.append("DeepLab IoU per class (val): " + "  ".join(
        f"{name} {_cell(scores['deeplab'])}" for name, scores in summary["per_class_val"].items()))
    lines.append("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)


def write_prediction_panels(workdir: Path, source, predictions: str | None) -> list[Path]:
    """WORKDIR/report/<id>.png for the first REPORT_SCENES images of `source` (the evaluated
    images): image, ground truth, DeepLab's prediction (`predictions/<id>.png`, written by the
    evaluation); none when `predictions` is None (eval.save_predictions off)."""
    if not predictions:
        return []
    predictions = Path(predictions)
    panels = []
    for index in range(min(REPORT_SCENES, len(source))):
        sample = source[index]
        panel, titles = visualize.prediction_panel(
            sample["image"], sample["label"], io.read_label_png(predictions / f"{sample['id']}.png"))
        path = workdir / REPORT_DIR / f"{sample['id']}.png"
        visualize.write_png(path, panel, titles)
        panels.append(path)
    return panels


def read_curve(metrics_jsonl: Path, key: str = "loss") -> list[tuple[int, float]]:
    """`(step, value)` of `key` per logged step of a `metrics.jsonl`, in step order. A resumed run
    appends to the file and may log a step again: the last record of a step wins."""
    if not metrics_jsonl.is_file():
        return []
    by_step = {}
    for line in metrics_jsonl.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if key in record:
                by_step[int(record["step"])] = float(record[key])
    return sorted(by_step.items())


def _html_table(rows) -> str:
    return "<table>" + "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                               for row in rows) + "</table>"


def _panel_html(path: Path, workdir: Path) -> str:
    # Each panel under its own column titles (stage-2 panels differ: no u_c tile for an image
    # without boxes).
    titles = html.escape(" | ".join(visualize.read_titles(path) or []))
    return (f"<h3>{html.escape(path.stem)}</h3><p>{titles}</p>"
            f"<img src=\"{html.escape(path.relative_to(workdir).as_posix())}\">")


def write_report(workdir: Path, summary: dict, visualisations: Path,
                 prediction_panels: list[Path] = ()) -> Path:
    """WORKDIR/index.html (written atomically): the mIoU table, DeepLab's and box-fill's IoU per
    class on val, the seconds, the stage-1 and stage-3 loss curves (WORKDIR/<stage>/metrics.jsonl),
    the prediction panels and the stage-2 panels."""
    per_class = [("class", "DeepLab + NAL", "box-fill")] + [
        (html.escape(name), _cell(scores["deeplab"]), _cell(scores["box_fill_val"]))
        for name, scores in summary["per_class_val"].items()]
    curves = "\n".join(visualize.svg_curve(points, title=title)
                       for points, title in ((read_curve(workdir / stage / "metrics.jsonl"), title)
                                             for stage, title in CURVES) if points)
    predictions = "\n".join(_panel_html(p, workdir) for p in prediction_panels)
    pseudo_panels = "\n".join(_panel_html(p, workdir) for p in sorted(visualisations.glob("*.png")))
    text = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>bana demo</title>"
            "<style>body{font-family:sans-serif} td{padding:2px 12px} img{max-width:100%;"
            "image-rendering:pixelated}</style></head><body>\n<h1>bana demo (synthetic data)</h1>\n"
            "<h2>mIoU (%)</h2>" + _html_table((html.escape(t), _cell(summary["miou"][k])) for k, t in ROWS)
            + "\n<h2>IoU per class on the validation images (%)</h2>" + _html_table(per_class)
            + "\n<h2>Seconds</h2>" + _html_table((html.escape(k), f"{v:.1f}") for k, v in summary["seconds"].items())
            + f"\n<h2>Training curves</h2>\n{curves}\n"
            f"<h2>DeepLab on validation images</h2>\n{predictions}\n"
            f"<h2>Pseudo labels (training images)</h2>\n{pseudo_panels}\n</body></html>\n")
    path = workdir / "index.html"
    io.write_text(path, text)
    return path


def main(config, workdir, *, shrink: bool = False) -> dict:
    """`bana demo`."""
    return run(stage_configs(config, shrink=shrink), workdir)
