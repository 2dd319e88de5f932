"""An independent NumPy transcription of pydensecrf's lattice construction (permutohedral.cpp,
SSE build), vectorised over points, for checking crf_ext's vertex set and count exactly."""

import numpy as np


def lattice_keys(features: np.ndarray) -> np.ndarray:
    """Sorted unique vertex keys (M, d) int64 of the lattice pydensecrf builds for `features` (N, d).

    Follows pydensecrf float32 step by step, including its padding of the point count to a multiple
    of 4 with zero feature vectors.
    """
    features = np.asarray(features, np.float32)
    n, d = features.shape
    d1 = d + 1
    padded = np.zeros(((n + 3) // 4 * 4, d), np.float32)
    padded[:n] = features
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * d1)
    scale = np.array([1.0 / np.sqrt((i + 2) * (i + 1)) * float(inv_std_dev) for i in range(d)]).astype(np.float32)

    elevated = np.zeros((len(padded), d1), np.float32)
    running = np.zeros(len(padded), np.float32)
    for j in range(d, 0, -1):
        cf = padded[:, j - 1] * scale[j - 1]
        elevated[:, j] = running - np.float32(j) * cf
        running = running + cf
    elevated[:, 0] = running

    rounded = np.rint(np.float32(1.0 / d1) * elevated).astype(np.float32)  # ties to even, as cvtps2dq
    rem0 = rounded * np.float32(d1)
    total = np.zeros(len(padded), np.float32)
    for i in range(d1):
        total = total + rounded[:, i]

    rank = np.zeros((len(padded), d1), np.int64)
    residual = elevated - rem0
    for i in range(d):
        for j in range(i + 1, d1):
            less = residual[:, i] < residual[:, j]
            rank[:, i] += less
            rank[:, j] += ~less
    rank += total.astype(np.int64)[:, None]
    below, above = rank < 0, rank >= d1
    rank = np.where(below, rank + d1, np.where(above, rank - d1, rank))
    rem0 = np.where(below, rem0 + d1, np.where(above, rem0 - d1, rem0)).astype(np.int64)

    keys = []
    for r in range(d1):
        shift = np.where(rank[:, :d] <= d - r, r, r - d1)
        keys.append(rem0[:, :d] + shift)
    return np.unique(np.concatenate(keys), axis=0)
