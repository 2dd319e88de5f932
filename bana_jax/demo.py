"""`bana demo`: the whole method on the embedded synthetic dataset, on the CPU, in a few minutes.

    bana demo [--workdir bana_demo] [--shrink] [--config.GROUP.FIELD=VALUE ...]

Stage 1 (tiny VGG-style labeler with BAP) -> stage 2 (Y_crf, Y_ret, box-fill and GrabCut scored on
the training images) -> stage 3 (tiny DeepLab with the noise-aware loss on the pseudo labels) ->
evaluation on the validation images. The top-level config is stage 1's (configs/demo/demo.py);
stages 2 and 3 come from configs/demo/stage2.py and stage3.py, and take from the top level the
fields that define the dataset (SHARED_FIELDS), so every stage sees the same images and classes.
`--shrink` shrinks all three.

WORKDIR layout: stage1/, stage2/pseudo_labels/ (with visualisations/index.html), stage3/ (model,
eval_val.json, predictions), demo_summary.json and index.html (the report). A second run on the
same workdir resumes each stage where it stopped.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

from bana_jax import io, visualize
from bana_jax.train.config import load_config, shrink_config, validate_config

logger = logging.getLogger("bana_jax.demo")

DEMO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
# Fields that must agree between the stages: they decide which images, sizes and classes exist.
SHARED_FIELDS = ("data.synthetic_images", "data.synthetic_size", "data.max_boxes",
                 "data.max_images", "model.num_classes", "eval.max_images", "crf.iterations",
                 "train.compilation_cache", "train.progress_bar")
# (summary key, table row): pseudo labels are scored on the training images, DeepLab on val.
ROWS = (("box_fill", "box-fill (train)"), ("grabcut", "GrabCut (train)"),
        ("y_crf", "Y_crf (train)"), ("y_ret", "Y_ret (train)"), ("deeplab", "DeepLab + NAL (val)"))
SUMMARY_JSON = "demo_summary.json"


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

    `config` is the top-level (stage-1) config; stage 2 and 3 are read from DEMO_CONFIGS, given
    its SHARED_FIELDS and, with `shrink`, shrunk like the top level was by the CLI.
    """
    if config.data.name != "synthetic":
        raise ValueError(f"bana demo runs on the synthetic dataset, got data.name={config.data.name!r}; "
                         "use bana stage1/stage2/stage3 for real data")
    configs = {"stage1": config}
    for stage in ("stage2", "stage3"):
        path = DEMO_CONFIGS / f"{stage}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: bana demo needs the repository's configs/demo/ "
                                    "(install with pip install -e . from a clone)")
        stage_config = load_config(path)
        if shrink:
            stage_config = shrink_config(stage_config)
        with stage_config.unlocked():
            for field in SHARED_FIELDS:
                _set(stage_config, field, _get(config, field))
        configs[stage] = validate_config(stage_config)
    return configs


def _timed(seconds: dict, name: str, fn, *args):
    start = time.perf_counter()
    logger.info("demo: %s", name)
    result = fn(*args)
    seconds[name] = round(time.perf_counter() - start, 1)
    return result


def run(configs: dict, workdir) -> dict:
    """Runs the four steps on `workdir`; returns (and writes) the demo summary."""
    from bana_jax import evaluate, stage1, stage2, stage3

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
    _timed(seconds, "evaluate", evaluate.main, configs["stage3"], dirs["stage3"])
    seconds["total"] = round(time.perf_counter() - start, 1)

    split = configs["stage3"].eval.split
    evaluation = json.loads((dirs["stage3"] / f"eval_{split}.json").read_text())
    miou = {key: pseudo["miou"].get(key) for key, _ in ROWS if key != "deeplab"}
    miou["deeplab"] = 100.0 * evaluation["miou"]
    summary = {"miou": miou, "seconds": seconds, "images": pseudo["images"],
               "eval_images": evaluation["num_images"],
               "seconds_per_image": pseudo["seconds_per_image"]}
    io.write_json(workdir / SUMMARY_JSON, summary)
    report = write_report(workdir, summary, pseudo_dir / "visualisations")
    print(format_table(summary), flush=True)
    print(f"summary: {workdir / SUMMARY_JSON}\nreport:  {report}", flush=True)
    if miou["y_crf"] is not None and miou["box_fill"] is not None and miou["y_crf"] <= miou["box_fill"]:
        logger.warning("Y_crf (%.1f) is not above box-fill (%.1f): stage 1 has not learned enough "
                       "(more steps: --config.train.num_steps)", miou["y_crf"], miou["box_fill"])
    return summary


def _cell(value, width: int = 0) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.1f}"


def format_table(summary: dict) -> str:
    """The demo's one table: mIoU per method, then seconds per stage."""
    lines = [f"{'method':<22} mIoU (%)"]
    lines += [f"{title:<22} {_cell(summary['miou'][key], 5)}" for key, title in ROWS]
    lines.append("seconds: " + "  ".join(f"{k} {v:.1f}" for k, v in summary["seconds"].items()))
    return "\n".join(lines)


def write_report(workdir: Path, summary: dict, visualisations: Path) -> Path:
    """WORKDIR/index.html: the table, the seconds and the stage-2 panels (written atomically)."""
    def table(rows) -> str:
        return "<table>" + "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td></tr>" for a, b in rows) + "</table>"

    # Each panel's own column titles (panels differ: no u_c tile for an image without boxes).
    panels = "\n".join(f"<h3>{html.escape(p.stem)}</h3><p>{html.escape(' | '.join(visualize.read_titles(p) or []))}"
                       f"</p><img src=\"{html.escape(p.relative_to(workdir).as_posix())}\">"
                       for p in sorted(visualisations.glob("*.png")))
    text = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>bana demo</title>"
            "<style>body{font-family:sans-serif} td{padding:2px 12px} img{max-width:100%;"
            "image-rendering:pixelated}</style></head><body>\n<h1>bana demo (synthetic data)</h1>\n"
            "<h2>mIoU (%)</h2>" + table((t, _cell(summary["miou"][k])) for k, t in ROWS) + "\n"
            "<h2>Seconds</h2>" + table((k, f"{v:.1f}") for k, v in summary["seconds"].items()) + "\n"
            f"<h2>Pseudo labels</h2>\n{panels}\n</body></html>\n")
    path = workdir / "index.html"
    io.write_text(path, text)
    return path


def main(config, workdir, *, shrink: bool = False) -> dict:
    """`bana demo`."""
    return run(stage_configs(config, shrink=shrink), workdir)
