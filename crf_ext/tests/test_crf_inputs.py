"""pydensecrf's usual troubles, in both APIs (dense_crf / dense_crf_batch and DenseCRF2D): inputs of
any dtype and memory layout are taken exactly as NumPy converts them, and standard deviations from
tiny to huge give a clear error or a correct result, never a crash."""

import re

import numpy as np
import pydensecrf.densecrf as pydcrf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crf_ext

RNG = np.random.default_rng(7)
HEIGHT, WIDTH, LABELS = 12, 17, 3
IMAGE = RNG.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
PROBS = RNG.random((LABELS, HEIGHT, WIDTH))
PROBS /= PROBS.sum(0)
UNARY = -np.log(PROBS.reshape(LABELS, -1))


def bits(array):
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


def layouts(array):
    """`array` under other dtypes and memory layouts, each with what NumPy makes of it as float32."""
    reversed_copy = np.ascontiguousarray(array[..., ::-1])
    strided = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
    strided[..., ::2] = array
    cases = {
        "float64": array.astype(np.float64),
        "float16": array.astype(np.float16),
        "big-endian float32": array.astype(">f4"),
        "integers": np.round(array * 5).astype(np.int32),
        "bool": array > array.mean(),
        "Fortran order": np.asfortranarray(array),
        "every other column": strided[..., ::2],
        "negative stride": reversed_copy[..., ::-1],
    }
    return {name: (value, np.asarray(value, dtype=np.float32)) for name, value in cases.items()}


@pytest.mark.parametrize("case", list(layouts(PROBS)))
def test_dense_crf_probs_of_any_dtype_and_layout(case):
    given_probs, as_numpy = layouts(PROBS)[case]
    expected = crf_ext.dense_crf(IMAGE, np.ascontiguousarray(as_numpy))
    assert np.array_equal(bits(crf_ext.dense_crf(IMAGE, given_probs)), bits(expected))
    batch = crf_ext.dense_crf_batch([IMAGE, IMAGE], [given_probs, as_numpy])
    assert np.array_equal(bits(batch[0]), bits(expected)) and np.array_equal(bits(batch[1]), bits(expected))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint16, np.int8])
@pytest.mark.parametrize("layout", ["C", "Fortran", "channels view", "negative stride"])
def test_images_of_integer_dtypes_and_any_layout(dtype, layout):
    image = (IMAGE // 2).astype(dtype)  # 0..127 fits every dtype here
    if layout == "Fortran":
        image = np.asfortranarray(image)
    elif layout == "channels view":
        image = np.ascontiguousarray(image.transpose(2, 0, 1)).transpose(1, 2, 0)
    elif layout == "negative stride":
        image = np.ascontiguousarray(image[::-1])[::-1]
    as_uint8 = np.ascontiguousarray(image, dtype=np.uint8)
    expected = crf_ext.dense_crf(as_uint8, PROBS)
    assert np.array_equal(bits(crf_ext.dense_crf(image, PROBS)), bits(expected))
    assert np.array_equal(bits(crf_ext.dense_crf_batch([image], [PROBS])[0]), bits(expected))
    ours = densecrf2d(IMAGE.shape, UNARY, rgbim=image)
    assert np.array_equal(bits(ours.inference(3)), bits(densecrf2d(IMAGE.shape, UNARY, rgbim=as_uint8).inference(3)))


def densecrf2d(shape, unary, rgbim=IMAGE, compat=3.0, sxy=3.0, srgb=13.0, bi_sxy=20.0):
    crf = crf_ext.DenseCRF2D(shape[1], shape[0], unary.shape[0])
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=sxy, compat=compat)
    crf.addPairwiseBilateral(sxy=bi_sxy, srgb=srgb, rgbim=rgbim, compat=compat)
    return crf


@pytest.mark.parametrize("case", list(layouts(UNARY)))
def test_densecrf2d_unary_compat_and_features_of_any_dtype_and_layout(case):
    given_unary, as_numpy = layouts(UNARY)[case]
    expected = densecrf2d(IMAGE.shape, np.ascontiguousarray(as_numpy)).inference(3)
    assert np.array_equal(bits(densecrf2d(IMAGE.shape, given_unary).inference(3)), bits(expected))
    # The same conversions for a compatibility matrix and for free-form features.
    compat = np.arange(1, 1 + LABELS ** 2).reshape(LABELS, LABELS) / 4.0
    given_compat, compat_numpy = layouts(compat)[case]
    features = np.stack(np.mgrid[0:HEIGHT, 0:WIDTH], 0).reshape(2, -1) / 3.0
    given_features, features_numpy = layouts(features)[case]
    results = []
    for c, f in ((given_compat, given_features), (np.ascontiguousarray(compat_numpy), np.ascontiguousarray(features_numpy))):
        crf = crf_ext.DenseCRF(HEIGHT * WIDTH, LABELS)
        crf.setUnaryEnergy(UNARY.astype(np.float32))
        crf.addPairwiseEnergy(f, compat=c)
        results.append(bits(crf.inference(3)))
    assert np.array_equal(results[0], results[1])


def test_densecrf2d_matches_pydensecrf_on_a_non_contiguous_image():
    """pydensecrf needs a C-contiguous uint8 image; ours takes any view and gives its result."""
    view = np.asfortranarray(IMAGE)
    half = UNARY.astype(np.float16)  # and a float16 unary, which pydensecrf gets as float32
    unary = np.ascontiguousarray(half, np.float32)
    theirs = pydcrf.DenseCRF2D(WIDTH, HEIGHT, LABELS)
    theirs.setUnaryEnergy(unary)
    theirs.addPairwiseGaussian(sxy=3.0, compat=3.0)
    theirs.addPairwiseBilateral(sxy=20.0, srgb=13.0, rgbim=np.ascontiguousarray(IMAGE), compat=3.0)
    ours = densecrf2d(IMAGE.shape, half, rgbim=view)
    np.testing.assert_allclose(ours.inference(5), np.array(theirs.inference(5)), atol=1e-4)


# Standard deviations.

def mean_field_with_constant_kernel(probs, weight, n_iter):
    """Mean field when every feature is the same point: each normalised message is the mean of Q
    over the image (the point itself included), so Q <- softmax(log p + weight * mean(Q))."""
    logp = np.log(np.clip(probs.reshape(probs.shape[0], -1).astype(np.float64), 1e-5, 1.0))
    q = np.exp(logp) / np.exp(logp).sum(0)
    for _ in range(n_iter):
        logits = logp + weight * q.mean(1, keepdims=True)
        q = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    return q.reshape(probs.shape)


@pytest.mark.parametrize("huge", [1e30, 3e38])
def test_huge_standard_deviations_give_the_constant_kernel_in_every_api(huge):
    stds = dict(bi_xy_std=huge, bi_rgb_std=huge, pos_xy_std=huge)
    expected = mean_field_with_constant_kernel(PROBS, 3.0 + 4.0, 5)
    q = crf_ext.dense_crf(IMAGE, PROBS, bi_w=4.0, pos_w=3.0, n_iter=5, **stds)
    np.testing.assert_allclose(q, expected, atol=2e-5)
    assert np.array_equal(bits(crf_ext.dense_crf_batch([IMAGE], [PROBS], bi_w=4.0, pos_w=3.0, n_iter=5, **stds)[0]),
                          bits(q))
    crf = crf_ext.DenseCRF2D(WIDTH, HEIGHT, LABELS)
    crf.setUnaryEnergy(-np.log(np.clip(PROBS, 1e-5, 1)).reshape(LABELS, -1))
    crf.addPairwiseGaussian(sxy=huge, compat=3.0)
    crf.addPairwiseBilateral(sxy=huge, srgb=huge, rgbim=IMAGE, compat=4.0)
    np.testing.assert_allclose(crf.inference(5).reshape(PROBS.shape), expected, atol=2e-5)


@pytest.mark.parametrize("field", ["bi_rgb_std", "bi_xy_std"])
def test_one_huge_standard_deviation_matches_pydensecrf(field):
    """A huge colour deviation (ignore colour) or position deviation (ignore distance) is a use,
    not a mistake: the result is pydensecrf's."""
    stds = dict(bi_xy_std=20.0, bi_rgb_std=13.0, pos_xy_std=3.0)
    stds[field] = 1e30
    theirs = pydcrf.DenseCRF2D(WIDTH, HEIGHT, LABELS)
    theirs.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(PROBS, 1e-5, 1)).reshape(LABELS, -1), np.float32))
    theirs.addPairwiseGaussian(sxy=stds["pos_xy_std"], compat=3.0)
    theirs.addPairwiseBilateral(sxy=stds["bi_xy_std"], srgb=stds["bi_rgb_std"], rgbim=IMAGE, compat=4.0)
    expected = np.array(theirs.inference(5)).reshape(PROBS.shape)
    q = crf_ext.dense_crf(IMAGE, PROBS, bi_w=4.0, pos_w=3.0, n_iter=5, **stds)
    np.testing.assert_allclose(q, expected, atol=1e-4)


STD_FIELDS = ["bi_xy_std", "bi_rgb_std", "pos_xy_std"]
CLEAR_ERROR = re.compile(r"must be finite with \|value\| <= 1e6|must be a finite number > 0")


def check_all_apis(stds, image, probs):
    """Each API either refuses `stds` with a clear ValueError or returns distributions; the
    functional ones agree with each other bit for bit."""
    outcomes = []
    try:
        q = crf_ext.dense_crf(image, probs, n_iter=2, **stds)
        assert np.isfinite(q).all() and np.allclose(q.sum(0), 1.0, atol=1e-5)
        assert np.array_equal(bits(crf_ext.dense_crf_batch([image], [probs], n_iter=2, **stds)[0]), bits(q))
        outcomes.append("ok")
    except ValueError as error:
        assert CLEAR_ERROR.search(str(error)), str(error)
        with pytest.raises(ValueError, match=CLEAR_ERROR):
            crf_ext.dense_crf_batch([image], [probs], n_iter=2, **stds)
        outcomes.append("error")
    try:
        crf = crf_ext.DenseCRF2D(image.shape[1], image.shape[0], probs.shape[0])
        crf.setUnaryEnergy(-np.log(np.clip(probs, 1e-5, 1)).reshape(probs.shape[0], -1))
        crf.addPairwiseGaussian(sxy=stds["pos_xy_std"], compat=3.0)
        crf.addPairwiseBilateral(sxy=stds["bi_xy_std"], srgb=stds["bi_rgb_std"], rgbim=image, compat=4.0)
        q2 = np.asarray(crf.inference(2))
        assert np.isfinite(q2).all() and np.allclose(q2.sum(0), 1.0, atol=1e-5)
        outcomes.append("ok")
    except ValueError as error:
        assert CLEAR_ERROR.search(str(error)), str(error)
        outcomes.append("error")
    # Both APIs bound the same features: they accept and refuse alike.
    assert outcomes[0] == outcomes[1], (stds, outcomes)


@pytest.mark.parametrize("value", [1e-45, 1e-38, 1e-10, 1e-7, 1e-4, 1e-3, 1e30, 3.4e38, 1e-50, 1e300])
@pytest.mark.parametrize("field", STD_FIELDS)
def test_extreme_standard_deviations_never_crash(field, value):
    stds = dict(bi_xy_std=55.0, bi_rgb_std=3.0, pos_xy_std=3.0)
    stds[field] = value
    check_all_apis(stds, IMAGE, PROBS.astype(np.float32))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exponents=st.tuples(*[st.floats(-46, 39) for _ in STD_FIELDS]), mantissa=st.floats(1, 9.99),
       height=st.integers(1, 9), width=st.integers(1, 9))
def test_any_standard_deviations_give_an_error_or_distributions(exponents, mantissa, height, width):
    stds = {field: mantissa * 10.0 ** e for field, e in zip(STD_FIELDS, exponents)}
    check_all_apis(stds, np.ascontiguousarray(IMAGE[:height, :width]),
                   np.ascontiguousarray(PROBS[:, :height, :width], np.float32))
