"""Evaluation math against a direct NumPy loop over scales and flips, with a tiny fake model."""

import math

import numpy as np
import pytest

import jax.numpy as jnp

from bana_jax import evaluation

C = 4
PROJECTION = np.random.default_rng(0).normal(size=(3, C)).astype(np.float32) / 50.0


def fake_model_np(x):
    """Output stride 2 (every other pixel), then tanh of a projection: scores in (-1, 1)."""
    return np.tanh(x[:, ::2, ::2] @ PROJECTION)


def fake_model(x):
    return jnp.tanh(x[:, ::2, ::2] @ PROJECTION)


def bilinear_loop(x, out_h, out_w):
    """align_corners=True, one output pixel at a time (float64)."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


def mean_scores_loop(images, scales, flip):
    """The official validation(): sum over scales x {image, flipped}, divided by the pass count."""
    b, h, w, _ = images.shape
    total, passes = np.zeros((b, h, w, C)), 0
    for scale in scales:
        scaled = images if scale == 1 else bilinear_loop(images, math.floor(h * scale), math.floor(w * scale))
        total += bilinear_loop(fake_model_np(scaled), h, w)
        passes += 1
        if flip:
            total += bilinear_loop(fake_model_np(scaled[:, :, ::-1]), h, w)[:, :, ::-1]
            passes += 1
    return total / passes


@pytest.fixture(scope="module")
def images():
    # 7 x 9 (odd sizes: floor matters at 0.5 / 0.75 / 1.5), two images.
    return np.random.default_rng(1).uniform(-120, 130, (2, 7, 9, 3)).astype(np.float32)


def test_multiscale_flip_matches_loop(images):
    got = np.asarray(evaluation.multiscale_scores(fake_model, jnp.asarray(images)))
    ref = mean_scores_loop(images.astype(np.float64), evaluation.EVAL_SCALES, flip=True)
    assert got.shape == (2, 7, 9, C)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    # Flipping matters for this model (odd width, stride 2): the test can see a missing flip.
    no_flip = mean_scores_loop(images.astype(np.float64), evaluation.EVAL_SCALES, flip=False)
    assert np.abs(no_flip - ref).max() > 1e-3


def test_pass_sizes_follow_pytorch_scale_factor():
    seen = []

    def recording_model(x):
        seen.append(x.shape[1:3])
        return fake_model(x)

    evaluation.multiscale_scores(recording_model, jnp.zeros((1, 7, 9, 3)))
    assert seen == [(7, 9), (7, 9), (3, 4), (3, 4), (5, 6), (5, 6), (10, 13), (10, 13)]
    assert evaluation.floor_scaled_size(333, 0.75) == 249 and evaluation.floor_scaled_size(333, 1.5) == 499


def test_single_scale_is_one_pass(images):
    got = np.asarray(evaluation.multiscale_scores(fake_model, jnp.asarray(images), scales=(1.0,), flip=False))
    ref = bilinear_loop(fake_model_np(images.astype(np.float64)), 7, 9)
    np.testing.assert_allclose(got, ref, atol=2e-6)


def test_predict_without_crf_is_argmax_of_mean(images):
    pred = evaluation.predict(fake_model, jnp.asarray(images))
    ref = mean_scores_loop(images.astype(np.float64), evaluation.EVAL_SCALES, flip=True).argmax(-1)
    assert pred.dtype == np.int32
    np.testing.assert_array_equal(pred, ref)


def test_predict_with_fake_crf(images):
    calls = []
    tau = 20.0

    def fake_crf(image, probs, **kwargs):
        calls.append((image, probs, kwargs))
        return probs[::-1]  # reverse the classes: argmax becomes the least likely class

    rgb = np.random.default_rng(2).integers(0, 256, images.shape).astype(np.uint8)
    pred = evaluation.predict(fake_model, jnp.asarray(images), crf_images=rgb, tau=tau,
                              crf_params=evaluation.CRF_PARAMS["deeplab_v1"], crf_fn=fake_crf)
    mean = mean_scores_loop(images.astype(np.float64), evaluation.EVAL_SCALES, flip=True)
    probs = np.exp(tau * mean) / np.exp(tau * mean).sum(-1, keepdims=True)
    assert len(calls) == 2
    for b, (image, crf_probs, kwargs) in enumerate(calls):
        np.testing.assert_array_equal(image, rgb[b])
        assert crf_probs.shape == (C, 7, 9) and crf_probs.dtype == np.float32
        np.testing.assert_allclose(crf_probs, probs[b].transpose(2, 0, 1), atol=1e-5)
        assert kwargs == {"bi_w": 4.0, "bi_xy_std": 121.0, "bi_rgb_std": 5.0, "pos_w": 3.0,
                          "pos_xy_std": 3.0, "n_iter": 10}
    np.testing.assert_array_equal(pred, (C - 1) - probs.argmax(-1))


def test_crf_params_v2_order():
    seen = {}

    def fake_crf(image, probs, **kwargs):
        seen.update(kwargs)
        return probs

    evaluation.crf_refine(np.zeros((2, 3, 3), np.uint8), np.full((2, 3, C), 0.25),
                          evaluation.CRF_PARAMS["deeplab_v2"], n_iter=5, crf_fn=fake_crf)
    assert seen == {"bi_w": 4.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0, "pos_w": 3.0, "pos_xy_std": 1.0, "n_iter": 5}


def test_official_crf_image_quirk():
    x = np.array([[[0.4, 3.7, 250.2]]], np.float32)
    np.testing.assert_array_equal(evaluation.official_crf_image(x), [[[0, 3, 250]]])
    assert evaluation.official_crf_image(x).dtype == np.uint8


def test_bad_inputs(images):
    with pytest.raises(ValueError, match=r"images must be \(B, H, W, 3\)"):
        evaluation.multiscale_scores(fake_model, jnp.asarray(images[0]))
    with pytest.raises(ValueError, match="crf_images must be uint8"):
        evaluation.predict(fake_model, jnp.asarray(images), crf_params=evaluation.CRF_PARAMS["deeplab_v1"])
    with pytest.raises(ValueError, match="params must be"):
        evaluation.crf_refine(np.zeros((2, 3, 3), np.uint8), np.zeros((2, 3, C)), (4, 121, 5),
                              crf_fn=lambda *a, **k: None)
    with pytest.raises(ValueError, match="image_rgb must be uint8"):
        evaluation.crf_refine(np.zeros((2, 3, 3)), np.zeros((2, 3, C)), (4, 121, 5, 3, 3),
                              crf_fn=lambda *a, **k: None)
    with pytest.raises(ValueError, match="shrinks"):
        evaluation.floor_scaled_size(1, 0.5)


def test_crf_refine_with_the_real_crf_matches_pydensecrf():
    """The V1 parameters reach the CRF in the right places: compare with pydensecrf set up by hand."""
    pydcrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(4), size=(23, 31)).astype(np.float32)
    got = evaluation.crf_refine(image, probs, evaluation.CRF_PARAMS["deeplab_v1"])
    bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std = evaluation.CRF_PARAMS["deeplab_v1"]
    crf = pydcrf.DenseCRF2D(31, 23, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.transpose(2, 0, 1))))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)
    want = np.array(crf.inference(10)).reshape(4, 23, 31).transpose(1, 2, 0)
    np.testing.assert_allclose(got, want, atol=1e-4)
