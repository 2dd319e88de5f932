"""Stage 3 end to end on tiny synthetic data: batches, loss wiring, training, resume, export.

Pseudo labels are made from the synthetic ground truth: Y_crf = GT, Y_ret = GT with a fraction of
pixels relabelled, so the reliable region S is known. The model is the 'vgg_tiny' DeepLab; one
module-scoped run is shared by the tests (JAX compile time dominates on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bana_jax import builders, stage3
from bana_jax.config import load_config
from bana_jax.losses import segmentation_loss
from bana_jax.train import make_data_mesh
from stage3_common import REPO, SIZE, demo_config, write_pseudo_labels

NUM_STEPS = 30
NOISE = 0.2


def make_config(pseudo_labels, cache_dir):
    return demo_config(pseudo_labels, cache_dir, NUM_STEPS)


@pytest.fixture(scope="module")
def pseudo_dir(tmp_path_factory):
    config = load_config(REPO / "configs/demo/stage3.py")
    config.data.synthetic_images, config.data.synthetic_size = 8, SIZE
    source = builders.data_source(config, "train")
    return write_pseudo_labels(source, tmp_path_factory.mktemp("pseudo"), NOISE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def one_device():
    return make_data_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(pseudo_dir, cache_dir, one_device, tmp_path_factory):
    """An uninterrupted NAL run of NUM_STEPS steps: (config, workdir, TrainResult)."""
    workdir = tmp_path_factory.mktemp("stage3_full")
    config = make_config(pseudo_dir, cache_dir)
    result = stage3.train(config, workdir, mesh=one_device)
    return config, workdir, result


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_batches_hold_only_image_and_pseudo_labels_padded_with_255(pseudo_dir, cache_dir):
    config = make_config(pseudo_dir, cache_dir)
    config.data.scale_range = (0.5, 0.5)  # 48 -> 24 px: the crop is half padding
    config.data.color_jitter = (1.0, 1.0)
    source = builders.data_source(config, pseudo_labels=pseudo_dir)
    batch = next(stage3.SelectKeys(builders.training_batches(config, source), stage3.BATCH_KEYS))
    assert sorted(batch) == ["image", "y_crf", "y_ret"]  # no ground truth, no boxes
    assert batch["y_crf"].shape == batch["y_ret"].shape == (4, SIZE, SIZE)
    assert batch["y_crf"].dtype == batch["y_ret"].dtype == np.uint8
    # Rows 24.. are padding (the crop offset is 0 when the padded image equals the crop).
    assert np.all(batch["y_crf"][:, 24:] == 255) and np.all(batch["y_ret"][:, 24:] == 255)
    # Y_ret differs from Y_crf only on labelled pixels, at about the injected rate.
    labelled = batch["y_crf"] != 255
    assert np.array_equal(batch["y_ret"] == 255, ~labelled)
    disagree = np.mean(batch["y_crf"][labelled] != batch["y_ret"][labelled])
    assert 0.1 < disagree < 0.3


@pytest.mark.parametrize("name,kind", sorted(stage3.LOSS_KINDS.items()))
def test_loss_fn_uses_the_configured_kind(name, kind, pseudo_dir, cache_dir):
    config = make_config(pseudo_dir, cache_dir)
    config.loss.name = name
    config.loss.gamma, config.loss.weight, config.loss.tau = 3.0, 0.7, 5.0
    rng = np.random.default_rng(1)
    scores = np.tanh(rng.normal(size=(2, 3, 3, 5))).astype(np.float32)
    batch = {"image": np.zeros((2, 12, 12, 3), np.float32),
             "y_crf": rng.integers(0, 5, (2, 12, 12)).astype(np.uint8),
             "y_ret": rng.integers(0, 5, (2, 12, 12)).astype(np.uint8)}
    step = 7
    fake_model = lambda images: (None, scores)  # noqa: E731
    loss, aux = stage3.make_loss_fn(config)(fake_model, batch, step)
    expected, _ = segmentation_loss(scores, batch, kind=kind, tau=5.0, lam=0.7, gamma=3.0,
                                    step=step, max_steps=NUM_STEPS, classifier="cosine")
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert "ce" in aux


def test_bad_configs_fail_with_the_field_name(pseudo_dir, cache_dir, tmp_path):
    config = make_config(pseudo_dir, cache_dir)
    config.model.classifier = "dot"
    with pytest.raises(ValueError, match="model.classifier"):
        stage3.make_loss_fn(config)
    config = make_config("", cache_dir)
    with pytest.raises(ValueError, match="data.pseudo_labels"):
        stage3.train(config, tmp_path)
    config = make_config(tmp_path, cache_dir)
    with pytest.raises(ValueError, match="Y_crf"):
        stage3.train(config, tmp_path)


def test_loss_falls_and_the_final_model_is_exported(trained):
    config, workdir, result = trained
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == list(range(5, NUM_STEPS + 1, 5))
    first, last = records[0], records[-1]
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    # Y_ret disagrees with Y_crf on NOISE of the pixels: S covers about 1 - NOISE (padding aside).
    assert abs(np.mean([r["reliable_fraction"] for r in records]) - (1 - NOISE)) < 0.05
    assert 0 < last["sigma_mean"] <= 1
    assert (workdir / "train_done.json").is_file()

    loaded = stage3.load_trained_deeplab(workdir)
    trained_model = result.model()
    trained_model.eval()
    for ours, theirs in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)),
                            jax.tree.leaves(nnx.state(trained_model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    images = np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(images)[1]), np.asarray(trained_model(images)[1]))


def test_interrupted_run_resumes_to_the_same_weights(trained, tmp_path, one_device):
    config, _, uninterrupted = trained
    half = stage3.train(config, tmp_path, mesh=one_device, stop_after=NUM_STEPS // 2)
    assert int(half.state.step) == NUM_STEPS // 2
    assert not (tmp_path / stage3.MODEL_DIR).exists()  # exported only at the last step
    resumed = stage3.train(config, tmp_path, mesh=one_device)
    assert resumed.resumed_from == NUM_STEPS // 2
    for ours, theirs in zip(jax.tree.leaves(resumed.state.params),
                            jax.tree.leaves(uninterrupted.state.params)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    # A train checkpoint loads like the final export.
    from_checkpoint = stage3.load_trained_deeplab(tmp_path, str(NUM_STEPS))
    exported = stage3.load_trained_deeplab(tmp_path)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(from_checkpoint, nnx.Param)),
                            jax.tree.leaves(nnx.state(exported, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
