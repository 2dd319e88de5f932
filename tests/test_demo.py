"""`bana demo --shrink` end to end: all four steps on the same synthetic images, the summary
against the files each stage wrote (scored again in NumPy), the report, a resumed second run."""

import html
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bana_jax import builders, cli, demo, visualize
from bana_jax import io as bio
from bana_jax.train.config import apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "demo.py"


def numpy_miou(folder: Path, source, num_classes: int) -> float:
    """mIoU (%) of the PNGs `folder/<id>.png` against the source's labels, classes present only."""
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for index in range(len(source)):
        sample = source[index]
        pred = bio.read_label_png(folder / f"{sample['id']}.png")
        label = sample["label"]
        assert pred.shape == label.shape
        valid = label != 255
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (label == c) & valid)
            union[c] += np.sum(((pred == c) | (label == c)) & valid)
    present = union > 0
    return 100 * float(np.mean(inter[present] / union[present]))


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
    assert set(summary["miou"]) == {"box_fill", "grabcut", "y_crf", "y_ret", "deeplab"}
    assert set(summary["seconds"]) == {"stage1", "stage2", "stage3", "evaluate", "total"}
    assert summary["seconds"]["total"] >= sum(summary["seconds"][s] for s in ("stage1", "stage2", "stage3"))

    configs = demo.stage_configs(cli.resolve_config(str(DEMO), [("data.synthetic_size", "48")], shrink=True),
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
    # The stage-1 labeler and the stage-3 network have the dataset's classes.
    arch = json.loads((workdir / "stage3" / "deeplab.json").read_text())
    assert arch["model"]["num_classes"] == num_classes == len(train.class_names)


def test_shared_fields_reach_every_stage():
    config = validate_config(apply_overrides(load_config(DEMO), [
        ("data.synthetic_images", "12"), ("data.synthetic_size", "40"), ("model.num_classes", "4")]))
    configs = demo.stage_configs(config)
    for stage in ("stage2", "stage3"):
        for field in demo.SHARED_FIELDS:
            assert demo._get(configs[stage], field) == demo._get(config, field), (stage, field)
    # Dataset-independent fields stay those of each stage's file.
    assert configs["stage3"].loss.name == "nal" and configs["stage2"].pseudo.grid_size == 1


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
    assert f"{summary['miou']['y_crf']:.1f}" in text
    table = demo.format_table(summary)
    assert [line.split()[0] for line in table.splitlines()[1:6]] == ["box-fill", "GrabCut", "Y_crf", "Y_ret", "DeepLab"]


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
