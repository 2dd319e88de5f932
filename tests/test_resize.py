"""Resize helpers against direct per-pixel formulas (and PyTorch when the torch extra is installed)."""

import numpy as np
import pytest

from bana_jax import resize


def bilinear_direct(x, out_h, out_w, align_corners):
    """One output pixel at a time, from the textbook formula."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c), np.float64)

    def src(dst, n_in, n_out):
        if align_corners:
            return dst * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return max((dst + 0.5) * n_in / n_out - 0.5, 0.0)

    for i in range(out_h):
        sy = src(i, h, out_h)
        y0 = min(int(np.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = src(j, w, out_w)
            x0 = min(int(np.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 13)), ((9, 8), (4, 3)), ((1, 3), (4, 1)),
                                                                                    ((41, 41), (321, 321))])
def test_bilinear_matches_direct_formula(align_corners, in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(resize.resize_bilinear(x, out_hw, align_corners=align_corners))
    want = bilinear_direct(x.astype(np.float64), *out_hw, align_corners)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_nearest_legacy_rule():
    # 321 -> 41: src = floor(dst * 321 / 41)
    rows = resize.nearest_indices(321, 41)
    assert rows[:4].tolist() == [0, 7, 15, 23]  # 7.83 -> 7, 15.66 -> 15, 23.49 -> 23
    x = np.arange(5 * 6).reshape(1, 5, 6)
    got = resize.resize_nearest(x, (3, 4))
    want = x[:, [0, 1, 3]][:, :, [0, 1, 3, 4]]  # floor(i*5/3), floor(j*6/4)
    np.testing.assert_array_equal(got, want)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(1).normal(size=(2, 3, 17, 10)).astype(np.float32)
    for size in [(41, 23), (5, 4), (17, 10)]:
        for align in (True, False):
            want = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                                                      align_corners=align).numpy().transpose(0, 2, 3, 1)
            got = np.asarray(resize.resize_bilinear(x.transpose(0, 2, 3, 1), size, align_corners=align))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        want = F.interpolate(torch.from_numpy(x), size=size, mode="nearest").numpy()
        got = resize.resize_nearest(x.transpose(0, 2, 3, 1), size).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got, want)
