"""pydensecrf's `densecrf` module API on the crf_ext core: `import crf_ext as dcrf` replaces
`import pydensecrf.densecrf as dcrf`.

Differences: no learning (LogisticUnary, gradients); a missing unary is an error instead of a
silent zero; arrays of any dtype and layout are accepted (copied); `num_threads` (attribute,
default all cores) sets the threads of inference.
"""

from __future__ import annotations

import enum
import numbers

import numpy as np

from crf_ext import _checks
from crf_ext._isa import core as _core


class KernelType(enum.IntEnum):
    """pydensecrf's kernel types. They only matter for learning: inference is the same."""

    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL = KernelType
NO_NORMALIZATION, NORMALIZE_BEFORE, NORMALIZE_AFTER, NORMALIZE_SYMMETRIC = NormalizationType


def _compat(compat, n_labels: int) -> tuple[str, np.ndarray]:
    """pydensecrf's rule: a number is Potts, a vector is diagonal, a matrix is a full compatibility."""
    if isinstance(compat, numbers.Real) and not isinstance(compat, bool):
        return "potts", np.array([_checks.finite(compat, "compat")], np.float32)
    array = _checks.real_array(compat, "compat")
    if array.ndim == 1:
        return "diagonal", _checks.finite_array(array, (n_labels,), "compat (diagonal)")
    if array.ndim == 2:
        return "matrix", _checks.finite_array(array, (n_labels, n_labels), "compat (matrix)")
    raise ValueError(f"compat must be a number, a ({n_labels},) vector or a ({n_labels}, {n_labels}) matrix, "
                     f"got shape {array.shape}")


def _enum(value, enum_type, name: str):
    try:
        return enum_type(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.name for m in enum_type]}, got {value!r}") from None


def _pair(value, name: str, size: int) -> tuple[float, ...]:
    values = (value,) * size if isinstance(value, numbers.Real) else tuple(value)
    if len(values) != size:
        raise ValueError(f"{name} must be a number or {size} numbers, got {value!r}")
    return tuple(_checks.positive(v, name) for v in values)


class DenseCRF:
    """A fully connected CRF over `nvar` variables with `nlabels` labels."""

    def __init__(self, nvar: int, nlabels: int):
        self._nvar = _checks.count(nvar, "nvar", 1)
        self._nlabel = _checks.count(nlabels, "nlabels", 1)
        self._crf = _core.DenseCrf(self._nvar, self._nlabel)
        self.num_threads: int | None = None

    def _add_kernel(self, points_by_features: np.ndarray, compat, kernel, normalization) -> None:
        kind, weights = _compat(compat, self._nlabel)
        _enum(kernel, KernelType, "kernel")
        normalization = _enum(normalization, NormalizationType, "normalization")
        self._crf.add_pairwise(points_by_features, kind, weights, int(normalization), _checks.threads(self.num_threads))

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Gaussian kernel on arbitrary features, shape (n_features, nvar), any n_features >= 1."""
        array = _checks.real_array(features, "features")
        if array.ndim != 2 or array.shape[1] != self._nvar or array.shape[0] < 1:
            raise ValueError(f"features must have shape (n_features, {self._nvar}), got {array.shape}")
        points = _checks.finite_array(array.T, array.T.shape, "features")
        self._add_kernel(points, compat, kernel, normalization)

    def setUnaryEnergy(self, u, f=None) -> None:
        """Unary energies (negative log-probabilities), shape (nlabels, nvar)."""
        if f is not None:
            raise NotImplementedError("setUnaryEnergy(u, f) (a logistic unary for learning) is not supported")
        self._crf.set_unary(_checks.finite_array(u, (self._nlabel, self._nvar), "unary"))

    def _require_unary(self) -> None:
        if not self._crf.has_unary:
            raise ValueError("no unary energy: call setUnaryEnergy(u) with u of shape "
                             f"({self._nlabel}, {self._nvar}) before inference")

    def inference(self, niter: int) -> np.ndarray:
        """Marginals after `niter` mean-field iterations, float32 (nlabels, nvar)."""
        self._require_unary()
        niter = _checks.count(niter, "niter", 0)
        return self._crf.inference(niter, _checks.threads(self.num_threads)).T

    def startInference(self):
        """(Q, tmp1, tmp2) for stepInference: Q = softmax(-unary), shape (nlabels, nvar)."""
        return self.inference(0), np.empty(0, np.float32), np.empty(0, np.float32)

    def stepInference(self, Q, tmp1=None, tmp2=None) -> None:
        """One mean-field iteration on Q (nlabels, nvar) float32, in place. tmp1/tmp2 are unused."""
        self._require_unary()
        if not isinstance(Q, np.ndarray) or Q.dtype != np.float32 or not Q.flags.writeable:
            raise TypeError("Q must be a writable float32 numpy array (as returned by startInference)")
        if Q.shape != (self._nlabel, self._nvar):
            raise ValueError(f"Q has shape {Q.shape}, expected ({self._nlabel}, {self._nvar})")
        points = Q.T  # (nvar, nlabels): a view without copying for startInference's arrays
        if points.flags.c_contiguous:
            self._crf.step(points, _checks.threads(self.num_threads))
        else:
            work = np.ascontiguousarray(points)
            self._crf.step(work, _checks.threads(self.num_threads))
            Q[...] = work.T

    def klDivergence(self, Q) -> float:
        """pydensecrf's KL divergence of Q (nlabels, nvar) to the CRF distribution, up to a constant."""
        self._require_unary()
        array = _checks.finite_array(Q, (self._nlabel, self._nvar), "Q")
        return self._crf.kl_divergence(np.ascontiguousarray(array.T), _checks.threads(self.num_threads))


class DenseCRF2D(DenseCRF):
    """A DenseCRF over the pixels of a w x h image (pixel index y * w + x)."""

    def __init__(self, w: int, h: int, nlabels: int):
        self._w = _checks.count(w, "w", 1)
        self._h = _checks.count(h, "h", 1)
        super().__init__(self._w * self._h, nlabels)

    def _positions(self, sx: float, sy: float) -> list[np.ndarray]:
        # float32 index / float32 std, exactly as pydensecrf's C++ computes them. A tiny std makes
        # huge features: the lattice's bound refuses them (no overflow warning on the way).
        ys, xs = np.mgrid[0:self._h, 0:self._w].astype(np.float32)
        with np.errstate(over="ignore"):
            return [xs / np.float32(sx), ys / np.float32(sy)]

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC) -> None:
        """Position kernel with standard deviation sxy (a number or (sx, sy))."""
        sx, sy = _pair(sxy, "sxy", 2)
        points = np.stack(self._positions(sx, sy), axis=-1).reshape(-1, 2)
        self._add_kernel(points, compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,
                             normalization=NORMALIZE_SYMMETRIC) -> None:
        """Appearance kernel on (x, y, r, g, b); rgbim uint8 (h, w, 3)."""
        sx, sy = _pair(sxy, "sxy", 2)
        srgb = _pair(srgb, "srgb", 3)
        image = _checks.image_array(rgbim, "rgbim")
        if image.shape[:2] != (self._h, self._w):
            raise ValueError(f"rgbim has shape {image.shape}, expected ({self._h}, {self._w}, 3)")
        with np.errstate(over="ignore"):
            colours = [image[..., c].astype(np.float32) / np.float32(srgb[c]) for c in range(3)]
        points = np.stack(self._positions(sx, sy) + colours, axis=-1).reshape(-1, 5)
        self._add_kernel(points, compat, kernel, normalization)
