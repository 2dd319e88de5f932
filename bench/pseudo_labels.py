"""Stage-2 feature work: direct (features upsampled to full resolution, like the official code) vs
the exact feature-resolution fast path, on the CPU.

    python bench/pseudo_labels.py [--reps 3] [--image 500x375] [--features 63x47] [--dims 1024]

Times the device part of one image (unaries + retrieval, jit-compiled, compile excluded and
reported apart), median of --reps runs each, alternating; prints the ratio of medians and how far
apart the two paths' outputs are. The CRF is not part of this (see bench/crf.py): an identity stands
in for it so that Y_ret sees the same Y_crf on both paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bana_jax import pseudo_labels as pl  # noqa: E402


def parse_wh(text):
    w, h = text.lower().split("x")
    return int(w), int(h)


def make_problem(image_wh, feature_wh, dims, seed=0):
    rng = np.random.default_rng(seed)
    (width, height), (fw, fh) = image_wh, feature_wh
    rel_boxes = np.array([[0.1, 0.2, 0.55, 0.95], [0.4, 0.1, 0.9, 0.7], [0.6, 0.5, 0.98, 0.99]])
    labels = np.array([15, 12, 15])
    # fc7-like: non-negative noise plus a class-specific pattern on an ellipse inside each box, so
    # that background and classes have distinct prototypes (with iid noise alone every prototype
    # is the same mean vector and Y_ret is decided by float rounding).
    patterns = {c: np.maximum(rng.normal(size=dims), 0) for c in (0, 12, 15)}
    feats = np.maximum(rng.normal(size=(fh, fw, dims)) - 0.5, 0) + patterns[0]
    yy, xx = np.mgrid[0:fh, 0:fw] / np.array([fh - 1, fw - 1])[:, None, None]
    for (x0, y0, x1, y1), c in zip(rel_boxes, labels):
        ellipse = (((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2
                   + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) < 0.7
        feats[ellipse] += 2 * patterns[c] - patterns[0]
    feats = np.maximum(feats, 0).astype(np.float32)
    weight = (rng.normal(size=(dims, 21)) * 0.01).astype(np.float32)
    for c in (0, 12, 15):
        weight[:, c] += 0.05 * (patterns[c] - patterns[0] / 2)
    boxes = (rel_boxes * [width, height, width, height]).astype(np.float32)
    return feats, weight, boxes, labels


def run_once(feats, geom, prepared, fast):
    start = time.perf_counter()
    unaries = pl.stage2_unaries(feats, geom, prepared, fast=fast)
    probs = np.asarray(unaries.probs)  # to the host, as the CRF needs it
    mid = time.perf_counter()
    crf_map = pl.crf_channels(probs, prepared.boxes_px, prepared.box_channel)
    ret = pl.retrieval(feats, geom, crf_map, prepared, fast=fast)
    channels = np.asarray(ret.channels)
    end = time.perf_counter()
    return dict(unaries=mid - start, retrieval=end - mid, total=end - start, probs=probs,
                attention=np.asarray(unaries.bg_attention), crf_map=crf_map, ret_map=channels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--image", default="500x375", help="W x H")
    parser.add_argument("--features", default="63x47", help="w x h")
    parser.add_argument("--dims", type=int, default=1024)
    args = parser.parse_args()
    image_wh, feature_wh = parse_wh(args.image), parse_wh(args.features)
    feats, weight, boxes, labels = make_problem(image_wh, feature_wh, args.dims)
    geom = pl.make_geometry(feature_wh[::-1], image_wh[::-1])
    prepared = pl.prepare_boxes(boxes, labels, image_wh[::-1], weight)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus; image "
          f"{image_wh[0]}x{image_wh[1]}, features {feature_wh[0]}x{feature_wh[1]}x{args.dims}, "
          f"{len(boxes)} boxes")

    results = {}
    for fast in (True, False):
        start = time.perf_counter()
        results[fast] = run_once(feats, geom, prepared, fast)  # compiles
        print(f"{'fast' if fast else 'direct'}: first call (compile + run) "
              f"{time.perf_counter() - start:.2f} s")
    times = {True: [], False: []}
    for _ in range(args.reps):
        for fast in (True, False):
            times[fast].append(run_once(feats, geom, prepared, fast))

    for part in ("unaries", "retrieval", "total"):
        fast_s = statistics.median(t[part] for t in times[True])
        direct_s = statistics.median(t[part] for t in times[False])
        print(f"{part:10s} direct {direct_s * 1e3:9.1f} ms   fast {fast_s * 1e3:8.1f} ms   "
              f"ratio {direct_s / fast_s:6.1f}x")

    fast, direct = results[True], results[False]
    # u_0 is discontinuous at the 0.99 * max threshold: pixels within float32 noise of it may flip
    # between the paths (the direct path's float32 sums over ~1e5 pixels are the noisier ones).
    attention = fast["attention"]
    near = np.abs(attention - 0.99 * attention.max()) < 1e-5
    diff = np.abs(fast["probs"] - direct["probs"]).max(0)
    scale = np.abs(direct["probs"]).max()
    print(f"agreement: max |probs_fast - probs_direct| / max|probs_direct| = {diff.max() / scale:.2e} "
          f"overall, {diff[~near].max() / scale:.2e} away from the u_0 threshold "
          f"({int(near.sum())} pixels within 1e-5 of it)")
    print(f"labels: Y_crf pixels differing {int((fast['crf_map'] != direct['crf_map']).sum())}, "
          f"Y_ret pixels differing {int((fast['ret_map'] != direct['ret_map']).sum())} "
          f"of {fast['crf_map'].size}; Y_crf channel sizes {np.bincount(fast['crf_map'].ravel()).tolist()}")

if __name__ == "__main__":
    main()
