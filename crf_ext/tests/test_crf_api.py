"""The pydensecrf-compatible API (`import crf_ext as dcrf`) against pydensecrf itself."""

import numpy as np
import pydensecrf.densecrf as pydcrf
import pydensecrf.utils as pyutils
import pytest
from photos import load_photo

import crf_ext
from crf_ext import utils

NORMALIZATIONS = ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC"]


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(load_photo("000000000009")[100:160, 200:280])  # 60 x 80


def random_unary(n_labels, n_points, seed):
    logits = np.random.default_rng(seed).normal(scale=2.0, size=(n_labels, n_points))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    return np.ascontiguousarray(pyutils.unary_from_softmax(probs.astype(np.float32)))


def compat_of(kind, n_labels, rng):
    if kind == "potts":
        return 3.0
    if kind == "diagonal":
        return rng.uniform(1, 5, n_labels).astype(np.float32)
    return rng.uniform(-2, 5, (n_labels, n_labels)).astype(np.float32)  # not symmetric on purpose


def build_2d(module, image, unary, compat, normalization, num_threads=None):
    height, width = image.shape[:2]
    crf = module.DenseCRF2D(width, height, unary.shape[0])
    if num_threads is not None:
        crf.num_threads = num_threads  # before the kernels: their norms are filtered when added
    crf.setUnaryEnergy(unary)
    norm = getattr(module, normalization)
    crf.addPairwiseGaussian(sxy=3, compat=compat, kernel=module.DIAG_KERNEL, normalization=norm)
    crf.addPairwiseBilateral(sxy=(20, 30), srgb=(13, 10, 7), rgbim=image, compat=compat,
                             kernel=module.DIAG_KERNEL, normalization=norm)
    return crf


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("compat_kind", ["potts", "diagonal", "matrix"])
def test_2d_inference_matches_pydensecrf(photo, compat_kind, normalization):
    n_labels = 4
    unary = random_unary(n_labels, photo.shape[0] * photo.shape[1], seed=0)
    compat = compat_of(compat_kind, n_labels, np.random.default_rng(1))
    want = np.array(build_2d(pydcrf, photo, unary, compat, normalization).inference(5))
    got = np.asarray(build_2d(crf_ext, photo, unary, compat, normalization).inference(5))
    assert got.shape == want.shape == (n_labels, photo.shape[0] * photo.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert (got.argmax(0) == want.argmax(0)).mean() >= 0.9999


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("n_labels", [2, 18])
def test_one_thread_gives_the_bits_of_two(photo, normalization, n_labels):
    """One thread splats by a scatter (the kernel norms too), two gather per vertex: the same bits
    for every normalisation (scales before and after the filter), 2 labels (pydensecrf's other
    slice), 18 (a stride with no code of its own) and a 3-D kernel (no unrolled dimension)."""
    height, width = photo.shape[:2]
    unary = random_unary(n_labels, height * width, seed=5)
    compat = compat_of("matrix", n_labels, np.random.default_rng(6))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    volume_features = np.stack([xs / 5, ys / 5, photo.mean(-1, dtype=np.float32) / 10]).reshape(3, -1)
    results = []
    for threads in (1, 2):
        crf = build_2d(crf_ext, photo, unary, compat, normalization, num_threads=threads)
        crf.addPairwiseEnergy(volume_features, compat=2.0, normalization=getattr(crf_ext, normalization))
        results.append(np.asarray(crf.inference(5)))
    assert np.array_equal(results[0], results[1])


def test_any_feature_dimension_volume(photo):
    """A 3-D volume with one intensity channel: features from the utils, 3 and 4 dimensions."""
    shape = (6, 9, 11)
    volume = np.random.default_rng(2).integers(0, 256, shape + (1,)).astype(np.uint8)
    unary = random_unary(3, int(np.prod(shape)), seed=3)
    results = []
    for module, helpers in ((pydcrf, pyutils), (crf_ext, utils)):
        crf = module.DenseCRF(int(np.prod(shape)), 3)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseEnergy(helpers.create_pairwise_gaussian(sdims=(1.0, 2.0, 2.0), shape=shape), compat=2.0)
        crf.addPairwiseEnergy(helpers.create_pairwise_bilateral(sdims=(3.0, 3.0, 3.0), schan=(20.0,),
                                                                img=volume, chdim=3), compat=3.0)
        results.append(np.array(crf.inference(5)))
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-4)


def test_step_inference_and_kl_divergence_match(photo):
    unary = random_unary(3, photo.shape[0] * photo.shape[1], seed=4)
    theirs = build_2d(pydcrf, photo, unary, 5.0, "NORMALIZE_SYMMETRIC")
    ours = build_2d(crf_ext, photo, unary, 5.0, "NORMALIZE_SYMMETRIC")
    q_ref, t1, t2 = theirs.startInference()
    q, s1, s2 = ours.startInference()
    np.testing.assert_allclose(np.asarray(q), np.array(q_ref), rtol=1e-5, atol=1e-6)
    for _ in range(3):
        theirs.stepInference(q_ref, t1, t2)
        ours.stepInference(q, s1, s2)
        np.testing.assert_allclose(np.asarray(q), np.array(q_ref), rtol=0, atol=1e-4)
        kl_ref, kl = theirs.klDivergence(q_ref), ours.klDivergence(q)
        assert kl == pytest.approx(kl_ref, rel=1e-4)
    # Inference is the same as stepping by hand.
    np.testing.assert_allclose(np.asarray(ours.inference(3)), np.asarray(q), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:divide by zero")  # clip=None on a zero: -log(0) = inf in both
def test_utils_equal_pydensecrf_utils():
    rng = np.random.default_rng(5)
    softmax = rng.random((4, 7, 9)).astype(np.float32)
    softmax[0, 0, 0] = 0.0
    for kwargs in (dict(), dict(scale=0.7), dict(clip=None), dict(scale=0.5, clip=1e-3)):
        np.testing.assert_allclose(utils.unary_from_softmax(softmax, **kwargs),
                                   pyutils.unary_from_softmax(softmax, **kwargs), rtol=1e-6)
    labels = rng.integers(0, 4, (7, 9))
    for zero_unsure, n_labels in ((True, 3), (False, 4)):  # label 0 means 'unsure' or is a class
        np.testing.assert_allclose(utils.unary_from_labels(labels, n_labels, 0.7, zero_unsure=zero_unsure),
                                   pyutils.unary_from_labels(labels, n_labels, 0.7, zero_unsure=zero_unsure),
                                   rtol=1e-6)
    np.testing.assert_array_equal(utils.create_pairwise_gaussian((2.0, 3.0), (7, 9)),
                                  pyutils.create_pairwise_gaussian((2.0, 3.0), (7, 9)))
    image = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    # chdim is where the channels are; -1 means a single-channel image without a channel axis.
    for img, schan, chdim in ((image, (5.0, 6.0, 7.0), 2), (np.ascontiguousarray(image.transpose(2, 0, 1)), 4.0, 0),
                              (image[..., 0], (5.0,), -1)):
        np.testing.assert_allclose(utils.create_pairwise_bilateral((2.0, 3.0), schan, img, chdim=chdim),
                                   pyutils.create_pairwise_bilateral((2.0, 3.0), schan, img, chdim=chdim), rtol=1e-6)

def test_api_errors():
    crf = crf_ext.DenseCRF2D(10, 8, 3)
    with pytest.raises(ValueError, match="no unary energy"):
        crf.inference(1)
    with pytest.raises(ValueError, match=r"unary.*\(3, 80\)"):
        crf.setUnaryEnergy(np.zeros((3, 79), np.float32))
    with pytest.raises(NotImplementedError):
        crf.setUnaryEnergy(np.zeros((3, 80), np.float32), np.zeros((2, 80), np.float32))
    with pytest.raises(ValueError, match=r"features must have shape \(n_features, 80\)"):
        crf.addPairwiseEnergy(np.zeros((2, 81), np.float32), compat=3)
    with pytest.raises(ValueError, match=r"compat.*\(3, 3\)"):
        crf.addPairwiseGaussian(sxy=3, compat=np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"compat.*\(3,\)"):
        crf.addPairwiseGaussian(sxy=3, compat=np.ones(4))
    with pytest.raises(ValueError, match="normalization"):
        crf.addPairwiseGaussian(sxy=3, compat=3, normalization=7)
    with pytest.raises(ValueError, match="sxy"):
        crf.addPairwiseGaussian(sxy=0, compat=3)
    with pytest.raises(ValueError, match=r"rgbim has shape .* expected \(8, 10, 3\)"):
        crf.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((10, 8, 3), np.uint8), compat=3)
    crf.setUnaryEnergy(np.zeros((3, 80), np.float32))
    q, tmp1, tmp2 = crf.startInference()
    with pytest.raises(TypeError, match="float32"):
        crf.stepInference(np.asarray(q, np.float64), tmp1, tmp2)
    with pytest.raises(ValueError, match="niter must be >= 0"):
        crf.inference(-1)
