"""Fast fully connected CRF (permutohedral lattice, C++), a drop-in for pydensecrf.

    import crf_ext
    q = crf_ext.dense_crf(image, probs)             # BANA's call, (C, H, W) marginals

    import crf_ext as dcrf                          # instead of pydensecrf.densecrf
    d = dcrf.DenseCRF2D(w, h, n_labels)
"""

from crf_ext._core import cached_bytes, openmp, release_memory
from crf_ext.api import dense_crf, dense_crf_batch
from crf_ext.densecrf import (
    CONST_KERNEL,
    DIAG_KERNEL,
    FULL_KERNEL,
    NO_NORMALIZATION,
    NORMALIZE_AFTER,
    NORMALIZE_BEFORE,
    NORMALIZE_SYMMETRIC,
    DenseCRF,
    DenseCRF2D,
    KernelType,
    NormalizationType,
)

__all__ = [
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_AFTER", "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC", "DenseCRF", "DenseCRF2D", "KernelType", "NormalizationType", "dense_crf",
    "cached_bytes", "dense_crf_batch", "openmp", "release_memory",
]
