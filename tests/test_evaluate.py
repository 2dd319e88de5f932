"""Evaluation of a stage-3 model: bucketed scoring, mIoU against NumPy, CRF paths, the CLI.

A 'vgg_tiny' DeepLab is trained briefly on exact pseudo labels (Y_crf = Y_ret = ground truth) of 8
synthetic images and evaluated on 8 images of the synthetic 'val' split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import crf_ext
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bana_jax import builders, cli, evaluate, stage3
from bana_jax.data.transforms import caffe_normalize
from bana_jax.io import read_label_png
from bana_jax.resize import resize_bilinear
from bana_jax.train import make_data_mesh
from stage3_common import SIZE, demo_config, write_pseudo_labels

NUM_STEPS = 30


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "jax_cache_stage3"


@pytest.fixture(scope="module")
def pseudo_dir(tmp_path_factory):
    source = builders.data_source(demo_config(), "train")
    return write_pseudo_labels(source, tmp_path_factory.mktemp("exact_labels"), noise=0.0)


@pytest.fixture(scope="module")
def trained(pseudo_dir, cache_dir, tmp_path_factory):
    """(config, workdir) of a finished NUM_STEPS run on exact labels."""
    workdir = tmp_path_factory.mktemp("stage3_exact")
    config = demo_config(pseudo_dir, cache_dir, NUM_STEPS)
    config.eval.update(scales=(1.0,), flip=False, crf=False, save_predictions=False)
    stage3.train(config, workdir, mesh=make_data_mesh(jax.devices()[:1]))
    return config, workdir


@pytest.fixture(scope="module")
def val_source():
    return builders.data_source(demo_config(), "val", max_images=0)


def numpy_scores(predictions: list[np.ndarray], labels: list[np.ndarray], num_classes: int) -> dict:
    """IoU per class, mIoU, pixel and mean accuracy by counting pixels class by class."""
    iou, acc = [], []
    correct = total = 0
    for c in range(num_classes):
        tp = fp = fn = 0
        for pred, gt in zip(predictions, labels):
            valid = gt != 255
            tp += np.sum((pred == c) & (gt == c) & valid)
            fp += np.sum((pred == c) & (gt != c) & valid)
            fn += np.sum((pred != c) & (gt == c))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        acc.append(tp / (tp + fn) if tp + fn else np.nan)
    for pred, gt in zip(predictions, labels):
        correct += np.sum((pred == gt) & (gt != 255))
        total += np.sum(gt != 255)
    return {"iou": np.array(iou), "miou": np.nanmean(iou), "accuracy": np.array(acc),
            "mean_accuracy": np.nanmean(acc), "pixel_accuracy": correct / total}


class StridedLinear(nnx.Module):
    """A model without spatial context: scores at (i, j) = W . image[8i, 8j] (output stride 8)."""

    def __init__(self):
        self.kernel = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32))

    def __call__(self, images):
        return None, images[:, ::8, ::8] @ self.kernel[...]


def test_bucketed_scorer_is_exact_without_context_and_compiles_once_per_bucket():
    model = StridedLinear()
    scorer = evaluate.BucketedScorer(model, bucket=16)
    rng = np.random.default_rng(0)
    sizes = [(20, 27), (17, 30), (32, 32), (9, 16), (9, 30)]  # buckets 32x32, 16x16, 16x32
    for h, w in sizes:
        images = rng.normal(size=(1, h, w, 3)).astype(np.float32)
        expected = np.asarray(model(images)[1])
        got = np.asarray(scorer(images))
        assert got.shape == expected.shape == (1, -(-h // 8), -(-w // 8), 4)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert scorer._scores._cache_size() == len({scorer.padded_size(h, w) for h, w in sizes}) == 3
    with pytest.raises(ValueError, match="bucket"):
        evaluate.BucketedScorer(model, bucket=-1)


def test_trained_weights_beat_the_random_init(trained, val_source):
    """From scratch, 30 SGD steps of the tiny net learn the class prior (every pixel background)
    but not yet the shapes; the loaded weights must still score far above the random init."""
    config, workdir = trained
    result = evaluate.evaluate_model(stage3.load_trained_deeplab(workdir), val_source, config,
                                     progress=False)
    untrained = evaluate.evaluate_model(builders.build_deeplab(config), val_source, config,
                                        progress=False)
    labels = [val_source[i]["label"] for i in range(8)]
    all_background = numpy_scores([np.zeros_like(gt) for gt in labels], labels, 5)
    assert result["num_images"] == untrained["num_images"] == 8
    assert result["miou"] >= all_background["miou"] - 1e-9, result["table"]
    assert result["miou"] > untrained["miou"] + 0.05, (result["table"], untrained["table"])
    assert result["pixel_accuracy"] > untrained["pixel_accuracy"] + 0.2


def test_saved_predictions_and_json_match_a_numpy_count(trained, val_source, capsys):
    config, workdir = trained
    config = demo_config(config.data.pseudo_labels, config.train.compilation_cache, NUM_STEPS)
    config.eval.update(scales=(1.0, 0.75), flip=True, crf=True, save_predictions=True, max_images=6)
    assert evaluate.main(config, workdir) == 0
    record = json.loads((workdir / "eval_val.json").read_text())
    ids = [val_source[i]["id"] for i in range(6)]
    predictions = [read_label_png(workdir / "predictions" / "val" / f"{i}.png") for i in ids]
    labels = [val_source[i]["label"] for i in range(6)]
    expected = numpy_scores(predictions, labels, 5)
    assert record["num_images"] == 6 and record["crf"] and record["scales"] == [1.0, 0.75]
    np.testing.assert_allclose(record["miou"], expected["miou"], rtol=1e-12)
    np.testing.assert_allclose(record["pixel_accuracy"], expected["pixel_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(record["mean_accuracy"], expected["mean_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(np.array(record["iou"], float), expected["iou"], rtol=1e-12)
    assert f"{100 * expected['miou']:6.2f}" in capsys.readouterr().out  # the printed table


@pytest.mark.parametrize("crf", [False, True])
def test_pipeline_equals_a_direct_composition(trained, val_source, crf, tmp_path):
    """Unpadded (bucket=0) evaluation = model -> upsample -> [softmax(tau *) -> DenseCRF] -> argmax."""
    config, workdir = trained
    config = demo_config(config.data.pseudo_labels, config.train.compilation_cache, NUM_STEPS)
    config.eval.update(scales=(1.0,), flip=False, crf=crf, max_images=3)
    model = stage3.load_trained_deeplab(workdir)
    evaluate.evaluate_model(model, val_source, config, predictions_dir=tmp_path, bucket=0,
                            progress=False)
    for index in range(3):
        sample = val_source[index]
        images = caffe_normalize(sample["image"])[None]
        scores = resize_bilinear(model(jnp.asarray(images))[1], (SIZE, SIZE), align_corners=True)[0]
        if crf:
            probs = np.asarray(jax.nn.softmax(config.loss.tau * scores, axis=-1))
            c = config.crf
            marginals = crf_ext.dense_crf(
                sample["image"], np.ascontiguousarray(probs.transpose(2, 0, 1)), bi_w=c.bi_w,
                bi_xy_std=c.bi_xy_std, bi_rgb_std=c.bi_rgb_std, pos_w=c.pos_w,
                pos_xy_std=c.pos_xy_std, n_iter=c.iterations)
            expected = np.argmax(marginals, axis=0)
        else:
            expected = np.argmax(np.asarray(scores), axis=-1)
        np.testing.assert_array_equal(read_label_png(tmp_path / f"{sample['id']}.png"), expected)


@pytest.mark.parametrize("quirk", [False, True])
def test_crf_sees_the_rgb_image_or_the_official_uint8_cast(trained, val_source, quirk):
    config, workdir = trained
    config = demo_config(config.data.pseudo_labels, config.train.compilation_cache, NUM_STEPS)
    config.eval.update(scales=(1.0,), flip=False, crf=True, crf_uint8_quirk=quirk, max_images=1)
    seen = []

    def spy_crf(image, probs, **params):
        seen.append((image, params))
        return probs

    evaluate.evaluate_model(stage3.load_trained_deeplab(workdir), val_source, config,
                            progress=False, crf_fn=spy_crf)
    image = val_source[0]["image"]
    (crf_image, params), = seen
    expected = caffe_normalize(image).astype(np.uint8) if quirk else image  # NumPy wraps mod 256
    np.testing.assert_array_equal(crf_image, expected)
    assert params["bi_xy_std"] == config.crf.bi_xy_std and params["n_iter"] == config.crf.iterations


def test_softmax_uses_the_trained_tau_not_an_eval_time_override(trained, val_source, caplog):
    """`loss.tau` overridden at evaluation: the CRF still gets softmax(tau * cosines) with the tau
    of WORKDIR/model.json (the one the model was trained with), and a warning says so."""
    config, workdir = trained
    trained_tau = json.loads((workdir / "model.json").read_text())["tau"]
    config = demo_config(config.data.pseudo_labels, config.train.compilation_cache, NUM_STEPS)
    config.eval.update(scales=(1.0,), flip=False, crf=True, max_images=1)
    config.loss.tau = trained_tau / 4
    model = stage3.load_trained_deeplab(workdir)
    assert model.classifier.kind == "cosine" and model.tau == trained_tau
    seen = []

    def spy_crf(image, probs, **params):
        seen.append(probs)
        return probs

    def run():
        seen.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bana_jax.evaluate"):
            result = evaluate.evaluate_model(model, val_source, config, bucket=0, progress=False,
                                             crf_fn=spy_crf)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "tau" in r.getMessage()]
        return result, seen[0], warned

    result, probs, warned = run()
    cosines = resize_bilinear(model(jnp.asarray(caffe_normalize(val_source[0]["image"])[None]))[1],
                              (SIZE, SIZE), align_corners=True)[0]
    expected = np.asarray(jax.nn.softmax(trained_tau * cosines, axis=-1)).transpose(2, 0, 1)
    overridden = np.asarray(jax.nn.softmax(config.loss.tau * cosines, axis=-1)).transpose(2, 0, 1)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(probs - overridden).max() > 1e-3  # the override would have changed the input
    assert result["tau"] == trained_tau and len(warned) == 1
    assert f"{trained_tau:g}" in warned[0].getMessage() and f"{config.loss.tau:g}" in warned[0].getMessage()
    config.loss.tau = trained_tau  # no override: no warning, same input
    result, probs, warned = run()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert result["tau"] == trained_tau and not warned


def test_missing_model_and_unlabelled_split_fail_clearly(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="holds no trained deeplab .*bana stage3 --workdir="):
        stage3.load_trained_deeplab(tmp_path)
    config, workdir = trained

    class NoLabels:
        class_names = None

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {"image": np.zeros((SIZE, SIZE, 3), np.uint8), "id": "x"}

    with pytest.raises(ValueError, match="ground-truth"):
        evaluate.evaluate_model(stage3.load_trained_deeplab(workdir), NoLabels(), config,
                                progress=False)


def test_cli_stage3_then_evaluate(pseudo_dir, cache_dir, tmp_path):
    """`bana stage3` and `bana evaluate` on the demo config (8 simulated devices: batch 8)."""
    config_file = Path(__file__).resolve().parents[1] / "configs/demo/stage3.py"
    args = [f"--config={config_file}", f"--workdir={tmp_path}",
            f"--config.data.pseudo_labels={pseudo_dir}", "--config.data.synthetic_images=8",
            f"--config.data.synthetic_size={SIZE}", f"--config.data.crop_size={SIZE}",
            "--config.data.batch_size=8", "--config.train.num_steps=3", "--config.train.log_every=1",
            f"--config.train.compilation_cache={cache_dir}", "--config.eval.max_images=2",
            "--config.eval.crf=false",
            "--config.model.init_head=false"]  # from scratch: no stage-1 workdir to start from
    assert cli.main(["stage3", *args]) == 0
    assert cli.main(["evaluate", *args]) == 0
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    record = json.loads((tmp_path / "eval_val.json").read_text())
    assert record["num_images"] == 2 and 0 <= record["miou"] <= 1
    assert len(list((tmp_path / "predictions" / "val").glob("*.png"))) == 2
    # eval.size_bucket=0: every size unpadded, the same confusion as evaluate_model(bucket=0).
    assert record["size_bucket"] == 64
    assert cli.main(["evaluate", *args, "--config.eval.size_bucket=0"]) == 0
    exact = json.loads((tmp_path / "eval_val.json").read_text())
    config = cli.resolve_config(str(config_file), args[2:], False)
    expected = evaluate.evaluate_model(stage3.load_trained_deeplab(tmp_path),
                                       builders.data_source(config, "val", max_images=0), config,
                                       bucket=0, progress=False)
    assert exact["size_bucket"] == 0 and exact["confusion"] == expected["confusion"].tolist()
