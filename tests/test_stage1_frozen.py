"""Frozen-backbone stage 1 (bana_jax.stage1_frozen), its feature cache and class-balanced sampling."""

import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bana_jax import artifacts, bap, builders, stage1, stage1_frozen
from bana_jax.data import sampling
from bana_jax.feature_cache import FeatureCache, image_fingerprint
from bana_jax.config import apply_overrides, load_config, validate_config
from bana_jax.train.loop import configure_compilation_cache

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "stage1.py")


@pytest.fixture(scope="module")
def cache_dir():
    path = Path(os.environ.get("BANA_TEST_JAX_CACHE",
                               Path(tempfile.gettempdir()) / "bana_jax_test_jax_cache"))
    configure_compilation_cache(str(path), path)
    return str(path)


def frozen_config(cache_dir, **fields):
    overrides = [("data.synthetic_images", "12"), ("data.synthetic_size", "48"),
                 ("data.view_sizes", "(48,32)"), ("data.batch_size", "8"), ("train.num_steps", "30"),
                 ("train.log_every", "10"), ("train.checkpoint_every", "15"),
                 ("model.freeze_backbone", "true"), ("train.compilation_cache", cache_dir),
                 ("train.progress_bar", "false"),
                 # The demo's BatchNorm trunk, frozen at a random init, would normalise with
                 # running statistics that were never estimated: the plain trunk here.
                 ("model.vgg_norm", "none")]
    overrides += [(name.replace("__", "."), str(value)) for name, value in fields.items()]
    return validate_config(apply_overrides(load_config(DEMO), overrides))


def params(module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


# ----------------------------------------------------------------------------------------------
# Class-balanced sampling
# ----------------------------------------------------------------------------------------------


def test_class_balanced_sampler_draws_classes_evenly():
    # 90 images of class 1 (with class 4 in ten of them), 6 of class 2, 4 of class 3.
    classes = [[1] for _ in range(80)] + [[1, 4] for _ in range(10)] + [[2]] * 6 + [[3, 1]] * 4
    sampler = sampling.ClassBalancedSampler(classes, seed=3)
    n = 8000
    drawn = np.array([sampler.drawn_class(i) for i in range(n)])
    counts = np.bincount(drawn, minlength=5)[1:]
    # Binomial(8000, 1/4): standard deviation 39, so +-200 is five sigma.
    assert np.all(np.abs(counts - n / 4) < 200), counts
    for i in range(0, n, 97):
        record = sampler[i]
        assert record.index == i and drawn[i] in classes[record.record_key]
    # The image draws depend only on the seed and the record index.
    again = sampling.ClassBalancedSampler(classes, seed=3)
    assert [again[i].record_key for i in range(50)] == [sampler[i].record_key for i in range(50)]
    other = sampling.ClassBalancedSampler(classes, seed=4)
    assert [other[i].record_key for i in range(50)] != [sampler[i].record_key for i in range(50)]
    # Uniform image draws would give class 2 about 6% of the records, not a quarter.
    with pytest.raises(ValueError, match="at least one image with a box"):
        sampling.ClassBalancedSampler([[], []], seed=0)


def test_class_balanced_training_batches(cache_dir):
    """The data loader with the sampler: batches hold the drawn images, and each host's
    sharded share is its part of the same stream."""
    config = frozen_config(cache_dir, data__class_balanced=True, model__freeze_backbone=False,
                           data__crop_size=48, data__num_workers=0)
    source = builders.data_source(config)
    sampler = sampling.ClassBalancedSampler(sampling.image_classes(source), config.train.seed)
    batch = next(builders.training_batches(config))
    expected = [sampler[i].record_key for i in range(config.data.batch_size)]
    for row, image in enumerate(expected):
        labels = set(batch["box_labels"][row][batch["box_valid"][row]].tolist())
        assert labels <= set(np.asarray(source[image]["box_labels"]).tolist())
    assert sampling.image_classes(source)[3].tolist() == sorted(set(source[3]["box_labels"].tolist()))


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------


def test_feature_cache_hits_misses_and_invalidation(tmp_path):
    features = np.random.default_rng(0).normal(size=(5, 6, 4)).astype(np.float32)
    image = np.zeros((40, 48, 3), np.uint8)
    image_hash = image_fingerprint(image)
    cache = FeatureCache(tmp_path, "backbone-a")
    assert cache.get("321", "img/1", image_hash) is None
    cache.put("321", "img/1", image_hash, features)
    np.testing.assert_allclose(cache.get("321", "img/1", image_hash), features, rtol=1e-3, atol=1e-3)
    assert (cache.hits, cache.misses) == (1, 1)
    # Another view and another image are other entries; a new cache of the same backbone reuses.
    assert cache.get("321_flip", "img/1", image_hash) is None
    reopened = FeatureCache(tmp_path, "backbone-a")
    assert reopened.get("321", "img/1", image_hash) is not None
    # Changed pixels: a miss, and storing the new features drops the old entry.
    changed = image.copy()
    changed[0, 0, 0] = 1
    changed_hash = image_fingerprint(changed)
    assert changed_hash != image_hash
    assert reopened.get("321", "img/1", changed_hash) is None
    cache.put("321", "img.1x", image_hash, features)  # a look-alike id is another image
    reopened.put("321", "img/1", changed_hash, 2 * features)
    assert reopened.get("321", "img/1", image_hash) is None
    assert reopened.get("321", "img.1x", image_hash) is not None
    assert len(list((tmp_path / "321").glob("*.npy"))) == 2
    # Another backbone empties the cache.
    other = FeatureCache(tmp_path, "backbone-b")
    assert other.get("321", "img/1", changed_hash) is None
    assert not (tmp_path / "321").exists()
    assert json.loads((tmp_path / "backbone.json").read_text()) == {"backbone": "backbone-b"}


def test_cached_views_reuse_the_cache_and_recompute_what_changed(cache_dir, tmp_path):
    config = frozen_config(cache_dir)
    labeler = stage1.build_model(config)
    source = builders.data_source(config)
    options = stage1.loss_options(config)
    first = stage1_frozen.cached_views(config, labeler, source, tmp_path, options)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / stage1_frozen.CACHE_DIR).rglob("*.npy")}
    assert len(files) == len(source) * 4  # two sizes, mirrored or not
    assert [len(v) for v in first] == [4] * len(source)

    class Changed:  # the same data with image 2's pixels changed
        def __len__(self):
            return len(source)

        def __getitem__(self, index):
            sample = dict(source[index])
            if index == 2:
                sample["image"] = 255 - sample["image"]
            return sample

    second = stage1_frozen.cached_views(config, labeler, Changed(), tmp_path, options)
    now = {p: p.stat().st_mtime_ns for p in (tmp_path / stage1_frozen.CACHE_DIR).rglob("*.npy")}
    image2 = str(source[2]["id"])
    unchanged = [p for p in files if not p.name.startswith(image2 + ".")]
    assert all(now.get(p) == files[p] for p in unchanged), "unchanged images were recomputed"
    assert len(now) == len(files) and set(now) != set(files)  # image 2's four files replaced
    for i in (0, 5):
        for a, b in zip(first[i], second[i]):
            np.testing.assert_array_equal(a["fg_vectors"], b["fg_vectors"])
    assert not np.array_equal(first[2][0]["fg_vectors"], second[2][0]["fg_vectors"])
    # Other head fields (dropout, pooling) leave the cache valid.
    head = frozen_config(cache_dir, model__dropout=0.2, loss__pooling="gap")
    stage1_frozen.cached_views(head, labeler, Changed(), tmp_path, stage1.loss_options(head))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / stage1_frozen.CACHE_DIR).rglob("*.npy")} == now
    # Another backbone (other weights): every view is recomputed.
    other = stage1.build_model(frozen_config(cache_dir, train__seed=7))
    stage1_frozen.cached_views(config, other, source, tmp_path, options)
    rewritten = {p: p.stat().st_mtime_ns for p in (tmp_path / stage1_frozen.CACHE_DIR).rglob("*.npy")}
    assert len(rewritten) == len(files) and all(t > now.get(p, -1) for p, t in rewritten.items())


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def test_vector_loss_on_pooled_views_is_bap_loss_on_their_features(cache_dir, tmp_path):
    # 160-pixel views: 20 x 20 features, so boxes with ROIs of at most 16 cells are pooled on a
    # smaller ROI grid than the feature map (pooled_view), which must not change the vectors.
    config = frozen_config(cache_dir, data__view_sizes="(160,)", data__max_boxes=6)
    labeler = stage1.build_model(config)
    source = builders.data_source(config)
    options = stage1.loss_options(config)
    views = stage1_frozen.cached_views(config, labeler, source, tmp_path, options)
    batch = {k: np.stack([v[0][k] for v in views[:6]]) for k in views[0][0]}
    weight = jax.random.normal(jax.random.key(1), labeler.classifier.weight.shape)
    loss, aux = bap.vector_loss(batch, batch["box_labels"], batch["box_valid"], weight)

    from bana_jax.data.batching import collate

    network = [stage1_frozen.network_views(source[i], (160,), False)[0][1] for i in range(6)]
    stacked = collate(network, max_boxes=6)
    labeler.eval()
    features = labeler(jnp.asarray(stacked["image"]))
    expected, expected_aux = bap.bap_loss(features, stacked["bg_mask"], stacked["boxes"],
                                          stacked["box_labels"], stacked["box_valid"], weight, **options)
    np.testing.assert_allclose(loss, expected, rtol=2e-3)  # the cache holds float16 features
    for key in ("num_fg", "num_bg", "num_boxes"):
        assert float(aux[key]) == float(expected_aux[key]), key


def test_view_batches_split_over_processes_and_resume():
    views = [[{k: np.full((1,), 10 * i + j) for k in ("fg_vectors", "box_valid")} for j in range(3)]
             for i in range(5)]
    whole = stage1_frozen.ViewBatches(views, 4, seed=0, process_index=0, process_count=1)
    halves = [stage1_frozen.ViewBatches(views, 4, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(3):
        rows = next(whole)["fg_vectors"][:, 0]
        parts = [next(h)["fg_vectors"][:, 0] for h in halves]
        np.testing.assert_array_equal(rows[:2], parts[0])  # process p: block p of the batch
        np.testing.assert_array_equal(rows[2:], parts[1])
    state = whole.get_state()
    expected = next(whole)["fg_vectors"]
    resumed = stage1_frozen.ViewBatches(views, 4, seed=0, process_index=0, process_count=1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["fg_vectors"], expected)



def test_view_batches_cut_the_box_axis_to_the_batch_largest_count():
    def view(count):  # the image holds its box count, to find each row's view
        valid = np.arange(16) < count
        return {"image": np.full((2, 2, 1), count, np.float16), "boxes": np.arange(64.0).reshape(16, 4),
                "box_labels": valid.astype(np.int32), "box_valid": valid}

    widths = set()
    for seed in range(6):
        batch = next(stage1_frozen.ViewBatches([[view(c)] for c in (1, 3, 5, 16)], 3, seed=seed))
        counts = batch["image"][:, 0, 0, 0].astype(int)
        width = {1: 4, 3: 4, 5: 8, 16: 16}[counts.max()]
        widths.add(width)
        assert batch["image"].dtype == np.float32
        assert batch["boxes"].shape == (3, width, 4) and batch["box_labels"].shape == (3, width)
        np.testing.assert_array_equal(batch["boxes"][0], np.arange(64.0).reshape(16, 4)[:width])
        np.testing.assert_array_equal(batch["box_valid"].sum(1), counts)  # only invalid boxes were cut
    assert len(widths) > 1


def test_frozen_stage1_trains_only_the_classifier(cache_dir, tmp_path):
    config = frozen_config(cache_dir, data__class_balanced=True)
    initial = stage1.build_model(config)
    summary = stage1.main(config, tmp_path)
    assert summary["step"] == config.train.num_steps
    trained = artifacts.load_model(tmp_path, "labeler")
    before, after = params(initial), params(trained)
    jax.tree.map(np.testing.assert_array_equal, before["backbone"], after["backbone"])
    # The classifier learned: a lower loss on all training views than its initial weights.
    views = stage1_frozen.cached_views(config, trained, builders.data_source(config), tmp_path,
                                       stage1.loss_options(config))
    batch = {k: np.stack([v[k] for per_image in views for v in per_image]) for k in views[0][0]}
    loss = lambda w: float(bap.vector_loss(batch, batch["box_labels"], batch["box_valid"], w)[0])  # noqa: E731
    assert loss(after["classifier"]["kernel"]) < 0.9 * loss(before["classifier"]["kernel"])
    accuracy = summary["box_accuracy"]
    assert accuracy["num_boxes"] > 0 and accuracy["correct"] <= accuracy["num_boxes"]
    # A second run of the finished workdir reuses every cached view.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "feature_cache").rglob("*.npy")}
    stage1.main(config, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "feature_cache").rglob("*.npy")} == mtimes


def test_trainable_blocks_train_the_last_block_and_the_classifier_only(cache_dir, tmp_path):
    config = frozen_config(cache_dir, model__name="efficientnet_lite0_labeler", model__init="none",
                           model__trainable_blocks=1, data__view_sizes="(48,40)", train__num_steps=4,
                           train__checkpoint_every=0)
    initial = stage1.build_model(config)
    summary = stage1.main(config, tmp_path)
    trained = artifacts.load_model(tmp_path, "labeler")
    before, after = params(initial), params(trained)
    stats = lambda m: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, stats(initial), stats(trained))
    last = f"block{initial.backbone.num_blocks - 1}"
    for name, value in before["backbone"].items():
        changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), value, after["backbone"][name]))
        assert any(changed) == (name == last), name
    assert not np.allclose(before["classifier"]["kernel"], after["classifier"]["kernel"])
    # The cache holds the last block's input (block 14's 192 channels), one file per view.
    cached = sorted((tmp_path / "feature_cache").rglob("*.npy"))
    assert len(cached) == 12 * 4 and np.load(cached[0]).shape[-1] == 192
    assert summary["box_accuracy"]["num_boxes"] > 0
