"""Stage 1 end to end on the synthetic data with the tiny labeler (8 simulated CPU devices)."""

import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bana_jax import artifacts, bap, builders, cli, evaluate_cams, stage1
from bana_jax.models import param_group_labels
from bana_jax.train import mesh as mesh_lib
from bana_jax.config import apply_overrides, load_config, validate_config
from bana_jax.train.loop import configure_compilation_cache
from bana_jax.train.optim import make_optimizer
from bana_jax.train.state import create_train_state, jit_train_step, label_tree, make_train_step

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "stage1.py")
SIZE = 48  # synthetic images and crops: 6 x 6 features, 2 x 2-pixel grid cells (N = 4)


@pytest.fixture(scope="module")
def cache_dir():
    """A persistent compilation cache kept between test runs (compiling the tiny labeler's steps
    costs most of this file's time; a warm cache cuts it several-fold). BANA_TEST_JAX_CACHE
    overrides the location."""
    path = Path(os.environ.get("BANA_TEST_JAX_CACHE",
                               Path(tempfile.gettempdir()) / "bana_jax_test_jax_cache"))
    configure_compilation_cache(str(path), path)  # before the first model is built
    return str(path)


def small_overrides(cache_dir):
    return [("data.synthetic_size", str(SIZE)), ("data.crop_size", str(SIZE)),
            ("train.compilation_cache", cache_dir), ("train.progress_bar", "false")]


def tiny_config(cache_dir, **fields):
    overrides = small_overrides(cache_dir) + [
        ("data.synthetic_images", "32"), ("data.batch_size", "8"), ("train.num_steps", "40")]
    overrides += [(name.replace("__", "."), str(value)) for name, value in fields.items()]
    return validate_config(apply_overrides(load_config(DEMO), overrides))


def make_step(config, model, mesh, loss_fn):
    params = nnx.state(model, nnx.Param)
    labels = label_tree(params, param_group_labels(model))
    tx, _ = make_optimizer(config.optim, int(config.train.num_steps), labels)
    graphdef, rng_template, state = create_train_state(model, tx, int(config.train.seed))
    step = jit_train_step(make_train_step(graphdef, rng_template, tx, loss_fn), mesh,
                          donate=False)
    return mesh_lib.replicate(state, mesh), step


@pytest.fixture(scope="module")
def sharded_run(cache_dir):
    """The 8-device step (pooling image by image, one group per device) and a batch stream."""
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    config = tiny_config(cache_dir)
    model = stage1.build_model(config)
    iterator = builders.training_batches(config)
    batches = [next(iterator) for _ in range(30)]
    mesh = mesh_lib.make_data_mesh()
    loss_fn = stage1.make_loss_fn(config, num_groups=8, map_over_images=True)
    state, step = make_step(config, model, mesh, loss_fn)
    return config, model, batches, mesh, state, step


def test_sharded_step_equals_single_device_step(sharded_run):
    config, model, batches, mesh, state, step = sharded_run
    # Reference: one device, the whole batch pooled at once (the other code path of the loss).
    single_mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
    single_state, single_step = make_step(config, model, single_mesh,
                                          stage1.make_loss_fn(config, map_over_images=False))
    for batch in batches[:2]:
        sharded_batch = mesh_lib.shard_batch(batch, mesh)
        assert len(sharded_batch["image"].sharding.device_set) == 8
        state, metrics = step(state, sharded_batch)
        single_state, single_metrics = single_step(single_state,
                                                   mesh_lib.shard_batch(batch, single_mesh))
        for key in ("loss",) + stage1.METRIC_KEYS:
            np.testing.assert_allclose(metrics[key], single_metrics[key], rtol=1e-5, err_msg=key)
    # The loss is bap_loss of the labeler's features on the whole batch.
    model.train()
    first = batches[0]
    expected, _ = bap.bap_loss(model(first["image"]), first["bg_mask"], first["boxes"],
                               first["box_labels"], first["box_valid"], model.classifier.weight)
    assert np.isfinite(float(expected))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(single_state.params))


def test_loss_falls_on_synthetic_data(sharded_run):
    _, _, batches, mesh, state, step = sharded_run
    losses = []
    for batch in batches:
        state, metrics = step(state, mesh_lib.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    # From the He init (scaled for Caffe-range pixels, or under BatchNorm) the loss starts near
    # log(C) (uniform scores), not at the tens a unit-variance init gives; 40 steps at the demo's rate lower it
    # by ~8% (an update that does not reach the weights leaves it flat).
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    num_classes = load_config(DEMO).model.num_classes
    assert abs(first - np.log(num_classes)) < 0.1, losses
    assert last < 0.96 * first, losses


def stage1_args(workdir, cache_dir, steps):
    args = ["stage1", f"--config={DEMO}", f"--workdir={workdir}", "--shrink",
            f"--config.train.num_steps={steps}"]
    # The plain trunk: after 6 steps its CAMs show some foreground to score, the demo's
    # BatchNorm trunk's not yet (tests/test_demo.py runs that one end to end).
    overrides = small_overrides(cache_dir) + [("model.vgg_norm", "none")]
    return args + [f"--config.{name}={value}" for name, value in overrides]


def test_cli_run_resume_and_evaluate_cams(cache_dir, tmp_path, capsys):
    steps = 6
    full = tmp_path / "full"
    assert cli.main(stage1_args(full, cache_dir, steps)) == 0
    for name in ("config.json", "metrics.jsonl", "train_done.json", "model.json",
                 "stage1_summary.json", f"checkpoints/{steps}", "model"):
        assert (full / name).exists(), name
    summary = json.loads((full / "stage1_summary.json").read_text())
    assert summary["step"] == steps
    accuracy = summary["box_accuracy"]
    assert accuracy["num_boxes"] > 0 and 0 <= accuracy["accuracy"] <= 1
    assert accuracy["correct"] == round(accuracy["accuracy"] * accuracy["num_boxes"])
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and np.isfinite(records[-1]["loss"])

    # The same run cut off after 3 steps, then started again on its workdir.
    config = cli.resolve_config(DEMO, stage1_args(full, cache_dir, steps)[4:], shrink=True)
    split = tmp_path / "split"
    cut = stage1.main(config, split, stop_after=3)
    assert cut["step"] == 3 and not (split / "model").exists()
    resumed = stage1.main(config, split)
    assert resumed["step"] == steps
    assert resumed["box_accuracy"] == summary["box_accuracy"]
    full_model = artifacts.load_model(full, "labeler")
    split_model = artifacts.load_model(str(split), "labeler")
    full_vars = jax.tree.leaves(nnx.state(full_model, nnx.Param))
    split_vars = jax.tree.leaves(nnx.state(split_model, nnx.Param))
    assert len(full_vars) == len(split_vars) > 0
    for a, b in zip(full_vars, split_vars):
        np.testing.assert_array_equal(a, b)

    capsys.readouterr()
    assert cli.main(["evaluate-cams"] + stage1_args(full, cache_dir, steps)[1:]) == 0
    out = capsys.readouterr().out
    assert "CAM precision" in out and "mean" in out
    result = json.loads((full / evaluate_cams.RESULT_JSON).read_text())
    values = [v for v in result["precision"].values() if v is not None]
    assert values and all(0 <= v <= 1 for v in values)
    assert 0 <= result["mean_precision"] <= 1
    assert result["num_images"] == config.eval.max_images
    tp, fp = np.array(result["tp"]), np.array(result["fp"])
    assert np.all(tp >= 0) and np.all(fp >= -1e-6) and tp[0] == 0 and fp[0] == 0
    assert result["box_accuracy"]["num_boxes"] > 0


def test_loading_a_labeler_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained labeler"):
        artifacts.load_model(tmp_path, "labeler")


def test_combine_group_aux_matches_whole_batch_means():
    # Two groups: (loss, counts) pairs; the whole-batch loss is the mean over all vectors.
    aux = {"loss": np.array([2.0, 1.0]), "num_fg": np.array([4.0, 8.0]),
           "num_bg": np.array([6.0, 2.0]), "accuracy": np.array([0.5, 0.2]),
           "fg_accuracy": np.array([0.25, 0.5]), "bg_accuracy": np.array([0.5, 1.0]),
           "box_accuracy": np.array([1.0, 0.5]), "num_boxes": np.array([1.0, 2.0]),
           "bap_fraction": np.array([1.0, 0.0])}
    loss, out = stage1.combine_group_aux(aux)
    assert float(loss) == pytest.approx((2.0 * 10 + 1.0 * 10) / 20)
    assert float(out["accuracy"]) == pytest.approx((0.5 * 10 + 0.2 * 10) / 20)
    assert float(out["fg_accuracy"]) == pytest.approx((1 + 4) / 12)
    assert float(out["bg_accuracy"]) == pytest.approx((3 + 2) / 8)
    assert float(out["box_accuracy"]) == pytest.approx(2 / 3)
    assert float(out["bap_fraction"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# CAM precision math against loop transcriptions of the supplement's definition
# ----------------------------------------------------------------------------------------------


def reference_cams(scores, height, width, boxes, labels):
    """Pixel by pixel: align_corners=True bilinear upsampling, ReLU, per-box max normalisation."""
    h, w, c = scores.shape
    out = np.zeros((height, width, c))
    cam = np.zeros((height, width, c))
    for y in range(height):
        sy = y * (h - 1) / (height - 1)
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = x * (w - 1) / (width - 1)
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            value = ((1 - fy) * (1 - fx) * scores[y0, x0] + (1 - fy) * fx * scores[y0, x1]
                     + fy * (1 - fx) * scores[y1, x0] + fy * fx * scores[y1, x1])
            cam[y, x] = np.maximum(value, 0.0)
    for (x_min, y_min, x_max, y_max), label in zip(boxes, labels):
        pixels = [(y, x) for y in range(height) for x in range(width)
                  if x_min <= x <= x_max and y_min <= y <= y_max]
        peak = max(cam[y, x, label] for y, x in pixels)
        for y, x in pixels:
            out[y, x, label] = cam[y, x, label] / (peak + 1e-12)
    return out


def test_normalized_cams_match_pixel_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 5, 4)).astype(np.float32)
    boxes = np.array([[1, 2, 9, 11], [0, 0, 4, 3], [6, 5, 12, 12], [2, 3, 7, 8]], np.float32)
    labels = np.array([2, 1, 2, 3])  # class 2 twice, overlapping: the later box overwrites
    u = evaluate_cams.normalized_cams(scores, (13, 15), boxes, labels)
    expected = reference_cams(scores.astype(np.float64), 13, 15, boxes, labels)
    np.testing.assert_allclose(u, expected, rtol=1e-5, atol=1e-6)
    assert u[..., 0].max() == 0 and u.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="box_labels must be in 1..3"):
        evaluate_cams.normalized_cams(scores, (13, 15), boxes, np.array([2, 1, 4, 3]))


def test_cam_counts_match_pixel_loop():
    rng = np.random.default_rng(1)
    u = rng.uniform(size=(6, 7, 4)).astype(np.float32)
    label = rng.integers(0, 4, size=(6, 7)).astype(np.uint8)
    label[0, :3] = 255
    tp, fp = evaluate_cams.cam_counts(u, label)
    for c in range(4):
        inside = sum(u[y, x, c] for y in range(6) for x in range(7) if label[y, x] == c)
        outside = sum(u[y, x, c] for y in range(6) for x in range(7)
                      if label[y, x] not in (c, 255))
        assert tp[c] == pytest.approx(inside, rel=1e-6)
        assert fp[c] == pytest.approx(outside, rel=1e-6)
    # Same numbers as bap.cam_precision_counts (the JAX version of the metric).
    jax_tp, jax_fp = bap.cam_precision_counts(u[None], label[None])
    np.testing.assert_allclose(tp, jax_tp, rtol=1e-5)
    np.testing.assert_allclose(fp, jax_fp, rtol=1e-5, atol=1e-5)
