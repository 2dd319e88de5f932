"""The stage-2 runner on synthetic images with a tiny labeler: outputs, resume, a killed run, the
summary against a NumPy computation from the written PNGs, the box convention, bucketing."""

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import crf_ext
from bana_jax import artifacts
from bana_jax import io as bio
from bana_jax import models, stage2
from bana_jax import pseudo_labels as pl
from bana_jax.data.synthetic import SyntheticSource
from bana_jax.data.transforms import caffe_normalize
from bana_jax.config import ConfigError, base_config

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4  # background + 3 synthetic shapes
SIZE = 48
NUM_SYNTHETIC = 6
RECT = (10, 12, 29, 35)  # rows 10..29, cols 12..35 (inclusive) of the hand-built rectangle image


def make_config():
    config = base_config()
    config.model.num_classes = NUM_CLASSES
    config.pseudo.box_convention = "pixels"  # the tests below check which pixels a box covers
    return config


def make_labeler(seed=0, num_classes=NUM_CLASSES):
    """The tiny labeler with He-normal weights from NumPy: an eager random init would compile every
    initialiser (tens of seconds on a busy CPU); the shapes alone cost nothing."""
    abstract = nnx.eval_shape(lambda: models.Labeler("tiny", num_classes, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def fill(x):
        if len(x.shape) >= 2:
            return rng.normal(0, np.sqrt(2 / np.prod(x.shape[:-1])), x.shape).astype(x.dtype)
        return rng.uniform(0, 0.1, x.shape).astype(x.dtype)  # biases

    params = jax.tree.map(lambda x: jnp.asarray(fill(x)), params)
    rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else jnp.zeros(x.shape, x.dtype), rest)
    return nnx.merge(graphdef, params, rest)


def rectangle_sample():
    """A flat rectangle of class 2 on a textured background, its tight inclusive box."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 60, (SIZE, SIZE, 3)).astype(np.uint8)
    y0, x0, y1, x1 = RECT
    image[y0:y1 + 1, x0:x1 + 1] = (200, 40, 40)
    label = np.zeros((SIZE, SIZE), np.uint8)
    label[y0:y1 + 1, x0:x1 + 1] = 2
    return dict(image=image, boxes=np.array([[x0, y0, x1, y1]], np.float32),
                box_labels=np.array([2], np.int32), label=label, id="rectangle")


def full_box_sample():
    """A box covering the whole image: no background pixel anywhere."""
    image = np.random.default_rng(6).integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
    label = np.full((SIZE, SIZE), 255, np.uint8)
    return dict(image=image, boxes=np.array([[0, 0, SIZE - 1, SIZE - 1]], np.float32),
                box_labels=np.array([1], np.int32), label=label, id="full_box")


def no_box_sample():
    image = np.random.default_rng(7).integers(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)
    return dict(image=image, boxes=np.zeros((0, 4), np.float32), box_labels=np.zeros(0, np.int32),
                label=np.zeros((SIZE, SIZE), np.uint8), id="no_box")


class ListSource:
    def __init__(self, samples, class_names=None):
        self.samples, self.class_names = samples, class_names

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def synthetic_samples():
    source = SyntheticSource(num_images=NUM_SYNTHETIC, image_size=SIZE, num_classes=NUM_CLASSES - 1)
    return [source[i] for i in range(NUM_SYNTHETIC)], source.class_names


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    samples, names = synthetic_samples()
    samples += [rectangle_sample(), no_box_sample()]
    out = tmp_path_factory.mktemp("stage2") / "pseudo_labels"
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(samples, names), make_config(), out,
                                            workers=2, progress=False)
    return dict(samples=samples, names=names, out=out, summary=summary)


def read(out, kind, image_id):
    return bio.read_label_png(out / kind / f"{image_id}.png")


def check_panel_titles(vis, samples):
    """index.html gives every panel its own titles: the image without boxes has no u_c tile, so
    its titles are one column shorter than its neighbours'; each matches its panel's width."""
    html = (vis / "index.html").read_text()
    full = list(stage2.visualize.PANEL_COLUMNS)
    without_boxes = [t for t in full if t != "max_c u_c"]
    for sample in samples:
        titles = without_boxes if sample["id"] == "no_box" else full
        assert stage2.visualize.read_titles(vis / f"{sample['id']}.png") == titles
        with Image.open(vis / f"{sample['id']}.png") as panel:  # tiles of SIZE px, 4 px apart
            assert panel.size[0] == len(titles) * SIZE + (len(titles) - 1) * 4
        entry = html.split(f"<h3>{sample['id']}</h3>\n<p>", 1)[1].split("</p>", 1)[0]
        assert entry == " | ".join(titles), sample["id"]


def test_each_panel_carries_its_own_titles(run, tmp_path):
    # The no-box image comes last: the titles of the last result must not spread to the others.
    assert run["samples"][-1]["id"] == "no_box"
    check_panel_titles(run["out"] / "visualisations", run["samples"])
    # A rerun that computes nothing lists the earlier run's panels, with their own titles.
    out = tmp_path / "pseudo_labels"
    shutil.copytree(run["out"], out)
    (out / "visualisations" / "index.html").unlink()
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(run["samples"], run["names"]), make_config(),
                                            out, workers=1, progress=False, baselines=("box_fill",))
    assert summary["skipped"] == len(run["samples"])
    check_panel_titles(out / "visualisations", run["samples"])


def test_outputs_are_palette_pngs_of_present_classes(run):
    for sample in run["samples"]:
        for kind in ("Y_crf", "Y_ret"):
            path = run["out"] / kind / f"{sample['id']}.png"
            with Image.open(path) as image:
                assert image.mode == "P"
                palette = np.array(image.getpalette()[:768], np.uint8).reshape(256, 3)
                values = np.array(image)
            np.testing.assert_array_equal(palette, bio.voc_palette())
            assert values.shape == sample["image"].shape[:2]
            assert set(np.unique(values)) <= {0, *sample["box_labels"].tolist()}
            # A class appears only inside its own boxes (inclusive coordinates).
            for cls in np.unique(values[values > 0]):
                inside = np.zeros(values.shape, bool)
                for (x0, y0, x1, y1), c in zip(sample["boxes"].astype(int), sample["box_labels"]):
                    if c == cls:
                        inside[y0:y1 + 1, x0:x1 + 1] = True
                assert not np.any((values == cls) & ~inside)
    assert np.all(read(run["out"], "Y_crf", "no_box") == 0)
    vis = run["out"] / "visualisations"
    html = (vis / "index.html").read_text()
    for sample in run["samples"]:
        assert f'src="{sample["id"]}.png"' in html and (vis / f"{sample['id']}.png").is_file()


def test_labels_match_pseudo_labels_on_the_same_features(run):
    """The runner (bucketed, pooled) gives the labels of `pseudo_labels` on the image's own features."""
    labeler = make_labeler()
    labeler.eval()
    weight = np.asarray(labeler.classifier.weight)
    crf = functools.partial(crf_ext.dense_crf, bi_w=4, bi_xy_std=55, bi_rgb_std=3, pos_w=3, pos_xy_std=3,
                            n_iter=10)
    same = total = 0
    for sample in run["samples"][:3] + [run["samples"][NUM_SYNTHETIC]]:
        features = np.asarray(labeler(jnp.asarray(caffe_normalize(sample["image"])[None])))[0]
        half_open = sample["boxes"] + np.array([0, 0, 1, 1], np.float32)
        # The runner's bucket sizes, so the compiled functions are shared (the padding is proven
        # not to matter in test_pseudo_labels).
        expected = pl.pseudo_labels(features, sample["image"], half_open, sample["box_labels"], weight, crf=crf,
                                    feature_bucket=(16, 16), image_bucket=(128, 128),
                                    max_boxes=stage2.MIN_BOXES, max_classes=stage2.MIN_CLASSES)
        for key, kind in (("y_crf", "Y_crf"), ("y_ret", "Y_ret")):
            got = read(run["out"], kind, sample["id"])
            same += int((got == expected[key]).sum())
            total += got.size
    # Equal here; eager vs jit-compiled backbone rounding could flip a pixel at the 0.99 * max
    # threshold elsewhere.
    assert same / total > 0.999


def numpy_miou(preds, labels, num_classes):
    """Loop over classes: IoU = |P & G| / |P | G| on labelled pixels, mean over classes present."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for pred, label in zip(preds, labels):
            valid = label != 255
            inter += np.sum((pred == c) & (label == c) & valid)
            union += np.sum(((pred == c) | (label == c)) & valid)
        ious.append(inter / union if union else np.nan)
    ious = np.array(ious, np.float64)
    return 100 * np.nanmean(ious), 100 * ious


def numpy_box_fill(sample):
    """Per pixel: the class of the smallest inclusive box containing it (brute force)."""
    h, w = sample["label"].shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            best = None
            for (x0, y0, x1, y1), c in zip(sample["boxes"], sample["box_labels"]):
                if x0 <= x <= x1 and y0 <= y <= y1:
                    area = (x1 - x0 + 1) * (y1 - y0 + 1)
                    if best is None or area < best[0]:
                        best = (area, c)
            out[y, x] = 0 if best is None else best[1]
    return out


def test_summary_matches_numpy_from_written_pngs(run):
    samples, out = run["samples"], run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == summary["computed"] == len(samples) and summary["skipped"] == 0
    assert summary["images_with_ground_truth"] == len(samples)
    labels = [s["label"] for s in samples]
    crf = [read(out, "Y_crf", s["id"]) for s in samples]
    ret = [read(out, "Y_ret", s["id"]) for s in samples]
    reliable = [np.where(a == b, g, 255) for a, b, g in zip(crf, ret, labels)]
    fill = [numpy_box_fill(s) for s in samples]
    for method, preds, gts in (("y_crf", crf, labels), ("y_ret", ret, labels),
                               ("agreement", crf, reliable), ("box_fill", fill, labels)):
        miou, per_class = numpy_miou(preds, gts, NUM_CLASSES)
        assert summary["miou"][method] == pytest.approx(miou, abs=1e-9), method
        for c, name in enumerate(run["names"]):
            got = summary["per_class"][name][method]
            assert (got is None) if np.isnan(per_class[c]) else got == pytest.approx(per_class[c], abs=1e-9)
    labelled = sum(int((g != 255).sum()) for g in labels)
    agree = sum(int(((a == b) & (g != 255)).sum()) for a, b, g in zip(crf, ret, labels))
    assert summary["agreement_fraction"] == pytest.approx(agree / labelled)
    assert 0 <= summary["miou"]["grabcut"] <= 100
    times = summary["seconds_per_image"]
    assert times["features"] > 0 and times["crf"] > 0 and times["wall"] > 0
    assert summary == run["summary"]


def test_box_convention_tight_box_fills_the_object(run):
    # Box-fill of an inclusive box drawn tightly around the rectangle is exactly the rectangle.
    samples = [rectangle_sample()]
    # (the whole summary mixes images; score the rectangle alone)
    rect = samples[0]
    y0, x0, y1, x1 = RECT
    got = read(run["out"], "Y_crf", "rectangle")
    assert not np.any(got[:y0]) and not np.any(got[y1 + 1:]) and not np.any(got[:, :x0]) and not np.any(got[:, x1 + 1:])
    from bana_jax import baselines
    fill = baselines.box_fill(rect["boxes"], rect["box_labels"], rect["label"].shape)
    assert numpy_miou([fill], [rect["label"]], NUM_CLASSES)[1][2] == 100.0


def test_box_covering_everything_uses_the_last_row_and_column(tmp_path):
    """No background pixel at all: finite labels, and the inclusive box's last row and column are
    inside it (were the box taken as half-open, they would be forced to background)."""
    labeler = make_labeler()
    # A classifier column of ones scores the (ReLU, non-negative) features positively everywhere.
    kernel = np.array(labeler.classifier.kernel[...])
    kernel[:, 1] = 1.0
    labeler.classifier.kernel[...] = jnp.asarray(kernel)
    samples = [full_box_sample(), rectangle_sample()]
    summary = stage2.generate_pseudo_labels(labeler, ListSource(samples), make_config(), tmp_path, workers=1,
                                            progress=False, baselines=("box_fill",))
    y_crf, y_ret = read(tmp_path, "Y_crf", "full_box"), read(tmp_path, "Y_ret", "full_box")
    assert np.all(y_crf == 1)
    assert set(np.unique(y_ret)) <= {0, 1}
    assert y_ret[-1].max() <= 1 and y_crf[-1].min() == 1 and y_crf[:, -1].min() == 1
    # The rectangle's tight box: box-fill IoU 1 on it (and on the background).
    assert summary["per_class"]["class_2"]["box_fill"] == 100.0
    assert summary["per_class"]["class_0"]["box_fill"] == 100.0


def test_resume_recomputes_only_unfinished_images(run, tmp_path, monkeypatch):
    out = tmp_path / "pseudo_labels"
    for kind in ("Y_crf", "Y_ret", "baselines/grabcut"):
        (out / kind).mkdir(parents=True)
        for path in (run["out"] / kind).glob("*.png"):
            (out / kind / path.name).write_bytes(path.read_bytes())
    victim = run["samples"][1]["id"]
    original = read(out, "Y_ret", victim)
    (out / "Y_ret" / f"{victim}.png").unlink()
    (out / "Y_crf" / f".{victim}.png.abc123.tmp").write_bytes(b"partial")  # a killed run's leftover
    before = {p: p.stat().st_mtime_ns for p in (out / "Y_crf").glob("*.png")}
    calls = []
    real = crf_ext.dense_crf
    monkeypatch.setattr(crf_ext, "dense_crf", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(run["samples"], run["names"]), make_config(),
                                            out, workers=2, progress=False, baselines=("box_fill", "grabcut"))
    assert len(calls) == 1 and summary["computed"] == 1 and summary["skipped"] == len(run["samples"]) - 1
    np.testing.assert_array_equal(read(out, "Y_ret", victim), original)
    for path, mtime in before.items():
        if path.stem != victim:
            assert path.stat().st_mtime_ns == mtime
    assert not list((out / "Y_crf").glob("*.tmp"))
    # Scores are the same whether the labels were computed now or read back.
    assert summary["miou"] == run["summary"]["miou"]


def test_resumed_run_adds_no_second_set_of_panels(run, tmp_path):
    """Panels go to this host's first N images. A resumed run that computes a later image adds no
    panel for it (it used to give panels to its first N computed images: a second set)."""
    out = tmp_path / "pseudo_labels"
    shutil.copytree(run["out"], out)
    shutil.rmtree(out / "visualisations")
    first, later = run["samples"][0]["id"], run["samples"][4]["id"]
    for image_id in (first, later):
        for kind in ("Y_crf", "Y_ret"):
            (out / kind / f"{image_id}.png").unlink()
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(run["samples"], run["names"]), make_config(),
                                            out, workers=1, progress=False, num_visualisations=2)
    assert summary["computed"] == 2
    assert [p.stem for p in (out / "visualisations").glob("*.png")] == [first]


def test_host_sharding_labels_every_other_image(run, tmp_path):
    samples = run["samples"][:4]
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(samples, run["names"]), make_config(),
                                            tmp_path, workers=1, progress=False, baselines=(),
                                            process_index=1, process_count=2)
    assert sorted(p.stem for p in (tmp_path / "Y_crf").glob("*.png")) == [samples[1]["id"], samples[3]["id"]]
    assert summary["images"] == 2 and "grabcut" not in summary["miou"]


KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, "tests")
    from test_stage2 import make_labeler
    from bana_jax import stage2
    from bana_jax.data.synthetic import SyntheticSource
    from bana_jax.config import base_config

    class Slow:
        def __init__(self):
            self.source = SyntheticSource(num_images={n}, image_size={size}, num_classes={classes})
        def __len__(self):
            return len(self.source)
        def __getitem__(self, i):
            time.sleep(0.4)
            return self.source[i]

    config = base_config()
    config.model.num_classes = {classes} + 1
    config.pseudo.save_visualisations = False
    config.pseudo.box_convention = "pixels"  # as make_config()
    stage2.generate_pseudo_labels(make_labeler(), Slow(), config, sys.argv[1], workers=1, progress=False, baselines=())
""")


def test_killed_run_leaves_no_partial_png_and_rerun_completes(run, tmp_path):
    out = tmp_path / "pseudo_labels"
    script = KILLED_RUN.format(n=NUM_SYNTHETIC, size=SIZE, classes=NUM_CLASSES - 1)
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "Y_crf").glob("*.png"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = list((out / "Y_crf").glob("*.png")) + list((out / "Y_ret").glob("*.png"))
    assert 2 <= len(list((out / "Y_crf").glob("*.png"))) < NUM_SYNTHETIC
    for path in written:  # every PNG that exists is complete
        with Image.open(path) as image:
            image.load()
            assert image.mode == "P" and image.size == (SIZE, SIZE)
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource(run["samples"][:NUM_SYNTHETIC], run["names"]),
                                            make_config(), out, workers=2, progress=False, baselines=())
    assert summary["computed"] + summary["skipped"] == NUM_SYNTHETIC and summary["skipped"] >= 2
    for sample in run["samples"][:NUM_SYNTHETIC]:
        for kind in ("Y_crf", "Y_ret"):
            np.testing.assert_array_equal(read(out, kind, sample["id"]), read(run["out"], kind, sample["id"]))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_bad_settings(tmp_path):
    source = ListSource([rectangle_sample()])
    with pytest.raises(ValueError, match="baselines"):
        stage2.generate_pseudo_labels(make_labeler(), source, make_config(), tmp_path, progress=False,
                                      baselines=("boxfill",))
    bad = dict(rectangle_sample(), image=np.zeros((SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match="image"):
        stage2.generate_pseudo_labels(make_labeler(), ListSource([bad]), make_config(), tmp_path, progress=False)


def test_main_reads_the_config(tmp_path, monkeypatch):
    """`bana stage2` wiring: the labeler from pseudo.stage1_workdir, the split, WORKDIR/pseudo_labels."""
    seen = []
    monkeypatch.setattr(artifacts, "load_model", lambda workdir, kind: seen.append((workdir, kind)) or make_labeler())
    config = make_config()
    config.data.name = "synthetic"
    config.data.synthetic_images, config.data.synthetic_size = 2, SIZE
    config.pseudo.split, config.pseudo.stage1_workdir = "val", str(tmp_path / "s1")
    config.train.compilation_cache, config.train.progress_bar = "", False
    summary = stage2.main(config, tmp_path / "work")
    assert seen == [(str(tmp_path / "s1"), "labeler")] and summary["images"] == 2
    val = SyntheticSource(num_images=2, image_size=SIZE, num_classes=NUM_CLASSES - 1, seed=1)
    for i in range(2):
        assert (tmp_path / "work" / "pseudo_labels" / "Y_crf" / f"{val[i]['id']}.png").is_file()
    assert (tmp_path / "work" / "pseudo_labels" / "summary.json").is_file()
    # What `bana stage2` compares a re-run with (tests/test_cli.py).
    assert json.loads((tmp_path / "work" / "config.json").read_text())["crf"]["bi_w"] == config.crf.bi_w
    config.pseudo.stage1_workdir = ""
    with pytest.raises(ConfigError, match="stage1_workdir"):
        stage2.main(config, tmp_path / "work")


# ------------------------------------------------------------------------------------------------
# `bana stage2` on real COCO photos (coco_subset): VOC -> COCO unseen classes, the RLE export
# ------------------------------------------------------------------------------------------------

# person + scissors, bird + apple, giraffe: VOC classes and others, and an image with no VOC box.
COCO_FILES = ("000000551757.jpg", "000000172123.jpg", "000000163497.jpg")


@pytest.fixture(scope="module")
def coco_annotations(coco_photos, tmp_path_factory):
    """coco_mini's instances json reduced to COCO_FILES (every category kept)."""
    with open(coco_photos / "coco_mini" / "annotations" / "instances_train2017.json") as f:
        coco = json.load(f)
    images = [im for im in coco["images"] if im["file_name"] in COCO_FILES]
    ids = {im["id"] for im in images}
    assert len(images) == len(COCO_FILES) and len(coco["categories"]) == 80
    reduced = dict(images=images, categories=coco["categories"],
                   annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    path = tmp_path_factory.mktemp("coco_subset") / "instances.json"
    path.write_text(json.dumps(reduced))
    return path


class Records(logging.Handler):
    """Keeps the log records it receives (caplog is per test; the runs are per module)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def run_main_on_coco(coco_photos, annotations, workdir, classes):
    """stage2.main on the coco_subset config with a tiny random VOC labeler (21 classes) standing
    in for the stage-1 export. Returns the config, the labeler, the CRF calls (input and output per
    image size) and stage2's log records."""
    from bana_jax.config import load_config

    labeler = make_labeler(seed=3, num_classes=21)
    config = load_config(REPO / "configs/coco_subset/stage2.py")
    config.data.images = str(coco_photos / "coco_mini" / "train2017")
    config.data.annotations = str(annotations)
    config.data.classes = classes
    config.pseudo.stage1_workdir = str(workdir / "stage1")
    config.pseudo.save_visualisations = False
    config.train.compilation_cache, config.train.progress_bar = "", False
    crf_calls = {}
    real_crf = crf_ext.dense_crf

    def spy_crf(image, probs, **params):
        refined = real_crf(image, probs, **params)
        crf_calls[image.shape[:2]] = (probs.copy(), refined)
        return refined

    handler = Records()
    logger = logging.getLogger("bana_jax.stage2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifacts, "load_model", lambda *_: labeler)
        patch.setattr(crf_ext, "dense_crf", spy_crf)
        # GrabCut (about a second per box on a CPU) is not what these tests are about.
        patch.setattr(stage2.baselines_lib, "grabcut", lambda image, boxes, labels:
                      stage2.baselines_lib.box_fill(boxes, labels, image.shape[:2]))
        level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            summary = stage2.main(config, workdir)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    return dict(config=config, labeler=labeler, crf_calls=crf_calls, log=handler.records,
                summary=summary, out=workdir / "pseudo_labels")


@pytest.fixture(scope="module")
def coco80_run(coco_photos, coco_annotations, tmp_path_factory):
    return run_main_on_coco(coco_photos, coco_annotations, tmp_path_factory.mktemp("coco80"), "coco")


@pytest.fixture(scope="module")
def voc20_run(coco_photos, coco_annotations, tmp_path_factory):
    return run_main_on_coco(coco_photos, coco_annotations, tmp_path_factory.mktemp("voc20"), "voc")


def coco_source(run):
    from bana_jax import builders

    return builders.data_source(run["config"], run["config"].pseudo.split)


def runner_buckets(features, sample) -> dict:
    """The padded sizes stage 2 uses for this image, so that the direct computations share its
    compiled functions (padding does not change the result: test_pseudo_labels)."""
    (h, w), (height, width) = features.shape[:2], sample["image"].shape[:2]
    return dict(feature_bucket=(stage2._round_up(h, stage2.FEATURE_STEP), stage2._round_up(w, stage2.FEATURE_STEP)),
                image_bucket=(stage2._round_up(height, stage2.IMAGE_STEP), stage2._round_up(width, stage2.IMAGE_STEP)),
                max_boxes=stage2._pow2_at_least(len(sample["boxes"]), stage2.MIN_BOXES),
                max_classes=stage2._pow2_at_least(len(np.unique(sample["box_labels"])), stage2.MIN_CLASSES))


def expected_voc_columns(annotations):
    """Per COCO class id (1..80 = categories in ascending id): its VOC class, or -1 (unseen)."""
    from bana_jax.data.coco import COCO_TO_VOC

    categories = sorted(c["id"] for c in json.loads(Path(annotations).read_text())["categories"])
    return np.array([0] + [COCO_TO_VOC.get(cat, -1) for cat in categories])


def test_voc_labeler_on_coco80_maps_voc_classes_and_treats_the_rest_as_unseen(coco80_run, coco_annotations):
    """Per image: the CRF input is the unaries of the VOC weight columns mapped to COCO classes
    (a direct pseudo_labels computation), an unseen class's logit is 1 - u_0 in its boxes, and
    Y_crf / Y_ret are what pseudo_labels makes of that CRF's output."""
    run, source = coco80_run, coco_source(coco80_run)
    columns = expected_voc_columns(coco_annotations)
    unseen = [c for c in range(81) if columns[c] < 0]
    assert len(unseen) == 60 and run["summary"]["settings"]["unseen_classes"] == unseen
    message, = [r.getMessage() for r in run["log"] if "unseen" in r.getMessage()]
    assert "60 are unseen" in message and "giraffe" in message and "scissors" in message
    assert "person" not in message.split(":", 1)[1]
    labeler = run["labeler"]
    voc_weight = np.asarray(labeler.classifier.weight)  # (D, 21)
    weight = np.zeros((voc_weight.shape[0], 81), np.float32)
    weight[:, columns >= 0] = voc_weight[:, columns[columns >= 0]]
    assert len(source) == len(COCO_FILES)
    unseen_found = set()
    for index in range(len(source)):
        sample = source[index]
        image, labels = sample["image"], sample["box_labels"]
        half_open = sample["boxes"] + np.array([0, 0, 1, 1], np.float32)
        probs_in, refined = run["crf_calls"][image.shape[:2]]  # the runner's CRF input and output
        features = np.asarray(labeler(jnp.asarray(caffe_normalize(image)[None])))[0]
        buckets = runner_buckets(features, sample)
        expected = pl.pseudo_labels(features, image, half_open, labels, weight, unseen_classes=unseen,
                                    crf=lambda _, p: refined, **buckets)
        np.testing.assert_allclose(probs_in, expected["probs"], atol=1e-4)
        # Unseen classes: inside their boxes, log p_c - log p_0 = (1 - u_0) - u_0.
        u0 = expected["bg_unary"]
        boxes_px = pl.box_pixels(half_open, image.shape[:2])
        for channel, cls in enumerate(expected["classes"], 1):
            inside = np.zeros(image.shape[:2], bool)
            for (x0, y0, x1, y1), c in zip(boxes_px, labels):
                inside[y0:y1, x0:x1] |= c == cls
            if cls in unseen:
                unseen_found.add(int(cls))
                np.testing.assert_allclose(np.log(probs_in[channel][inside] / probs_in[0][inside]),
                                           1 - 2 * u0[inside], atol=1e-4)
                assert np.any(bio.read_label_png(run["out"] / "Y_crf" / f"{sample['id']}.png") == cls)
        # The mapped VOC column matters: the classes' own (identity) columns give other unaries.
        identity = pl.pseudo_labels(features, image, half_open, labels, np.pad(voc_weight, ((0, 0), (0, 60))),
                                    unseen_classes=unseen, crf=lambda _, p: refined, **buckets)
        if any(columns[c] >= 0 for c in labels):
            assert np.abs(identity["probs"] - probs_in).max() > 1e-2
        for key, kind in (("y_crf", "Y_crf"), ("y_ret", "Y_ret")):
            got = bio.read_label_png(run["out"] / kind / f"{sample['id']}.png")
            assert np.mean(got == expected[key]) > 0.999, kind
    assert {"giraffe", "scissors", "apple"} <= {source.class_names[c] for c in unseen_found}


def check_instances(run, category_of_class):
    """instances_y_crf.json: a COCO instances file whose masks are (Y_crf == class) & box."""
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils

    path = run["out"] / "instances_y_crf.json"
    exported = json.loads(path.read_text())
    assert set(exported) == {"images", "annotations", "categories"}
    coco = COCO(str(path))  # pycocotools indexes it as a dataset...
    # ... and takes its instances as results for the source annotations (as Mask R-CNN output).
    COCO(run["config"].data.annotations).loadRes(exported["annotations"])
    source = coco_source(run)
    assert sorted(im["file_name"] for im in exported["images"]) == sorted(
        f"{source[i]['id']}.jpg" for i in range(len(source)))
    by_file = {im["file_name"]: im for im in exported["images"]}
    total = 0
    for index in range(len(source)):
        sample = source[index]
        image = by_file[f"{sample['id']}.jpg"]
        y_crf = bio.read_label_png(run["out"] / "Y_crf" / f"{sample['id']}.png")
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == len(sample["boxes"]) > 0  # one instance per box, same order
        for ann, box, cls in zip(annotations, sample["boxes"], sample["box_labels"]):
            x0, y0, x1, y1 = np.floor(box).astype(int)  # inclusive pixel box
            want = np.zeros(y_crf.shape, np.uint8)
            want[y0:y1 + 1, x0:x1 + 1] = y_crf[y0:y1 + 1, x0:x1 + 1] == cls
            assert ann["category_id"] == category_of_class[int(cls)] and ann["iscrowd"] == 0
            assert ann["segmentation"]["size"] == [image["height"], image["width"]]
            assert isinstance(ann["segmentation"]["counts"], str)
            np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]), want)
            np.testing.assert_array_equal(coco.annToMask(ann), want)
            assert ann["area"] == want.sum()
            total += want.sum()
    assert total > 0


def test_main_exports_coco80_instances(coco80_run, coco_annotations):
    categories = sorted(c["id"] for c in json.loads(coco_annotations.read_text())["categories"])
    check_instances(coco80_run, {i + 1: cat for i, cat in enumerate(categories)})


def test_main_exports_voc20_instances(voc20_run):
    from bana_jax.data.coco import COCO_TO_VOC

    assert voc20_run["summary"]["settings"]["unseen_classes"] == []
    assert not [r for r in voc20_run["log"] if "unseen" in r.getMessage()]
    assert voc20_run["summary"]["images"] == 2  # the giraffe image has no VOC box
    check_instances(voc20_run, {voc: coco for coco, voc in COCO_TO_VOC.items()})


def test_image_bucket_compiles_the_backbone_once_per_bucket():
    """pseudo.image_bucket: three image sizes in one 64-px bucket run one backbone compilation, and
    the features are those of the mean-padded image cut to the image's own feature grid; with 0 they
    are the exact image's."""
    labeler = make_labeler()
    labeler.eval()
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, shape + (3,)).astype(np.uint8) for shape in ((48, 48), (50, 40), (61, 33))]
    bucketed = stage2.FeatureExtractor(labeler, image_bucket=64)
    before = stage2._backbone_features._cache_size()
    for image in images:
        features, (h, w) = bucketed(image)
        padded = np.zeros((64, 64, 3), np.float32)
        padded[:image.shape[0], :image.shape[1]] = caffe_normalize(image)
        expected = np.asarray(labeler(jnp.asarray(padded[None])))[0][:h, :w]
        assert (h, w) == bucketed.feature_size(*image.shape[:2])
        np.testing.assert_allclose(np.asarray(features)[:h, :w], expected, rtol=1e-4, atol=1e-4)
        assert not np.asarray(features)[h:].any() and not np.asarray(features)[:, w:].any()
    assert stage2._backbone_features._cache_size() - before == 1
    assert bucketed.backbone_sizes == {(64, 64)} and len(bucketed.image_sizes) == 3

    exact = stage2.FeatureExtractor(labeler)
    features, (h, w) = exact(images[1])
    expected = np.asarray(labeler(jnp.asarray(caffe_normalize(images[1])[None])))[0]
    assert expected.shape[:2] == (h, w)
    np.testing.assert_allclose(np.asarray(features)[:h, :w], expected, rtol=1e-4, atol=1e-4)
    assert exact.backbone_sizes == {images[1].shape[:2]}
    with pytest.raises(ValueError, match="image_bucket"):
        stage2.FeatureExtractor(labeler, image_bucket=-8)


def test_runner_reports_bucketed_compilations(tmp_path):
    samples, names = synthetic_samples()
    cropped = dict(samples[1], image=samples[1]["image"][:40, :44], label=samples[1]["label"][:40, :44],
                   boxes=np.minimum(samples[1]["boxes"], [43, 39, 43, 39]).astype(np.float32), id="cropped")
    config = make_config()
    config.pseudo.image_bucket = 64
    summary = stage2.generate_pseudo_labels(make_labeler(), ListSource([samples[0], cropped], names), config,
                                            tmp_path / "out", workers=1, progress=False, report=False,
                                            baselines=())
    assert summary["backbone_image_sizes"] == 2 and summary["backbone_compilations"] == 1
    assert summary["settings"]["image_bucket"] == 64
    assert read(tmp_path / "out", "Y_crf", "cropped").shape == (40, 44)
