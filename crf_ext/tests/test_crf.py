"""crf_ext.dense_crf against pydensecrf, a brute-force Gaussian filter, and its own invariants."""

import re

import numpy as np
import pydensecrf.densecrf as pydcrf
import pytest
from photos import load_photo
from lattice_reference import lattice_filter, lattice_keys
from pydensecrf.utils import unary_from_softmax

import crf_ext
from crf_ext import _core

BANA = dict(bi_w=4.0, bi_xy_std=55.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=3.0)
PHOTOS = ["000000000009", "000000000030"]


# (x0, y0, x1, y1) integer boxes of each photo's COCO objects (instances_train2017.json, rounded out).
BOXES = {
    "000000000009": [(1, 187, 613, 474), (311, 4, 632, 233), (249, 229, 566, 475), (0, 13, 435, 389),
                     (376, 40, 452, 87), (465, 38, 524, 86), (385, 73, 470, 145), (364, 2, 459, 74)],
    "000000000030": [(204, 31, 460, 356), (237, 155, 404, 352)],
}


def smooth_probs(n_labels, height, width, rng):
    coarse = rng.normal(scale=3.0, size=(n_labels, height // 32 + 2, width // 32 + 2))
    logits = np.kron(coarse, np.ones((32, 32)))[:, :height, :width]
    probs = np.exp(logits - logits.max(0))
    return (probs / probs.sum(0)).astype(np.float32)


def bana_like_probs(n_labels, height, width, boxes, rng):
    """As BANA's stage 2: exactly one-hot background outside the boxes, a softmax over background and
    the box's class inside each box (later boxes overwrite earlier ones)."""
    probs = np.zeros((n_labels, height, width), np.float32)
    probs[0] = 1.0
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        label = 1 + k % (n_labels - 1)
        inside = smooth_probs(2, y1 - y0, x1 - x0, rng)
        probs[:, y0:y1, x0:x1] = 0.0
        probs[0, y0:y1, x0:x1] = inside[0]
        probs[label, y0:y1, x0:x1] = inside[1]
    return probs


def pydensecrf_q(image, probs, n_iter=10):
    n_labels, height, width = probs.shape
    crf = pydcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=BANA["pos_xy_std"], compat=BANA["pos_w"])
    crf.addPairwiseBilateral(sxy=BANA["bi_xy_std"], srgb=BANA["bi_rgb_std"], rgbim=np.ascontiguousarray(image),
                             compat=BANA["bi_w"])
    return np.array(crf.inference(n_iter)).reshape(n_labels, height, width)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("n_labels", [3, 21])
@pytest.mark.parametrize("unary", ["smooth", "bana"])
def test_matches_pydensecrf_on_real_photos(name, n_labels, unary):
    image = load_photo(name)
    height, width = image.shape[:2]
    rng = np.random.default_rng(n_labels)
    if unary == "smooth":
        probs = smooth_probs(n_labels, height, width, rng)
    else:
        probs = bana_like_probs(n_labels, height, width, BOXES[name], rng)
        assert (probs == 0).any() and (probs == 1).any()
    expected = pydensecrf_q(image, probs)
    q = crf_ext.dense_crf(image, probs, **BANA)
    assert q.dtype == np.float32 and q.shape == probs.shape
    diff = np.abs(q - expected)
    # Float reordering alone moves Q by <= 2.6e-5 and never flips an argmax:
    # anything beyond these bounds is an algorithmic difference.
    assert diff.max() <= 1e-4, diff.max()
    assert diff.mean() <= 1e-6, diff.mean()
    agreement = (q.argmax(0) == expected.argmax(0)).mean()
    assert agreement >= 0.9999, agreement


# Each label count takes another code path for its rows: 1 and 2 labels pydensecrf's other
# slicing path, 5 one 8-lane vector per row, 10 three 4-lane vectors, 30 a stride known only at
# run time.
@pytest.mark.parametrize("n_labels", [1, 2, 5, 10, 30])
def test_matches_pydensecrf_for_every_value_layout(n_labels):
    image = np.ascontiguousarray(load_photo(PHOTOS[0])[:150, :200])
    probs = smooth_probs(n_labels, 150, 200, np.random.default_rng(n_labels))
    expected = pydensecrf_q(image, probs)
    q = crf_ext.dense_crf(image, probs, **BANA)
    assert np.abs(q - expected).max() <= 1e-4
    assert (q.argmax(0) == expected.argmax(0)).mean() >= 0.9999
    np.testing.assert_array_equal(q, crf_ext.dense_crf(image, probs, num_threads=2, **BANA))


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("crop", [None, (211, 333)])  # 333 * 211 points is not a multiple of 4
def test_lattice_vertices_match_pydensecrf(name, crop):
    """Same vertex set (and so count) as pydensecrf for both of BANA's kernels. The reference is a
    NumPy transcription of pydensecrf's construction; its counts were checked once against
    pydensecrf's own C++ (640x480: 39890 and 576579 vertices)."""
    image = load_photo(name)
    if crop:
        image = np.ascontiguousarray(image[:crop[0], :crop[1]])
    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    gaussian = np.stack([xs / np.float32(3), ys / np.float32(3)], -1).reshape(-1, 2)
    bilateral = np.concatenate([np.stack([xs / np.float32(55), ys / np.float32(55)], -1),
                                image.astype(np.float32) / np.float32(3)], -1).reshape(-1, 5)
    for features in (gaussian, bilateral):
        expected = lattice_keys(features)
        lattice = _core.Lattice(features)
        assert lattice.n_vertices == len(expected)
        np.testing.assert_array_equal(np.unique(lattice.keys().astype(np.int64), axis=0), expected)


@pytest.mark.parametrize("spread", [1.0, 3e4])
@pytest.mark.parametrize("dim", [2, 5, 9])
def test_lattice_filter_matches_a_dictionary_reference(dim, spread):
    """splat, blur along every axis (neighbours found by hashing) and slice against a float64
    reference built with Python dictionaries, for keys told apart by their codes alone and, with
    clusters spread far apart (a box of more than 2^64 keys for d >= 5), for keys compared
    coordinate by coordinate."""
    rng = np.random.default_rng(dim)
    centres = rng.normal(size=(4, dim)) * spread
    features = (centres[rng.integers(0, 4, 300)] + rng.normal(size=(300, dim)) * 0.5).astype(np.float32)
    values = rng.random((300, 3)).astype(np.float32)
    lattice = _core.Lattice(features)
    assert lattice.exact_codes == (spread == 1.0 or dim == 2)
    impulse = np.eye(300, 1, dtype=np.float32)
    assert (lattice.filter(impulse) > 0).sum() > 30  # the blur found neighbours
    filtered = lattice.filter(values, num_threads=2)  # a gather per vertex; one thread scatters
    assert np.array_equal(lattice.filter(values, num_threads=1), filtered)
    np.testing.assert_allclose(filtered, lattice_filter(features, values), rtol=2e-5, atol=1e-6)


def gaussian_message(features, values, variance):
    """Exact symmetric-normalised Gaussian filter D^-1/2 K D^-1/2 v, self-term included."""
    diff = features[:, None, :].astype(np.float64) - features[None, :, :]
    kernel = np.exp(-(diff ** 2).sum(-1) / (2 * variance))
    scale = 1 / np.sqrt(kernel.sum(1))
    return scale[:, None] * (kernel @ (values * scale[:, None]))


@pytest.mark.parametrize("dim", [2, 5])
def test_lattice_message_approximates_brute_force(dim):
    """The lattice approximates a unit-variance Gaussian in feature space (pydensecrf's scaling).

    Sparse impulses as values expose the kernel's shape. Band: splat and slice blur a little beyond
    the kernel and the (1/2, 1, 1/2) lattice blur is a coarse stand-in for a Gaussian, so a
    normalised message is only within a few percent of the exact one (measured: 4.6% for d=2, 4.7%
    for d=5); we allow 8% relative L2 error. Variances 0.5 and 2 fit clearly worse (>= 9.6%), so
    the test also pins the kernel width.
    """
    rng = np.random.default_rng(dim)
    height, width = 20, 24
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if dim == 2:
        features = np.stack([xs / np.float32(3), ys / np.float32(3)], -1).reshape(-1, 2)
    else:
        colours = np.kron(rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255, np.ones((4, 4, 1)))
        colours = colours[:height, :width].astype(np.uint8).astype(np.float32) / np.float32(20)
        features = np.concatenate([np.stack([xs / np.float32(3), ys / np.float32(3)], -1), colours],
                                  -1).reshape(-1, 5)
    lattice = _core.Lattice(features)
    values = (rng.random((height * width, 3)) < 0.05).astype(np.float32)
    scale = 1 / np.sqrt(lattice.filter(np.ones((height * width, 1), np.float32))[:, 0])
    ours = scale[:, None] * lattice.filter((values * scale[:, None]).astype(np.float32))

    def error(variance):
        exact = gaussian_message(features, values, variance)
        return np.linalg.norm(ours - exact) / np.linalg.norm(exact)

    assert error(1.0) <= 0.08
    assert error(1.0) < 0.6 * min(error(0.5), error(2.0))


def test_marginals_are_distributions_for_hard_probabilities():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (37, 51))
    probs = np.eye(4, dtype=np.float32)[labels].transpose(2, 0, 1)  # exactly 0 and 1
    q = crf_ext.dense_crf(image, probs)
    assert np.isfinite(q).all() and (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_zero_iterations_is_the_normalised_clipped_input():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probs = rng.random((5, 20, 30)).astype(np.float32)
    probs[0, :5] = 0.0
    clipped = np.clip(probs, 1e-5, 1.0)
    np.testing.assert_allclose(crf_ext.dense_crf(image, probs, n_iter=0), clipped / clipped.sum(0), rtol=1e-5)


def test_bitwise_identical_across_runs_threads_and_batch():
    image = load_photo(PHOTOS[0])[:200, :300]
    rng = np.random.default_rng(2)
    probs = smooth_probs(6, 200, 300, rng)
    one = crf_ext.dense_crf(image, probs, num_threads=1)
    assert np.array_equal(one, crf_ext.dense_crf(image, probs, num_threads=1))
    assert np.array_equal(one, crf_ext.dense_crf(image, probs, num_threads=2))
    small = np.ascontiguousarray(image[:50, :70])
    small_probs = smooth_probs(3, 50, 70, rng)
    batch = crf_ext.dense_crf_batch([image, small], [probs, small_probs], num_threads=2)
    assert np.array_equal(batch[0], one)
    assert np.array_equal(batch[1], crf_ext.dense_crf(small, small_probs))


def test_reused_buffers_give_the_same_bits():
    """Large buffers are kept between calls uninitialised: a call on reused (dirty) buffers must
    give what a call on fresh ones gives, and release_memory() must give them all back."""
    image = load_photo(PHOTOS[1])[:300, :400]
    rng = np.random.default_rng(4)
    probs = smooth_probs(21, 300, 400, rng)
    other = np.ascontiguousarray(load_photo(PHOTOS[0])[:300, :400])
    other_probs = smooth_probs(21, 300, 400, rng)
    crf_ext.release_memory()
    assert crf_ext.cached_bytes() == 0
    fresh = crf_ext.dense_crf(image, probs, num_threads=2)
    if _core.buffer_pool:  # off under AddressSanitizer
        assert crf_ext.cached_bytes() > 4 * 300 * 400 * 24  # at least one (N, 24) float buffer
    crf_ext.dense_crf(other, other_probs, num_threads=2)  # leaves other values in the buffers
    assert np.array_equal(crf_ext.dense_crf(image, probs, num_threads=1), fresh)
    cached = crf_ext.cached_bytes()
    assert crf_ext.release_memory() == cached
    assert crf_ext.cached_bytes() == 0


@pytest.mark.skipif(not _core.buffer_pool, reason="the pool is off under AddressSanitizer")
def test_repeated_calls_map_no_new_buffers():
    """After a few calls on two images the pool holds a block for every request of further calls
    on them: they page-fault nothing in afresh (the bound on what it keeps once forced ~50 MB of
    new mappings per call at 500x375)."""
    images = [np.ascontiguousarray(load_photo(name)[:300, :400]) for name in PHOTOS[:2]]
    rng = np.random.default_rng(5)
    probs = [smooth_probs(21, 300, 400, rng) for _ in images]
    crf_ext.release_memory()
    for image, p in zip(images * 3, probs * 3):
        crf_ext.dense_crf(image, p, num_threads=2)
    mapped = _core.mapped_bytes()
    for image, p in zip(images * 2, probs * 2):
        crf_ext.dense_crf(image, p, num_threads=2)
    assert _core.mapped_bytes() == mapped
    crf_ext.release_memory()


def test_accepts_other_dtypes_and_layouts():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    probs = rng.random((3, 16, 24))
    expected = crf_ext.dense_crf(image, probs.astype(np.float32))
    fortran = np.asfortranarray(image)
    assert np.array_equal(crf_ext.dense_crf(fortran, probs), expected)  # float64, non-contiguous image
    strided = np.zeros((3, 16, 48))
    strided[:, :, ::2] = probs
    assert np.array_equal(crf_ext.dense_crf(image, strided[:, :, ::2]), expected)


IMAGE = np.zeros((8, 10, 3), np.uint8)
PROBS = np.full((2, 8, 10), 0.5, np.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(image=IMAGE.astype(np.float32)), TypeError, "image must be an RGB array of uint8"),
    (dict(image=IMAGE.astype(np.int16) - 1), ValueError, r"image has values outside 0..255"),
    (dict(image=IMAGE[..., :2]), ValueError, r"image must have shape \(H, W, 3\)"),
    (dict(image=IMAGE[0]), ValueError, r"image must have shape \(H, W, 3\)"),
    (dict(image=IMAGE[:0], probs=PROBS[:, :0]), ValueError, "image is empty"),
    (dict(probs=PROBS[0]), ValueError, r"probs must have shape \(C, H, W\)"),
    (dict(probs=PROBS[:0]), ValueError, r"C >= 1"),
    (dict(probs=PROBS[:, :7]), ValueError, r"expected \(C, 8, 10\)"),
    (dict(probs=np.where(np.arange(10) == 3, np.nan, PROBS)), ValueError, r"probs\[0\] at pixel 3 is nan"),
    (dict(probs=np.where(np.arange(10) == 4, np.inf, PROBS)), ValueError, "finite"),
    (dict(probs=np.where(np.arange(10) == 5, -0.1, PROBS)), ValueError, ">= 0"),
    (dict(probs=PROBS.astype(np.complex64)), TypeError, "real-valued"),
    (dict(bi_xy_std=0.0), ValueError, "bi_xy_std must be a finite number > 0"),
    (dict(bi_rgb_std=-3.0), ValueError, "bi_rgb_std"),
    (dict(pos_xy_std=float("nan")), ValueError, "pos_xy_std"),
    (dict(bi_w=float("inf")), ValueError, "bi_w must be a finite number"),
    (dict(n_iter=-1), ValueError, "n_iter must be >= 0"),
    (dict(n_iter=2.5), TypeError, "n_iter must be an integer"),
    (dict(num_threads=0), ValueError, "num_threads must be >= 1"),
])
def test_bad_input_is_rejected(kwargs, error, match):
    args = dict(image=IMAGE, probs=PROBS)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        crf_ext.dense_crf(args.pop("image"), args.pop("probs"), **args)


@pytest.mark.parametrize("field, value, features", [
    ("bi_rgb_std", 1e-7, "colour / bi_rgb_std"), ("bi_rgb_std", 1e-45, "colour / bi_rgb_std"),
    ("bi_xy_std", 1e-6, "pixel index / bi_xy_std"), ("pos_xy_std", 5e-7, "pixel index / pos_xy_std")])
def test_tiny_standard_deviations_are_rejected_like_the_densecrf2d_api(field, value, features):
    """A deviation that pushes a feature past the lattice's bound used to crash (SIGSEGV/SIGBUS);
    both APIs now refuse the same features with the same bound."""
    image = np.full_like(IMAGE, 200)
    stds = dict(bi_xy_std=55.0, bi_rgb_std=3.0, pos_xy_std=3.0)
    stds[field] = value
    with pytest.raises(ValueError, match=re.escape(features) + r"\) must be finite with \|value\| <= 1e6"):
        crf_ext.dense_crf(image, PROBS, **stds)
    first_bad = 1 if field == "bi_rgb_std" else 0  # IMAGE is black: only its positions can overflow
    with pytest.raises(ValueError, match=rf"item {first_bad}: .*" + re.escape(features)):
        crf_ext.dense_crf_batch([IMAGE, image], [PROBS, PROBS], **stds)
    api = crf_ext.DenseCRF2D(IMAGE.shape[1], IMAGE.shape[0], PROBS.shape[0])
    with pytest.raises(ValueError, match=r"features must be finite with \|value\| <= 1e6"):
        if field == "pos_xy_std":
            api.addPairwiseGaussian(sxy=value, compat=3)
        else:
            sxy, srgb = (value, 3.0) if field == "bi_xy_std" else (55.0, value)
            api.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=image, compat=4)
    if field == "bi_rgb_std":  # a black image has colour features 0: both accept it
        np.testing.assert_allclose(crf_ext.dense_crf(IMAGE, PROBS, **stds).sum(0), 1.0, rtol=1e-5)
        api.addPairwiseBilateral(sxy=55.0, srgb=value, rgbim=IMAGE, compat=4)


def test_batch_errors_name_the_item():
    with pytest.raises(ValueError, match=r"probs_list\[1\] has shape"):
        crf_ext.dense_crf_batch([IMAGE, IMAGE], [PROBS, PROBS[:, :4]])
    with pytest.raises(ValueError, match=r"probs_list\[1\].*finite"):
        crf_ext.dense_crf_batch([IMAGE, IMAGE], [PROBS, PROBS * np.nan])
    with pytest.raises(ValueError, match="differ in length"):
        crf_ext.dense_crf_batch([IMAGE], [PROBS, PROBS])
