"""Stage-2 pseudo labels against a loop-based float64 NumPy transcription of the paper's stage 2, and cases
whose answer is known by construction."""

import numpy as np
import pytest

from bana_jax import pseudo_labels as pl

# ------------------------------------------------------------------------------------------------
# Reference: the paper's stage 2 / the official script, literally, in float64
# ------------------------------------------------------------------------------------------------


def ref_interp(n_in, n_out):
    """align_corners=True linear interpolation matrix (out, in), written out independently."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        t = src - i0
        m[o, i0] += 1 - t
        m[o, i1] += t
    return m


def normalize(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ref_stage2(features, image_hw, boxes, labels, weight, crf, use_bg_unary=True, unseen=(), region=None):
    """region: boxes whose union is the in-box region (the official BgMaskfromBoxes), default `boxes`."""
    height, width = image_hw
    f = np.einsum("yh,hwd,xw->dyx", ref_interp(features.shape[0], height), features.astype(np.float64),
                  ref_interp(features.shape[1], width))  # (D, H, W), like the official NCHW
    weight = weight.astype(np.float64)

    def pixel_boxes(bs):
        ib = [[int(np.floor(v)) for v in b] for b in bs]
        return [[min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width),
                 min(max(y1, 0), height)] for x0, y0, x1, y1 in ib]

    ib = pixel_boxes(boxes)
    bg_mask = np.ones((height, width))
    for x0, y0, x1, y1 in pixel_boxes(boxes if region is None else region):
        bg_mask[y0:y1, x0:x1] = 0
    inside = bg_mask == 0
    nf = normalize(f, 0)
    proto = (f * bg_mask).sum((1, 2)) / (bg_mask.sum() + 1e-12)
    attn = np.maximum((nf * normalize(proto, 0)[:, None, None]).sum(0), 0)
    attn[attn < 0.99 * attn.max()] = 0
    u0 = bg_mask.copy()
    u0[inside] = attn[inside] if use_bg_unary else 0.0
    classes = sorted(set(int(c) for c in labels))
    uc = []
    for c in classes:
        normed = np.zeros((height, width))
        if c in unseen:
            for (x0, y0, x1, y1), lab in zip(ib, labels):
                if lab == c:
                    normed[y0:y1, x0:x1] = 1 - u0[y0:y1, x0:x1]
        else:
            cam = np.maximum(np.einsum("d,dyx->yx", weight[:, c], f), 0)
            for (x0, y0, x1, y1), lab in zip(ib, labels):
                if lab == c and x1 > x0 and y1 > y0:
                    normed[y0:y1, x0:x1] = cam[y0:y1, x0:x1] / (cam[y0:y1, x0:x1].max() + 1e-12)
        uc.append(normed)
    unary = np.stack([u0] + uc)
    e = np.exp(unary[:, inside] - unary[:, inside].max(0))
    unary[:, inside] = e / e.sum(0)
    probs = unary.copy()
    refined = np.array(crf(probs.astype(np.float32)), np.float64)
    box_masks = [np.zeros((height, width)) for _ in classes]
    for k, c in enumerate(classes):
        for (x0, y0, x1, y1), lab in zip(ib, labels):
            if lab == c:
                box_masks[k][y0:y1, x0:x1] = 1
        refined[k + 1] *= box_masks[k]
    tmp = refined.argmax(0)
    y_crf = np.zeros((height, width), np.uint8)
    for k, c in enumerate(classes, 1):
        y_crf[tmp == k] = c
    corr = []
    for k, c in enumerate([0] + classes):
        sel = y_crf == c
        if sel.sum():
            p = normalize(f[:, sel].mean(-1), 0)
        elif c in unseen:
            p = np.zeros(f.shape[0])
        else:
            p = normalize(weight[:, c], 0)
        corr.append(np.maximum((nf * p[:, None, None]).sum(0), 0))
    corr = np.stack(corr)
    corr[0][~inside] = 1
    for k in range(len(classes)):
        corr[k + 1] *= box_masks[k]
    tmp = corr.argmax(0)
    y_ret = np.zeros((height, width), np.uint8)
    for k, c in enumerate(classes, 1):
        y_ret[tmp == k] = c
    return dict(probs=probs, bg_unary=u0, class_unary=np.stack(uc), y_crf=y_crf, y_ret=y_ret)


# ------------------------------------------------------------------------------------------------
# Shared random problem (a few shapes only, to keep compilations few)
# ------------------------------------------------------------------------------------------------

H, W = 45, 61
h, w, D = 7, 9, 16


def fake_crf_fn(seed):
    """A deterministic stand-in for DenseCRF that really changes the argmax (also outside boxes)."""

    def crf(probs):
        noise = np.random.default_rng(seed).uniform(size=probs.shape)
        mixed = 0.5 * probs + 0.5 * noise
        return (mixed / mixed.sum(0, keepdims=True)).astype(np.float32)

    return crf


def random_problem(seed, relu=True):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(h, w, D)).astype(np.float32)
    if relu:
        feats = np.maximum(feats, 0) + 0.01
    weight = rng.normal(size=(D, 21)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 30.1, 40.0], [20, 10, 58.5, 41], [5, 22, 25, 44.9],
                      [40, 2, 61, 20]], np.float32)
    labels = np.array([15, 3, 15, 7])
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return feats, weight, boxes, labels, image


def run(feats, image, boxes, labels, weight, crf, **kw):
    return pl.pseudo_labels(feats, image, boxes, labels, weight, crf=lambda img, p: crf(p), **kw)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_transcription(fast, seed):
    feats, weight, boxes, labels, image = random_problem(seed)
    crf = fake_crf_fn(seed)
    ref = ref_stage2(feats, (H, W), boxes, labels, weight, crf)
    out = run(feats, image, boxes, labels, weight, crf, fast=fast)
    for key in ("probs", "bg_unary", "class_unary"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out["classes"], [3, 7, 15])
    np.testing.assert_array_equal(out["y_crf"], ref["y_crf"])
    np.testing.assert_array_equal(out["y_ret"], ref["y_ret"])
    assert len(np.unique(out["y_ret"])) == 4 and len(np.unique(out["y_crf"])) == 4


@pytest.mark.parametrize("fast", [True, False])
def test_region_apart_from_the_boxes_matches_transcription(fast):
    """The official code's in-box region (BgMaskfromBoxes) is not cut from the boxes it labels with:
    here each region box starts one pixel later, so a row and a column of every box lie outside the
    region (there the unaries reach the CRF unnormalised) and the region is smaller than the boxes."""
    feats, weight, boxes, labels, image = random_problem(2)
    region = boxes + np.array([1, 1, 0, 0], np.float32)
    crf = fake_crf_fn(2)
    ref = ref_stage2(feats, (H, W), boxes, labels, weight, crf, region=region)
    out = run(feats, image, boxes, labels, weight, crf, fast=fast, region_boxes=region)
    for key in ("probs", "bg_unary", "class_unary"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(out["y_crf"], ref["y_crf"])
    np.testing.assert_array_equal(out["y_ret"], ref["y_ret"])
    plain = run(feats, image, boxes, labels, weight, crf, fast=fast)
    assert not np.allclose(plain["probs"], out["probs"])  # the region matters
    assert np.any(out["probs"].sum(0) > 1.0 + 1e-3)  # unnormalised outside the region, as the official
    with pytest.raises(ValueError, match="region_boxes"):
        run(feats, image, boxes, labels, weight, crf, region_boxes=region[:2])


def test_variants_match_transcription():
    feats, weight, boxes, labels, image = random_problem(2)
    crf = fake_crf_fn(2)
    for kw, ref_kw in [(dict(use_bg_unary=False), dict(use_bg_unary=False)),
                       (dict(unseen_classes=(7,)), dict(unseen=(7,)))]:
        ref = ref_stage2(feats, (H, W), boxes, labels, weight, crf, **ref_kw)
        out = run(feats, image, boxes, labels, weight, crf, **kw)
        for key in ("probs", "bg_unary", "class_unary", "y_crf", "y_ret"):
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=f"{kw} {key}")
    # Without u_0 the background logit inside boxes is the constant 0.
    out = run(feats, image, boxes, labels, weight, crf, use_bg_unary=False)
    inside = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in pl.box_pixels(boxes, (H, W)):
        inside[y0:y1, x0:x1] = True
    assert np.all(out["bg_unary"][inside] == 0) and np.all(out["bg_unary"][~inside] == 1)


@pytest.mark.parametrize("seed", [3, 4])
def test_fast_equals_direct(seed):
    feats, weight, boxes, labels, image = random_problem(seed, relu=seed == 3)
    crf = fake_crf_fn(seed)
    fast = run(feats, image, boxes, labels, weight, crf, fast=True)
    direct = run(feats, image, boxes, labels, weight, crf, fast=False)
    for key in ("probs", "bg_unary", "class_unary"):
        scale = np.abs(direct[key]).max()
        assert np.abs(fast[key] - direct[key]).max() <= 1e-5 * scale, key
    np.testing.assert_array_equal(fast["y_crf"], direct["y_crf"])
    np.testing.assert_array_equal(fast["y_ret"], direct["y_ret"])


def test_fast_primitives_equal_direct():
    """Norms, dot products and masked sums of the upsampled features, signed random features."""
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(h, w, D)).astype(np.float32)
    geom = pl.make_geometry((h, w), (H, W))
    import jax.numpy as jnp
    jgeom = pl.Geometry(*map(jnp.asarray, geom))
    fast, direct = pl._FastOps(jnp.asarray(feats), jgeom), pl._DirectOps(jnp.asarray(feats), jgeom)
    up = np.einsum("yh,hwd,xw->yxd", ref_interp(h, H), feats.astype(np.float64), ref_interp(w, W))
    np.testing.assert_allclose(fast.norms(), np.linalg.norm(up, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(direct.norms(), np.linalg.norm(up, axis=-1), rtol=1e-5)
    vectors = rng.normal(size=(D, 3)).astype(np.float32)
    np.testing.assert_allclose(fast.dots(vectors), np.einsum("yxd,dk->kyx", up, vectors), rtol=1e-4,
                               atol=1e-5)
    masks = (rng.uniform(size=(2, H, W)) < 0.3).astype(np.float32)
    np.testing.assert_allclose(fast.masked_sums(masks), np.einsum("kyx,yxd->kd", masks, up),
                               rtol=1e-5, atol=1e-4)


def test_padding_to_buckets_changes_nothing():
    feats, weight, boxes, labels, image = random_problem(6)
    crf = fake_crf_fn(6)
    plain = run(feats, image, boxes, labels, weight, crf)
    # Garbage in the padded feature cells must not matter either.
    padded = run(feats, image, boxes, labels, weight, crf, feature_bucket=(9, 12),
                 image_bucket=(64, 64), max_boxes=6, max_classes=5)
    for key in ("probs", "bg_unary", "class_unary"):
        np.testing.assert_allclose(padded[key], plain[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("y_crf", "y_ret"):
        np.testing.assert_array_equal(padded[key], plain[key])
    geom = pl.make_geometry((h, w), (H, W), padded_feature_hw=(9, 12), padded_image_hw=(64, 64))
    prepared = pl.prepare_boxes(boxes, labels, (H, W), weight, max_boxes=6, max_classes=5)
    noisy = np.random.default_rng(0).normal(size=(9, 12, D)).astype(np.float32) * 100
    noisy[:h, :w] = feats
    unaries = pl.stage2_unaries(noisy, geom, prepared)
    np.testing.assert_allclose(np.asarray(unaries.probs)[:4, :H, :W], plain["probs"], rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.asarray(unaries.probs)[4:] == 0)  # padding channels never get probability


# ------------------------------------------------------------------------------------------------
# Hand-built cases (features at image resolution: the upsampling is the identity)
# ------------------------------------------------------------------------------------------------


def identity_crf(image, probs):
    return probs


def test_single_box_obvious_answer():
    size = 12
    e_bg, e_obj = np.eye(2, dtype=np.float32)
    feats = np.tile(e_bg, (size, size, 1))
    feats[4:8, 5:9] = e_obj  # the object, strictly inside the box
    boxes = np.array([[3, 2, 10, 10]], np.float32)  # rows 2..9, cols 3..9
    weight = np.stack([e_bg, e_obj, -e_obj], axis=1)  # class 1 = object
    image = np.zeros((size, size, 3), np.uint8)
    out = pl.pseudo_labels(feats, image, boxes, [1], weight, crf=identity_crf)
    expected = np.zeros((size, size), np.uint8)
    expected[4:8, 5:9] = 1
    np.testing.assert_array_equal(out["y_crf"], expected)
    np.testing.assert_array_equal(out["y_ret"], expected)
    # u_0: 1 outside the box and on in-box background (cos = 1), 0 on the object (cos = 0).
    np.testing.assert_array_equal(out["bg_unary"], 1 - expected)
    np.testing.assert_allclose(out["class_unary"][0], expected, atol=1e-6)
    sigma = 1 / (1 + np.e)
    inside = np.zeros((size, size), bool)
    inside[2:10, 3:10] = True
    np.testing.assert_allclose(out["probs"][0][inside & (expected == 1)], sigma, rtol=1e-6)
    np.testing.assert_allclose(out["probs"][0][inside & (expected == 0)], 1 - sigma, rtol=1e-6)
    assert np.all(out["probs"][0][~inside] == 1) and np.all(out["probs"][1][~inside] == 0)


def test_overlapping_boxes_later_box_wins():
    size = 10
    feats = np.zeros((size, size, 1), np.float32)
    feats[:, :, 0] = 1.0
    feats[1:3, 1:3] = 2.0  # peak of box A
    feats[6:8, 6:8] = 4.0  # peak of box B
    weight = np.array([[0.0, 1.0]], np.float32)
    box_a, box_b = [0, 0, 6, 6], [4, 4, 10, 10]  # overlap: rows/cols 4..5, value 1
    image = np.zeros((size, size, 3), np.uint8)
    ab = pl.pseudo_labels(feats, image, np.array([box_a, box_b], np.float32), [1, 1], weight,
                          crf=identity_crf)
    ba = pl.pseudo_labels(feats, image, np.array([box_b, box_a], np.float32), [1, 1], weight,
                          crf=identity_crf)
    np.testing.assert_allclose(ab["class_unary"][0, 4:6, 4:6], 1 / 4, rtol=1e-6)
    np.testing.assert_allclose(ba["class_unary"][0, 4:6, 4:6], 1 / 2, rtol=1e-6)
    np.testing.assert_allclose(ab["class_unary"][0, 1:3, 1:3], 1.0, rtol=1e-6)
    np.testing.assert_allclose(ab["class_unary"][0, 0, 0], 0.5, rtol=1e-6)


def test_no_background_pixel_is_finite():
    feats, weight, _, _, _ = random_problem(7)
    image = np.zeros((H, W, 3), np.uint8)
    boxes = np.array([[0, 0, W, H], [10, 5, 30, 25]], np.float32)
    out = pl.pseudo_labels(feats, image, boxes, [4, 9], weight, crf=identity_crf)
    for key in ("probs", "bg_unary", "class_unary"):
        assert np.all(np.isfinite(out[key])), key
    # No prototype: A = 0, so u_0 = 0 everywhere (all pixels are inside a box).
    assert np.all(out["bg_unary"] == 0)
    np.testing.assert_allclose(out["probs"].sum(0), 1, rtol=1e-6)
    ref = ref_stage2(feats, (H, W), boxes, [4, 9], weight, lambda p: p)
    np.testing.assert_allclose(out["class_unary"], ref["class_unary"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["y_crf"], ref["y_crf"])


def test_retrieval_falls_back_to_classifier_weight():
    """A class that Y_crf never picks gets its classifier weight as prototype."""
    size = 8
    e = np.eye(3, dtype=np.float32)
    feats = np.tile(e[0], (size, size, 1))
    feats[2:6, 2:6] = e[1]
    weight = np.stack([e[0], e[1], e[2]], axis=1)
    # Class 2's box is covered by class 1's later box, and the fake CRF gives it nothing.
    boxes = np.array([[2, 2, 6, 6]], np.float32)
    prepared = pl.prepare_boxes(boxes, [2], (size, size), weight)
    geom = pl.make_geometry((size, size), (size, size))
    crf_map = np.zeros((size, size), np.int32)  # Y_crf: all background
    ret = pl.retrieval(feats, geom, crf_map, prepared)
    scores = np.asarray(ret.scores)
    # Class 2 prototype = w_2 = e_2, orthogonal to every feature -> 0; background prototype = mean
    # of all pixels (normalised) -> positive everywhere, so everything is background.
    np.testing.assert_allclose(scores[1], 0, atol=1e-7)
    assert np.all(np.asarray(ret.channels) == 0)
    ret = pl.retrieval(feats + e[2] * 0.5, geom, crf_map, prepared)
    np.testing.assert_allclose(np.asarray(ret.scores)[1][2:6, 2:6], 0.5 / np.sqrt(1.25), rtol=1e-6)


def test_crf_channels_masks_and_ties():
    refined = np.zeros((3, 4, 5), np.float32)
    refined[1] = 0.6  # class channel high everywhere, but its box is only rows 0..1, cols 0..1
    refined[0] = 0.3
    refined[2, 3, 4] = 0.3  # a tie with background -> background
    boxes_px = np.array([[0, 0, 2, 2], [3, 2, 5, 4], [0, 0, 0, 0]], np.int32)
    channel = np.array([1, 2, 0], np.int32)
    got = pl.crf_channels(refined, boxes_px, channel)
    expected = np.zeros((4, 5), np.int32)
    expected[0:2, 0:2] = 1
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(pl.channels_to_classes(got, [5, 12]), expected * 5)


def test_box_pixels_and_bad_inputs():
    np.testing.assert_array_equal(pl.box_pixels([[-3.5, 2.9, 7.99, 100.0]], (20, 30)), [[0, 2, 7, 20]])
    feats, weight, boxes, labels, image = random_problem(0)
    with pytest.raises(ValueError, match="boxes"):
        pl.box_pixels(np.zeros((3, 5)), (10, 10))
    with pytest.raises(ValueError, match="box_labels"):
        pl.prepare_boxes(boxes, [0, 1, 2, 3], (H, W), weight)
    with pytest.raises(ValueError, match="classifier_weight"):
        pl.prepare_boxes(boxes, labels, (H, W), weight[0])
    with pytest.raises(ValueError, match="image"):
        pl.pseudo_labels(feats, image.astype(np.float32), boxes, labels, weight, crf=identity_crf)
    with pytest.raises(ValueError, match="padded"):
        pl.make_geometry((h, w), (H, W), padded_image_hw=(10, 10))
    geom = pl.make_geometry((h, w), (H, W))
    prepared = pl.prepare_boxes(boxes, labels, (H, W), weight)
    with pytest.raises(ValueError, match="features"):
        pl.stage2_unaries(feats[:-1], geom, prepared)


def test_remapped_weights_label_another_class_list():
    """VOC -> COCO: classes of an 81-entry list are scored by the VOC column they map to, or (no
    VOC class) are unseen and get 1 - u_0 inside their boxes, as the transcription does."""
    feats, weight, boxes, _, image = random_problem(5)
    columns = np.full(81, -1)
    columns[0], columns[1], columns[62] = 0, 15, 9  # background, person -> 15, chair -> 9
    labels = np.array([1, 40, 1, 62])
    remapped, unseen = pl.remap_classifier_weight(weight, columns)
    expected = np.zeros((D, 81), np.float32)
    for c, column in enumerate(columns):
        if column >= 0:
            expected[:, c] = weight[:, column]
    np.testing.assert_array_equal(remapped, expected)
    assert unseen == tuple(c for c in range(81) if c not in (0, 1, 62))
    crf = fake_crf_fn(5)
    ref = ref_stage2(feats, (H, W), boxes, labels, expected, crf, unseen=unseen)
    out = run(feats, image, boxes, labels, remapped, crf, unseen_classes=unseen)
    for key in ("probs", "bg_unary", "class_unary", "y_crf", "y_ret"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    x0, y0, x1, y1 = pl.box_pixels(boxes, (H, W))[1]  # the box of class 40 (channel 2)
    np.testing.assert_allclose(out["class_unary"][1, y0:y1, x0:x1], 1 - out["bg_unary"][y0:y1, x0:x1])
    for bad in (np.r_[-1, columns[1:]], np.r_[columns[:-1], 21], np.r_[columns[:-1], -2]):
        with pytest.raises(ValueError, match="columns"):
            pl.remap_classifier_weight(weight, bad)
