"""Stage-1 math (bana_jax.bap) against the loop-based NumPy transcription in bap_reference.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bana_jax import bap
import bap_reference as ref

# Feature map 11 x 13 (grid padding 11 -> 12 all at the bottom, 13 -> 16 all on the right for
# N = 4), crop 81 x 97 (output stride 8), 6-d features, 5 classes.
H, W, D, C = 11, 13, 6, 5
S_H, S_W = 81, 97
K = 7
REL_TOL = 1e-5


def _norm_x(x_f):
    """Feature-pixel x -> normalised coordinate, in float32 like a batch would hold it."""
    return np.float32(x_f / ((W - 1) / 2) - 1)


def _norm_y(y_f):
    return np.float32(y_f / ((H - 1) / 2) - 1)


def _pixel_box(x0, y0, x1, y1):
    """Crop-pixel box -> normalised box (the batch contract)."""
    return [x0 / ((S_W - 1) / 2) - 1, y0 / ((S_H - 1) / 2) - 1,
            x1 / ((S_W - 1) / 2) - 1, y1 / ((S_H - 1) / 2) - 1]


def make_batch(seed=0):
    """Four images covering the corner cases.

    0: three ordinary boxes (odd and even ROI sizes), a padding band, four padded boxes (one NaN).
    1: no background at all (mask 0): GAP fallback, no background vector.
    2: seven boxes (many, overlapping), including boxes on pixel multiples of 8 (integer x_f).
    3: background <= 12.5% of the crop but valid cells: GAP fallback with background vectors;
       1-pixel ROIs (one row, one column, one pixel), boxes at the border, the whole image.
    """
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(4, H, W, D)).astype(np.float32)
    # Non-negative like fc7 after ReLU in most places, a few negative entries kept.
    features = np.where(rng.random(features.shape) < 0.8, np.abs(features), features)
    boxes = np.zeros((4, K, 4), np.float32)
    valid = np.zeros((4, K), bool)
    labels = np.full((4, K), 255, np.int32)

    def put(b, k, box, label):
        boxes[b, k] = box
        valid[b, k] = True
        labels[b, k] = label

    put(0, 0, _pixel_box(5, 7, 60, 50), 1)
    put(0, 1, _pixel_box(30.5, 20.2, 95.9, 79.3), 2)
    put(0, 2, _pixel_box(70, 3, 80, 19), 3)
    boxes[0, 3:] = [[0.1, 0.2, 0.3, 0.4], [5.0, 5.0, 7.0, 9.0], [np.nan] * 4, [0, 0, 0, 0]]

    put(1, 0, _pixel_box(0, 0, 96, 80), 4)
    put(1, 1, _pixel_box(10, 12, 44, 33), 2)

    rects = [(8, 8, 40, 32), (16, 0, 96, 64), (3, 41, 29, 79), (50, 50, 90, 77),
             (0, 24, 8, 48), (33, 9, 67, 31), (44, 60, 48, 64)]
    for k, r in enumerate(rects):
        put(2, k, _pixel_box(*r), 1 + k % (C - 1))

    put(3, 0, [-1.0, -1.0, 1.0, 1.0], 1)                                        # whole image
    put(3, 1, [_norm_x(3.2), _norm_y(1.5), _norm_x(3.7), _norm_y(6.5)], 2)    # 1 column
    put(3, 2, [_norm_x(2.0), _norm_y(4.1), _norm_x(9.5), _norm_y(4.9)], 3)    # 1 row
    put(3, 3, [_norm_x(7.3), _norm_y(8.6), _norm_x(8.0), _norm_y(9.0)], 4)    # 1 pixel
    put(3, 4, [_norm_x(10.5), _norm_y(0.0), _norm_x(12.0), _norm_y(3.3)], 1)  # right/top border
    put(3, 5, [_norm_x(0.0), _norm_y(7.7), _norm_x(2.2), _norm_y(10.0)], 3)   # left/bottom border

    masks = np.ones((4, S_H, S_W), np.float32)
    masks[0, 70:] = 0  # padding band
    for b in (0, 2):
        for k in range(K):
            if valid[b, k]:
                x0, y0, x1, y1 = boxes[b, k]
                xs = np.arange(S_W) / ((S_W - 1) / 2) - 1
                ys = np.arange(S_H) / ((S_H - 1) / 2) - 1
                inside = (ys[:, None] >= y0) & (ys[:, None] <= y1) & (xs >= x0) & (xs <= x1)
                masks[b][inside] = 0
    masks[1] = 0
    masks[3] = 0
    masks[3, :9, :] = 1  # 9 * 97 / (81 * 97) = 11.1% background, in the top grid row
    masks[3, 70:, 90:] = 1
    weight = (rng.normal(size=(D, C)) * 0.5).astype(np.float32)
    return dict(features=features, bg_mask=masks, boxes=boxes, box_labels=labels, box_valid=valid,
                classifier_weight=weight)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _jitted(**kw):
    def fn(features, bg_mask, boxes, box_labels, box_valid, classifier_weight):
        loss, aux = bap.bap_loss(features, bg_mask, boxes, box_labels, box_valid,
                                 classifier_weight, **kw)
        vec = bap.bap_vectors(features, bg_mask, boxes, box_valid,
                              **{k: v for k, v in kw.items()})
        return loss, aux, vec
    return jax.jit(fn)


def _compare(batch, reference, loss, vec, label):
    """Asserts and returns the max relative differences."""
    fg = np.asarray(vec["fg_vectors"])
    bg = np.asarray(vec["bg_vectors"])
    cell_valid = np.asarray(vec["cell_valid"])
    assert list(np.asarray(vec["use_bap"])) == reference["use_bap"], label
    ref_fg = np.stack([v for v in reference["fg_vectors"].values()])
    our_fg = np.stack([fg[b, k] for b, k in reference["fg_vectors"]])
    ref_bg = np.stack([v for v in reference["bg_vectors"].values()])
    assert sorted(reference["bg_vectors"]) == sorted(zip(*np.nonzero(cell_valid))), label
    our_bg = np.stack([bg[b, j] for b, j in reference["bg_vectors"]])
    for (b, k), size in reference["roi_sizes"].items():
        assert (int(vec["roi_h"][b, k]), int(vec["roi_w"][b, k])) == size, (label, b, k)
    diffs = {
        "loss": abs(float(loss) - reference["loss"]) / abs(reference["loss"]),
        "fg": _rel(our_fg, ref_fg),
        "bg": _rel(our_bg, ref_bg),
    }
    print(label, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v <= REL_TOL for v in diffs.values()), (label, diffs)
    return diffs


@pytest.mark.parametrize("grid_size,pooling", [(4, "bap"), (4, "gap"), (3, "bap"), (1, "bap")])
def test_matches_numpy_reference(batch, grid_size, pooling):
    reference = ref.stage1_reference(**batch, grid_size=grid_size, pooling=pooling)
    loss, aux, vec = _jitted(grid_size=grid_size, pooling=pooling)(**batch)
    _compare(batch, reference, loss, vec, f"N={grid_size} {pooling}")
    # The corner cases are really there.
    sizes = set(reference["roi_sizes"].values())
    assert {(1, 1)} <= sizes and any(h == 1 and w > 1 for h, w in sizes)
    assert any(w == 1 and h > 1 for h, w in sizes) and (H - 1, W - 1) in sizes
    assert any(h % 2 == 1 and h > 1 for h, _ in sizes) and any(w % 2 == 0 for _, w in sizes)
    # Aux counts and accuracy against the reference's vectors.
    n_fg = 4 * int(batch["box_valid"].sum())
    assert float(aux["num_fg"]) == n_fg
    assert float(aux["num_bg"]) == len(reference["bg_vectors"])
    if pooling == "bap":
        assert reference["use_bap"] == [True, False, True, False]
    logits = np.stack(reference["logits"])
    acc = np.mean(np.argmax(logits, -1) == np.asarray(reference["targets"]))
    assert abs(float(aux["accuracy"]) - acc) < 1e-6
    # Ground-truth box classification: window-averaged logits, argmax over classes 1..C-1.
    weight = batch["classifier_weight"].astype(np.float64)
    box_hits = [np.argmax((vecs @ weight).mean(0)[1:]) + 1 == batch["box_labels"][b, k]
                for (b, k), vecs in reference["fg_vectors"].items()]
    assert abs(float(aux["box_accuracy"]) - np.mean(box_hits)) < 1e-6
    assert float(aux["num_boxes"]) == len(box_hits)


def test_map_over_images_same(batch):
    loss_a, _, vec_a = _jitted(grid_size=4)(**batch)
    loss_b, _, vec_b = _jitted(grid_size=4, map_over_images=True)(**batch)
    assert _rel(vec_b["fg_vectors"], vec_a["fg_vectors"]) < 1e-6
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6 * abs(float(loss_a))


def test_gradients(batch):
    """jax.grad is finite (NaN padded box, image without background, 1-pixel ROIs) and matches
    the reference: analytic gradient for the classifier, central differences for the features."""
    args = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(features, weight):
        return bap.bap_loss(features, args["bg_mask"], args["boxes"],
                            args["box_labels"], args["box_valid"], weight, grid_size=4)[0]

    g_feat, g_weight = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(
        args["features"], args["classifier_weight"])
    assert np.isfinite(np.asarray(g_feat)).all() and np.isfinite(np.asarray(g_weight)).all()
    # Features of image 1 (no background) still receive gradient through GAP.
    assert np.abs(np.asarray(g_feat[1])).sum() > 0

    reference = ref.stage1_reference(**batch, grid_size=4)
    logits = np.stack(reference["logits"])
    targets = np.asarray(reference["targets"])
    vectors = np.concatenate([np.stack(list(reference["fg_vectors"].values())).reshape(-1, D),
                              np.stack(list(reference["bg_vectors"].values()))])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs[np.arange(len(targets)), targets] -= 1
    expected_w = vectors.T @ probs / len(targets)
    diff_w = _rel(g_weight, expected_w)

    direction = np.random.default_rng(1).normal(size=batch["features"].shape)
    eps = 1e-4

    def ref_loss(features):
        return ref.stage1_reference(**{**batch, "features": features}, grid_size=4)["loss"]

    f64 = batch["features"].astype(np.float64)
    numeric = (ref_loss(f64 + eps * direction) - ref_loss(f64 - eps * direction)) / (2 * eps)
    analytic = float(np.sum(np.asarray(g_feat, np.float64) * direction))
    diff_f = abs(analytic - numeric) / abs(numeric)
    print(f"grad classifier rel {diff_w:.2e}, grad features (directional) rel {diff_f:.2e}")
    assert diff_w < 1e-5
    assert diff_f < 1e-4


def test_grid_padding_rule():
    assert bap.grid_padding(41, 4) == (0, 3)  # odd pad all after: 41 -> 44
    assert bap.grid_padding(42, 4) == (1, 1)  # even pad split
    assert bap.grid_padding(44, 4) == (0, 0)
    assert bap.grid_padding(41, 1) == (0, 0)
    x = jnp.ones((1, 42, 41, 2))
    y = bap.pad_for_grid(x, 4)
    assert y.shape == (1, 44, 44, 2)
    assert float(y[0, 0].sum()) == 0 and float(y[0, 1, :41].min()) == 1
    assert float(y[0, 1:43, 41:].sum()) == 0 and float(y[0, 43].sum()) == 0


def test_grid_prototypes_41_cells_of_11():
    """41 x 41 map, N = 4: cells of 11 x 11 on the zero-padded 44 x 44 map."""
    rng = np.random.default_rng(2)
    feat = rng.normal(size=(1, 41, 41, 3)).astype(np.float32)
    mask = (rng.random((1, 41, 41)) < 0.3).astype(np.float32)
    mask[0, :11, 11:22] = 0  # an invalid cell (row 0, column 1)
    protos, valid = bap.grid_background_prototypes(jnp.asarray(feat), jnp.asarray(mask), 4)
    cells = ref.background_prototypes(feat[0].astype(np.float64), mask[0], 4)
    assert list(np.asarray(valid[0])) == [ok for _, ok in cells] and not cells[1][1]
    assert _rel(protos[0], np.stack([p for p, _ in cells])) < 1e-6
    # Cell (3, 3) spans rows/columns 33..43 of the padded map: 33..40 of the original.
    sel = mask[0, 33:41, 33:41]
    expected = (feat[0, 33:41, 33:41] * sel[..., None]).sum((0, 1)) / sel.sum()
    np.testing.assert_allclose(protos[0, 15], expected, rtol=1e-5)


def test_window_masks_by_hand():
    # Sizes 1..5 along rows with O = 2: (stride, kernel) = (-, 1), (1, 1), (1, 2), (2, 2), (2, 3).
    expected = {1: ([0], [0]), 2: ([0], [1]), 3: ([0, 1], [1, 2]), 4: ([0, 1], [2, 3]),
                5: ([0, 1, 2], [2, 3, 4])}
    sizes = jnp.arange(1, 6)
    masks = np.asarray(bap.window_masks(sizes, 6, 2, "end"))
    for i, n in enumerate(range(1, 6)):
        for o in range(2):
            assert list(np.nonzero(masks[i, o])[0]) == expected[n][o], (n, o)
    # O = 3, size 2: rows padded at the bottom (0, 1, 1), columns on the left (0, 0, 1).
    assert [int(np.argmax(r)) for r in np.asarray(bap.window_masks(jnp.array(2), 4, 3, "end"))] \
        == [0, 1, 1]
    assert [int(np.argmax(r)) for r in np.asarray(bap.window_masks(jnp.array(2), 4, 3, "start"))] \
        == [0, 0, 1]


def test_roi_sizes_by_hand():
    # w = 41: x_f = (x_n + 1) * 20. Box x_f 3.5 .. 10.25 -> ceil 11 - floor 3 = 8.
    box = jnp.array([[[3.5 / 20 - 1, 0.0 / 20 - 1, 10.25 / 20 - 1, 40.0 / 20 - 1]]])
    roi_h, roi_w = bap.roi_sizes(box, (41, 41))
    assert (int(roi_h[0, 0]), int(roi_w[0, 0])) == (40, 8)


def test_use_bap_threshold():
    mask = np.zeros((3, 16, 16), np.float32)
    mask[0].flat[:32] = 1  # exactly 12.5%: GAP
    mask[1].flat[:33] = 1  # just above: BAP
    mask[2].flat[:200] = 1
    cells = np.array([[True], [True], [False]])  # image 2: no valid cell -> GAP
    assert list(np.asarray(bap.use_bap_per_image(jnp.asarray(mask), jnp.asarray(cells)))) == \
        [False, True, False]


def test_sampler_against_torch_grid_sample(batch):
    """Second reference for the ROI resampling: torch's F.grid_sample, box by box."""
    torch = pytest.importorskip("torch")
    feats = batch["features"]
    rois, roi_h, roi_w = jax.jit(bap.sample_rois)(feats, np.nan_to_num(batch["boxes"]))
    worst = 0.0
    for b in range(4):
        fmap = torch.from_numpy(feats[b]).permute(2, 0, 1)[None]
        for k in range(K):
            if not batch["box_valid"][b, k]:
                continue
            x0, y0, x1, y1 = torch.from_numpy(batch["boxes"][b, k])
            hh, ww = int(roi_h[b, k]), int(roi_w[b, k])
            gx = torch.linspace(x0, x1, ww).view(1, 1, ww, 1).expand(1, hh, ww, 1)
            gy = torch.linspace(y0, y1, hh).view(1, hh, 1, 1).expand(1, hh, ww, 1)
            out = torch.nn.functional.grid_sample(fmap, torch.cat([gx, gy], -1),
                                                  align_corners=False)
            expected = out[0].permute(1, 2, 0).numpy()
            ours = np.asarray(rois[b, k])
            worst = max(worst, _rel(ours[:hh, :ww], expected))
            assert np.all(ours[hh:] == 0) and np.all(ours[:, ww:] == 0)
    print(f"sample_rois vs torch grid_sample: max rel {worst:.2e}")
    assert worst < 1e-6


def test_box_classification_counts_by_hand():
    logits = np.zeros((1, 3, 4, 4), np.float32)
    logits[0, 0, :, 2] = 1.0              # box 0 -> class 2 (correct)
    logits[0, 1, :, 0] = 5.0              # box 1: background largest; among 1..3 -> class 3
    logits[0, 1, :, 3] = 1.0
    logits[0, 1, 0, 1] = 3.0              # one window votes class 1: mean 0.75 < 1.0
    logits[0, 2, :, 1] = 1.0              # padded box
    labels = np.array([[2, 3, 1]])
    valid = np.array([[True, True, False]])
    correct, total = bap.box_classification_counts(logits, labels, valid)
    assert (float(correct), float(total)) == (2.0, 2.0)
    correct, _ = bap.box_classification_counts(logits, labels, valid, exclude_background=False)
    assert float(correct) == 1.0


def test_cam_precision_by_hand():
    label = np.array([[[1, 1, 0], [2, 255, 0]]], np.uint8)
    cams = np.zeros((1, 2, 3, 3), np.float32)
    cams[0, :, :, 1] = [[1.0, 0.5, 0.25], [0.5, 1.0, 0.0]]   # inside 1.5, outside 0.75, ignore 1.0
    cams[0, :, :, 2] = [[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]    # inside 1.0, outside 1.0
    tp, fp = bap.cam_precision_counts(jnp.asarray(cams), jnp.asarray(label))
    np.testing.assert_allclose(np.asarray(tp), [0.0, 1.5, 1.0])
    np.testing.assert_allclose(np.asarray(fp), [0.0, 0.75, 1.0])
    per_class, mean = bap.cam_precision(tp, fp)
    assert math.isnan(per_class[0]) and math.isclose(mean, (1.5 / 2.25 + 0.5) / 2)


def test_bad_inputs_raise(batch):
    b = batch
    with pytest.raises(ValueError, match="features"):
        bap.bap_loss(b["features"][0], b["bg_mask"], b["boxes"], b["box_labels"], b["box_valid"],
                     b["classifier_weight"])
    with pytest.raises(ValueError, match="boxes"):
        bap.bap_loss(b["features"], b["bg_mask"], b["boxes"][..., :3], b["box_labels"],
                     b["box_valid"], b["classifier_weight"])
    with pytest.raises(ValueError, match="classifier_weight"):
        bap.bap_loss(b["features"], b["bg_mask"], b["boxes"], b["box_labels"], b["box_valid"],
                     b["classifier_weight"].T)
    with pytest.raises(ValueError, match="pooling"):
        bap.bap_vectors(b["features"], b["bg_mask"], b["boxes"], pooling="max")
    with pytest.raises(ValueError, match="grid_size"):
        bap.grid_background_prototypes(b["features"], b["features"][..., 0], 0)
