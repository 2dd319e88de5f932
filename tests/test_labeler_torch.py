"""The stage-1 labeler on a batch with boxes: our Labeler + `bana_jax.bap` / `stage1.make_loss_fn`
against `LabelerRef.forward_boxes` (the official forward transcribed in torch ops, box by box),
with the same weights, eval mode (no dropout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

jax.config.update("jax_compilation_cache_dir", "/tmp/bana_jax_test_jit_cache")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from bana_jax import bap, stage1  # noqa: E402
from bana_jax.models import Labeler  # noqa: E402
from bana_jax.models.torch_import import load_checkpoint  # noqa: E402
from bana_jax.config import base_config  # noqa: E402

TINY, FC_DIM, C = (8, 16, 32, 32, 32), 64, 5
S_H, S_W = 81, 97  # crop; the tiny VGG (stride 8) gives 11 x 13 features
H, W = 11, 13
K = 6  # box slots per image (padded)
REL_TOL = 1e-5


def feature_box(x0, y0, x1, y1):
    """Box in feature pixels -> normalised (float32), to pin ROI sizes exactly."""
    return [x0 / ((W - 1) / 2) - 1, y0 / ((H - 1) / 2) - 1, x1 / ((W - 1) / 2) - 1,
            y1 / ((H - 1) / 2) - 1]


def crop_box(x0, y0, x1, y1):
    """Box in crop pixels -> normalised, as the data pipeline gives it."""
    return [x0 / ((S_W - 1) / 2) - 1, y0 / ((S_H - 1) / 2) - 1, x1 / ((S_W - 1) / 2) - 1,
            y1 / ((S_H - 1) / 2) - 1]


def outside_boxes(boxes):
    """Crop-resolution mask `(S_H, S_W)`, 1 outside every normalised box of `boxes` `(n, 4)`."""
    xs = np.arange(S_W) / ((S_W - 1) / 2) - 1
    ys = np.arange(S_H) / ((S_H - 1) / 2) - 1
    mask = np.ones((S_H, S_W), np.float32)
    for x0, y0, x1, y1 in boxes:
        mask[(ys[:, None] >= y0) & (ys[:, None] <= y1) & (xs >= x0) & (xs <= x1)] = 0
    return mask


def make_batch(seed=0):
    """Three images (padded to K boxes each) covering the corner cases.

    0: BAP; an ordinary box (odd ROI height), a 3 x 5 ROI (odd both ways), a 1-pixel ROI, a box on
       the top-right border, a 1-row ROI, a 1-column ROI on the left border; background = outside
       the boxes minus a bottom band (invalid grid cells).
    1: no background at all: GAP fallback, no background vector; the whole-image box.
    2: background 11% of the crop (<= 12.5%): GAP fallback, but its valid cells still give
       background vectors.
    The labeler's features are ReLU outputs (non-negative), so the ReLU in the background
    attention never clips here; tests/test_bap.py checks it on signed features.
    """
    rng = np.random.default_rng(seed)
    boxes = np.zeros((3, K, 4), np.float32)
    labels = np.zeros((3, K), np.int32)
    valid = np.zeros((3, K), bool)

    def put(b, k, box, label):
        boxes[b, k], labels[b, k], valid[b, k] = box, label, True

    put(0, 0, crop_box(5, 7, 60, 50), 1)
    put(0, 1, feature_box(1.5, 2.3, 5.2, 5.0), 2)
    put(0, 2, feature_box(7.3, 8.6, 8.0, 9.0), 3)
    put(0, 3, feature_box(10.5, 0.0, 12.0, 3.3), 4)
    put(0, 4, feature_box(2.0, 9.1, 9.5, 9.9), 1)
    put(0, 5, feature_box(0.0, 4.2, 0.6, 10.0), 2)
    put(1, 0, [-1.0, -1.0, 1.0, 1.0], 3)
    put(1, 1, crop_box(10, 12, 44, 33), 4)
    put(2, 0, crop_box(0, 9, 96, 80), 1)
    put(2, 1, feature_box(3.2, 1.5, 3.7, 6.5), 2)

    masks = np.zeros((3, S_H, S_W), np.float32)
    masks[0] = outside_boxes(boxes[0][valid[0]])
    masks[0, 56:] = 0  # e.g. crop padding: feature rows 8-10 hold no background
    masks[2, :9] = 1   # 9 / 81 rows
    images = rng.normal(0, 60, (3, S_H, S_W, 3)).astype(np.float32)
    return dict(image=images, bg_mask=masks, boxes=boxes, box_labels=labels, box_valid=valid)


def rel_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-12))


@pytest.fixture(scope="module")
def nets():
    """(torch reference in eval mode, our Labeler with its weights)."""
    net = ref.randomise_(ref.LabelerRef(C, TINY, FC_DIM), seed=21).eval()
    model = nnx.eval_shape(lambda: Labeler("tiny", C, rngs=nnx.Rngs(0)))
    load_checkpoint(model, net.state_dict())
    model.eval()
    return net, model


def torch_stage1(net, batch, options):
    """`LabelerRef.forward_boxes` on the real (valid) boxes of a padded batch."""
    b_idx, k_idx = np.nonzero(batch["box_valid"])
    with torch.no_grad():
        return net.forward_boxes(
            torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(batch["boxes"][b_idx, k_idx]), torch.from_numpy(b_idx),
            torch.from_numpy(batch["box_labels"][b_idx, k_idx]),
            torch.from_numpy(batch["bg_mask"]), **options)


def jax_stage1(model, batch, options, map_over_images):
    """Features, BAP vectors and their logits, and the training loss (`stage1.make_loss_fn`)."""
    config = base_config()
    config.loss.grid_size = options["grid_size"]
    config.loss.pooling = options["pooling"]
    config.loss.roi_windows = options["roi_output"][0]
    loss_fn = stage1.make_loss_fn(config, map_over_images=map_over_images)
    loss, metrics = nnx.jit(lambda m, b: loss_fn(m, b, 0))(model, batch)

    @nnx.jit
    def vectors(model, batch):
        features = model(batch["image"])
        vec = bap.bap_vectors(features, batch["bg_mask"], batch["boxes"], batch["box_valid"],
                              **stage1.loss_options(config))
        weight = model.classifier.weight
        return features, vec, bap.classify(vec["fg_vectors"], weight), bap.classify(
            vec["bg_vectors"], weight)

    features, vec, fg_logits, bg_logits = vectors(model, batch)
    return dict(loss=loss, metrics=metrics, features=features, vec=vec, fg_logits=fg_logits,
                bg_logits=bg_logits)


def compare(batch, ours, theirs) -> dict[str, float]:
    """Relative differences of features, vectors, logits and loss; asserts the bookkeeping
    (GAP fallback, valid cells, ROI sizes) is identical."""
    vec = jax.device_get(ours["vec"])
    b_idx, k_idx = np.nonzero(batch["box_valid"])
    assert list(vec["use_bap"]) == theirs["use_bap"]
    assert [tuple(c) for c in np.argwhere(vec["cell_valid"])] == theirs["bg_cells"]
    assert list(zip(vec["roi_h"][b_idx, k_idx], vec["roi_w"][b_idx, k_idx])) == theirs["roi_sizes"]
    cells = tuple(np.asarray(theirs["bg_cells"]).T)
    our_logits = np.concatenate([np.asarray(ours["fg_logits"])[b_idx, k_idx].reshape(-1, C),
                                 np.asarray(ours["bg_logits"])[cells]])
    return {
        "features": rel_diff(ours["features"], theirs["features"].permute(0, 2, 3, 1).numpy()),
        "fg_vectors": rel_diff(vec["fg_vectors"][b_idx, k_idx], theirs["fg_vectors"].numpy()),
        "bg_vectors": rel_diff(vec["bg_vectors"][cells], theirs["bg_vectors"].numpy()),
        "logits": rel_diff(our_logits, theirs["logits"].numpy()),
        "loss": rel_diff(ours["loss"], theirs["loss"].numpy()),
    }


@pytest.mark.parametrize("grid_size,pooling,windows,map_over_images", [
    (4, "bap", 2, False),  # the official setting: 11 x 13 padded to 12 x 16 (all after)
    (4, "gap", 2, False),
    (3, "bap", 1, True),   # 13 -> 15 split evenly; one window; pooled image by image
])
def test_labeler_with_boxes_matches_torch(nets, grid_size, pooling, windows, map_over_images):
    net, model = nets
    batch = make_batch()
    options = dict(grid_size=grid_size, pooling=pooling, roi_output=(windows, windows))
    theirs = torch_stage1(net, batch, options)
    ours = jax_stage1(model, jax.tree.map(jnp.asarray, batch), options, map_over_images)
    diffs = compare(batch, ours, theirs)
    print({k: f"{v:.1e}" for k, v in diffs.items()})
    assert all(v <= REL_TOL for v in diffs.values()), diffs
    accuracy = (theirs["logits"].argmax(1) == theirs["targets"]).double().mean().item()
    assert abs(float(ours["metrics"]["accuracy"]) - accuracy) < 1e-6
    # The corner cases are there: which images pool with BAP, and the ROI shapes.
    assert theirs["use_bap"] == [pooling == "bap", False, False]
    assert not any(b == 1 for b, _ in theirs["bg_cells"]) and any(b == 2 for b, _ in theirs["bg_cells"])
    assert sum(b == 0 for b, _ in theirs["bg_cells"]) < grid_size**2  # image 0: invalid cells
    sizes = theirs["roi_sizes"]
    assert {(1, 1), (3, 5), (H - 1, W - 1)} <= set(sizes)
    assert any(h == 1 < w for h, w in sizes) and any(w == 1 < h for h, w in sizes)
    assert any(h % 2 == 1 < h and w % 2 == 0 for h, w in sizes)
    assert theirs["fg_vectors"].shape == (int(batch["box_valid"].sum()), windows**2, FC_DIM)
