"""An independent NumPy transcription of pydensecrf's lattice construction (permutohedral.cpp,
SSE build), vectorised over points, for checking crf_ext's vertex set and count exactly."""

import numpy as np


def lattice_keys(features: np.ndarray) -> np.ndarray:
    """Sorted unique vertex keys (M, d) int64 of the lattice pydensecrf builds for `features` (N, d).

    Follows pydensecrf float32 step by step, including its padding of the point count to a multiple
    of 4 with zero feature vectors.
    """
    keys, _ = simplices(features)
    return np.unique(keys.reshape(-1, keys.shape[-1]), axis=0)


def simplices(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The simplex of each point: vertex keys (N', d + 1, d) int64 for the N' >= N padded points,
    and barycentric weights (N, d + 1) float64 (pydensecrf's formula, not its float32 rounding)."""
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

    offset = (elevated.astype(np.float64) - rem0) / d1
    barycentric = np.zeros((len(padded), d + 2))
    rows = np.arange(len(padded))
    for i in range(d1):
        np.add.at(barycentric, (rows, d - rank[:, i]), offset[:, i])
        np.add.at(barycentric, (rows, d + 1 - rank[:, i]), -offset[:, i])
    barycentric[:, 0] += 1 + barycentric[:, d + 1]
    return np.stack(keys, 1), barycentric[:n, :d1]


def lattice_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The lattice's filter of `values` (N, C), in float64 with dictionaries: splat with the
    barycentric weights, blur each axis j with (1/2, 1, 1/2) between key - 1 (+ d at j) and
    key + 1 (- d at j), slice, times 1 / (1 + 2^-d)."""
    keys, weights = simplices(features)
    n, d = features.shape
    ids = {}
    vertex = np.array([[ids.setdefault(tuple(key), len(ids)) for key in simplex] for simplex in keys[:n]])
    for simplex in keys[n:]:  # the padding points make vertices too, which receive nothing
        for key in simplex:
            ids.setdefault(tuple(key), len(ids))
    lattice = np.zeros((len(ids), values.shape[1]))
    np.add.at(lattice, vertex, weights[..., None] * values.astype(np.float64)[:, None, :])
    zero = np.zeros(values.shape[1])
    for axis in range(d + 1):
        step = -np.ones(d, np.int64)
        if axis < d:
            step[axis] = d
        blurred = lattice.copy()
        for key, v in ids.items():
            key = np.array(key)
            n1, n2 = ids.get(tuple(key + step)), ids.get(tuple(key - step))
            blurred[v] += 0.5 * ((lattice[n1] if n1 is not None else zero) + (lattice[n2] if n2 is not None else zero))
        lattice = blurred
    return (weights[..., None] * lattice[vertex]).sum(1) / (1 + 2.0 ** -d)
