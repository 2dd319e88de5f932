"""`bana demo --shrink` end to end: all four steps on the same synthetic images, the summary
against the files each stage wrote (scored again in NumPy), the report (tables, training curves,
prediction panels), a resumed second run. Whether the full demo's DeepLab beats box-fill is
measured by bench/demo.py, not here: a shrunken run trains too little to say."""

import html
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bana_jax import baselines, builders, cli, demo, visualize
from bana_jax import io as bio
from bana_jax.config import apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "demo.py"


def numpy_ious(predict, source, num_classes: int) -> np.ndarray:
    """IoU (%) per class of `predict(sample)` against the source's labels, NaN for absent classes."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for index in range(len(source)):
        sample = source[index]
        pred = predict(sample)
        label = sample["label"]
        assert pred.shape == label.shape
        valid = label != 255
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (label == c) & valid)
            union[c] += np.sum(((pred == c) | (label == c)) & valid)
    with np.errstate(invalid="ignore"):
        return 100 * inter / union


def numpy_miou(folder: Path, source, num_classes: int) -> float:
    """mIoU (%) of the PNGs `folder/<id>.png` against the source's labels, classes present only."""
    return float(np.nanmean(numpy_ious(lambda s: bio.read_label_png(folder / f"{s['id']}.png"),
                                       source, num_classes)))


def box_fill_ious(source, num_classes: int) -> np.ndarray:
    return numpy_ious(lambda s: baselines.box_fill(s["boxes"], s["box_labels"], s["label"].shape),
                      source, num_classes)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    cache = Path(os.environ.get("BANA_TEST_JAX_CACHE", Path(tempfile.gettempdir()) / "bana_jax_test_jax_cache"))
    workdir = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--shrink", "--workdir", str(workdir), "--config.data.synthetic_size=48",
            "--config.data.crop_size=48", f"--config.train.compilation_cache={cache}",
            "--config.train.progress_bar=false"]
    assert cli.main(argv) == 0
    return workdir, argv


def test_summary_matches_what_the_stages_wrote(demo_run):
    workdir, _ = demo_run
    summary = json.loads((workdir / demo.SUMMARY_JSON).read_text())
    assert set(summary["miou"]) == {"box_fill", "grabcut", "y_crf", "y_ret", "box_fill_val", "deeplab"}
    assert set(summary["seconds"]) == {"stage1", "stage2", "stage3", "evaluate", "total"}
    assert summary["seconds"]["total"] >= sum(summary["seconds"][s] for s in ("stage1", "stage2", "stage3"))

    configs = demo.stage_configs(cli.resolve_config(str(DEMO), ["--config.data.synthetic_size=48"], shrink=True),
                                 shrink=True)
    num_classes = configs["stage1"].model.num_classes
    train = builders.data_source(configs["stage2"], "train")
    val = builders.data_source(configs["stage3"], "val", max_images=int(configs["stage3"].eval.max_images))
    assert summary["images"] == len(train) and summary["eval_images"] == len(val)
    pseudo = workdir / "stage2" / "pseudo_labels"
    # Scored again here from the PNGs: a wrong split, dataset or class count in any stage shows.
    assert summary["miou"]["y_crf"] == pytest.approx(numpy_miou(pseudo / "Y_crf", train, num_classes), abs=1e-6)
    assert summary["miou"]["y_ret"] == pytest.approx(numpy_miou(pseudo / "Y_ret", train, num_classes), abs=1e-6)
    assert summary["miou"]["grabcut"] == pytest.approx(
        numpy_miou(pseudo / "baselines" / "grabcut", train, num_classes), abs=1e-6)
    assert summary["miou"]["deeplab"] == pytest.approx(
        numpy_miou(workdir / "stage3" / "predictions" / "val", val, num_classes), abs=1e-6)
    # Box-fill is scored on the validation images DeepLab is, not on the training ones.
    fill_val = box_fill_ious(val, num_classes)
    assert summary["miou"]["box_fill_val"] == pytest.approx(float(np.nanmean(fill_val)), abs=1e-6)
    assert summary["miou"]["box_fill"] == pytest.approx(float(np.nanmean(box_fill_ious(train, num_classes))), abs=1e-6)
    deeplab_val = numpy_ious(lambda s: bio.read_label_png(workdir / "stage3" / "predictions" / "val" / f"{s['id']}.png"),
                             val, num_classes)
    names = builders.class_names(configs["stage3"])
    assert sorted(summary["per_class_val"]) == sorted(names)  # JSON keys come back sorted
    for c, name in enumerate(names):
        for key, expected in (("deeplab", deeplab_val[c]), ("box_fill_val", fill_val[c])):
            got = summary["per_class_val"][name][key]
            assert (got is None) if np.isnan(expected) else got == pytest.approx(expected, abs=1e-6), (name, key)
    # The stage-1 labeler and the stage-3 network have the dataset's classes.
    arch = json.loads((workdir / "stage3" / "model.json").read_text())
    assert arch["model"]["num_classes"] == num_classes == len(train.class_names)


def test_shared_fields_reach_every_stage():
    config = validate_config(apply_overrides(load_config(DEMO), [
        ("data.synthetic_images", "12"), ("data.synthetic_size", "40"), ("model.num_classes", "4")]))
    configs = demo.stage_configs(config)
    for stage in ("stage2", "stage3"):
        for field in demo.SHARED_FIELDS:
            assert demo._get(configs[stage], field) == demo._get(config, field), (stage, field)
    # Dataset-independent fields stay those of each stage's file.
    assert configs["stage3"].loss.name == "nal" and configs["stage2"].pseudo.use_u0


def test_real_data_is_refused():
    config = validate_config(apply_overrides(load_config(DEMO), [("data.name", "voc")]))
    with pytest.raises(ValueError, match="synthetic"):
        demo.stage_configs(config)


def test_report_and_table(demo_run):
    workdir, _ = demo_run
    text = (workdir / "index.html").read_text()
    summary = json.loads((workdir / demo.SUMMARY_JSON).read_text())
    panels = sorted((workdir / "stage2" / "pseudo_labels" / "visualisations").glob("*.png"))
    assert panels, "stage 2 wrote no visualisation panels"
    for panel in panels:
        # Each panel is shown under its own column titles.
        titles = " | ".join(visualize.read_titles(panel))
        assert f'<p>{html.escape(titles)}</p><img src="{panel.relative_to(workdir).as_posix()}"' in text
    for key, title in demo.ROWS:
        assert f"<tr><td>{html.escape(title)}</td><td>{summary['miou'][key]:.1f}</td></tr>" in text, title
    # IoU per class on val: a row per class, in class-id order (the JSON's keys are sorted).
    configs = demo.stage_configs(cli.resolve_config(str(DEMO), ["--config.data.synthetic_size=48"], shrink=True),
                                 shrink=True)
    rows = [f"<tr><td>{name}</td><td>{demo._cell(summary['per_class_val'][name]['deeplab'])}</td>"
            f"<td>{demo._cell(summary['per_class_val'][name]['box_fill_val'])}</td></tr>"
            for name in builders.class_names(configs["stage3"])]
    positions = [text.find(row) for row in rows]
    assert -1 not in positions and positions == sorted(positions), rows
    table = demo.format_table(summary)
    assert [line.split()[0] for line in table.splitlines()[1:7]] == [
        "box-fill", "GrabCut", "Y_crf", "Y_ret", "box-fill", "DeepLab"]
    assert "box-fill (val)" in table.splitlines()[5]


def test_report_shows_predictions_beside_the_ground_truth(demo_run):
    """The first validation images, each as image | ground truth | the DeepLab's saved prediction."""
    workdir, _ = demo_run
    text = (workdir / "index.html").read_text()
    configs = demo.stage_configs(cli.resolve_config(str(DEMO), ["--config.data.synthetic_size=48"], shrink=True),
                                 shrink=True)
    val = builders.data_source(configs["stage3"], "val", max_images=int(configs["stage3"].eval.max_images))
    shown = min(demo.REPORT_SCENES, len(val))
    assert shown >= 2
    for index in range(shown):
        sample = val[index]
        path = workdir / demo.REPORT_DIR / f"{sample['id']}.png"
        assert f'<img src="{demo.REPORT_DIR}/{sample["id"]}.png">' in text
        assert visualize.read_titles(path) == list(visualize.PREDICTION_COLUMNS)
        panel = np.asarray(Image.open(path).convert("RGB"))
        height, width = sample["label"].shape
        tiles = [panel[:, i * (width + 4):i * (width + 4) + width] for i in range(3)]
        assert panel.shape == (height, 3 * width + 2 * 4, 3)
        prediction = bio.read_label_png(workdir / "stage3" / "predictions" / "val" / f"{sample['id']}.png")
        np.testing.assert_array_equal(tiles[0], sample["image"])
        np.testing.assert_array_equal(tiles[1], visualize.colorize(sample["label"]))
        np.testing.assert_array_equal(tiles[2], visualize.colorize(prediction))
    assert text.count(f'<img src="{demo.REPORT_DIR}/') == shown


def svg_vertices(svg: str) -> np.ndarray:
    points = re.search(r'<polyline[^>]* points="([^"]*)"', svg).group(1)
    return np.array([[float(v) for v in pair.split(",")] for pair in points.split()])


def test_report_shows_the_training_curves(demo_run):
    """One curve per stage with a vertex per logged step of its metrics.jsonl, in step order."""
    workdir, _ = demo_run
    text = (workdir / "index.html").read_text()
    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.S)
    assert len(svgs) == len(demo.CURVES) == 2
    for svg, (stage, title) in zip(svgs, demo.CURVES):
        assert html.escape(title) in svg
        metrics = workdir / stage / "metrics.jsonl"
        logged = {json.loads(line)["step"] for line in metrics.read_text().splitlines()}
        curve = demo.read_curve(metrics)
        assert [step for step, _ in curve] == sorted(logged)
        vertices = svg_vertices(svg)
        assert len(vertices) == len(curve) >= 2
        assert np.all(np.diff(vertices[:, 0]) > 0)
        # The lowest loss is drawn lowest (the largest y in SVG coordinates).
        assert np.argmax(vertices[:, 1]) == np.argmin([loss for _, loss in curve])


def test_read_curve_keeps_the_last_record_of_a_step(tmp_path):
    """A resumed run appends to metrics.jsonl and may log a step again."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 10, "loss": 2.5, "lr": 1.0},
             {"step": 30, "lr": 0.1}, {"step": 20, "loss": 1.5}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert demo.read_curve(path) == [(10, 2.5), (20, 1.5)]
    assert demo.read_curve(tmp_path / "missing.jsonl") == []


def test_svg_curve_maps_the_range_onto_the_plot():
    svg = visualize.svg_curve([(0, 1.0), (50, 3.0), (100, 2.0)], title="loss <a>", width=200, height=100)
    assert "loss &lt;a&gt;" in svg and svg.startswith("<svg") and svg.endswith("</svg>")
    vertices = svg_vertices(svg)
    rect = re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
    left, top, width, height = (float(v) for v in rect.groups())
    np.testing.assert_allclose(vertices[:, 0], [left, left + width / 2, left + width])
    np.testing.assert_allclose(vertices[:, 1], [top + height, top, top + height / 2])
    flat = svg_vertices(visualize.svg_curve([(5, 1.0)], title="one"))
    assert flat.shape == (1, 2) and np.all(np.isfinite(flat))
    with pytest.raises(ValueError, match="at least one point"):
        visualize.svg_curve([], title="none")


def test_second_run_resumes(demo_run, capsys):
    """Every stage finds its finished output: nothing is recomputed, the numbers are the same."""
    workdir, argv = demo_run
    before = json.loads((workdir / demo.SUMMARY_JSON).read_text())
    assert cli.main(argv) == 0
    after = json.loads((workdir / demo.SUMMARY_JSON).read_text())
    assert after["miou"] == before["miou"]
    assert "Y_crf (train)" in capsys.readouterr().out
    pseudo_summary = json.loads((workdir / "stage2" / "pseudo_labels" / "summary.json").read_text())
    assert pseudo_summary["computed"] == 0 and pseudo_summary["skipped"] == after["images"]
