"""Fast fully connected CRF (permutohedral lattice, C++), a drop-in for pydensecrf.

    import crf_ext
    q = crf_ext.dense_crf(image, probs)             # BANA's call, (C, H, W) marginals

    import crf_ext as dcrf                          # instead of pydensecrf.densecrf
    d = dcrf.DenseCRF2D(w, h, n_labels)

The C++ core runs the highest instruction-set level the CPU has (`crf_ext.isa`); the environment
variable CRF_EXT_ISA forces a lower one (same results, bit for bit).
"""

from crf_ext._isa import core as _core
from crf_ext._isa import runnable_levels as isa_levels
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

isa: str = _core.isa  # the instruction-set level in use: "avx512", "avx2", "sse4.2", "native" or "generic"
openmp: bool = _core.openmp
cached_bytes = _core.cached_bytes
release_memory = _core.release_memory

__all__ = [
    "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION", "NORMALIZE_AFTER", "NORMALIZE_BEFORE",
    "NORMALIZE_SYMMETRIC", "DenseCRF", "DenseCRF2D", "KernelType", "NormalizationType", "dense_crf",
    "cached_bytes", "dense_crf_batch", "isa", "isa_levels", "openmp", "release_memory",
]
