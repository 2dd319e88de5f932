"""Loop-based NumPy transcription of stage 1 (supplement + official-code details).

Independent of bana_jax.bap: one image and one box at a time, each ROI at its own size, a
hand-written bilinear sampler following grid_sample's formula (align_corners=False, zeros padding),
explicit replicate padding and strided windows. float64 except where the official code's float32
arithmetic decides an integer (ROI sizes, nearest indices).
"""

from __future__ import annotations

import math

import numpy as np


def nearest_downsample(mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch legacy nearest: src = min(floor(dst * (in / out)), in - 1), float32 scale."""
    in_h, in_w = mask.shape
    out = np.zeros((out_h, out_w), np.float64)
    sh, sw = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    for i in range(out_h):
        si = min(int(math.floor(np.float32(i) * sh)), in_h - 1)
        for j in range(out_w):
            sj = min(int(math.floor(np.float32(j) * sw)), in_w - 1)
            out[i, j] = mask[si, sj]
    return out


def pad_amounts(size: int, n: int) -> tuple[int, int]:
    pad = n - size % n
    if pad == n:
        pad = 0
    if pad % 2 == 0:
        return pad // 2, pad // 2
    return 0, pad


def background_prototypes(feat: np.ndarray, mask: np.ndarray, n: int):
    """feat (h, w, D), mask (h, w) -> list of (prototype (D,), valid) over cells row-major."""
    h, w, d = feat.shape
    (pt, pb), (pl, pr) = pad_amounts(h, n), pad_amounts(w, n)
    feat_p = np.zeros((h + pt + pb, w + pl + pr, d))
    mask_p = np.zeros((h + pt + pb, w + pl + pr))
    feat_p[pt:pt + h, pl:pl + w] = feat
    mask_p[pt:pt + h, pl:pl + w] = mask
    ch, cw = feat_p.shape[0] // n, feat_p.shape[1] // n
    cells = []
    for gi in range(n):
        for gj in range(n):
            numer = np.zeros(d)
            denom = 0.0
            for y in range(gi * ch, (gi + 1) * ch):
                for x in range(gj * cw, (gj + 1) * cw):
                    numer += mask_p[y, x] * feat_p[y, x]
                    denom += mask_p[y, x]
            cells.append((numer / (denom + 1e-12), denom > 0))
    return cells


def normalize(v: np.ndarray) -> np.ndarray:
    return v / max(np.linalg.norm(v), 1e-12)


def grid_sample_point(feat: np.ndarray, gx: float, gy: float) -> np.ndarray:
    """grid_sample at one normalised point: align_corners=False, zero padding."""
    h, w, d = feat.shape
    ix = ((gx + 1) * w - 1) / 2
    iy = ((gy + 1) * h - 1) / 2
    x0, y0 = math.floor(ix), math.floor(iy)
    out = np.zeros(d)
    for yy, wy in ((y0, y0 + 1 - iy), (y0 + 1, iy - y0)):
        for xx, wx in ((x0, x0 + 1 - ix), (x0 + 1, ix - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * feat[yy, xx]
    return out


def roi_size(lo: float, hi: float, feat_size: int) -> int:
    """ceil(hi_f) - floor(lo_f) in float32 like the official code (at least 1)."""
    norm = np.float32((feat_size - 1) / 2)
    lo_f = np.float32(lo) * norm + norm
    hi_f = np.float32(hi) * norm + norm
    return max(int(math.ceil(hi_f)) - int(math.floor(lo_f)), 1)


def sample_roi(feat: np.ndarray, box) -> np.ndarray:
    """ROI (H_roi, W_roi, D) of a normalised box, at its own size."""
    h, w, _ = feat.shape
    x_min, y_min, x_max, y_max = [float(np.float32(v)) for v in box]
    roi_w, roi_h = roi_size(x_min, x_max, w), roi_size(y_min, y_max, h)
    xs = np.linspace(x_min, x_max, roi_w)
    ys = np.linspace(y_min, y_max, roi_h)
    return np.stack([np.stack([grid_sample_point(feat, gx, gy) for gx in xs]) for gy in ys])


def window_pool(roi: np.ndarray, weight: np.ndarray, out=(2, 2)) -> np.ndarray:
    """Official weighted 2x2 pooling: replicate pad small ROIs (rows bottom, cols left), then
    windows with stride n // O and kernel n - (O - 1) * stride. Returns (O_h * O_w, D)."""
    oh, ow = out
    n_h, n_w = weight.shape
    filt = roi * weight[..., None]
    stride_h, stride_w = n_h // oh, n_w // ow
    if stride_h == 0:
        stride_h = 1
        rows = list(range(n_h)) + [n_h - 1] * (oh - n_h)
        filt, weight = filt[rows], weight[rows]
    if stride_w == 0:
        stride_w = 1
        cols = [0] * (ow - n_w) + list(range(n_w))
        filt, weight = filt[:, cols], weight[:, cols]
    k_h = max(n_h - (oh - 1) * stride_h, 1)
    k_w = max(n_w - (ow - 1) * stride_w, 1)
    vectors = []
    for a in range(oh):
        for b in range(ow):
            ys = slice(a * stride_h, a * stride_h + k_h)
            xs = slice(b * stride_w, b * stride_w + k_w)
            numer = filt[ys, xs].sum(axis=(0, 1))
            denom = weight[ys, xs].sum() + 1e-12
            vectors.append(numer / denom)
    return np.stack(vectors)


def stage1_reference(features, bg_mask, boxes, box_labels, box_valid, classifier_weight, *,
                     grid_size=4,
                     pooling="bap", gap_fallback_bg_fraction=0.125, roi_output=(2, 2)):
    """The stage-1 loss, image by image and box by box.

    Returns dict: loss, fg_vectors {(b, k): (O_h * O_w, D)}, bg_vectors {(b, j): (D,)} (valid
    cells only), use_bap [B], roi_sizes {(b, k): (H_roi, W_roi)}, logits and targets lists.
    """
    features = np.asarray(features, np.float64)
    bsz, h, w, _ = features.shape
    fg_vectors, bg_vectors, use_bap, sizes = {}, {}, [], {}
    for b in range(bsz):
        mask = nearest_downsample(np.asarray(bg_mask[b], np.float64), h, w)
        cells = background_prototypes(features[b], mask, grid_size)
        valid_protos = [p for p, ok in cells if ok]
        for j, (p, ok) in enumerate(cells):
            if ok:
                bg_vectors[(b, j)] = p
        bg_fraction = float(np.mean(np.asarray(bg_mask[b], np.float64)))
        bap = pooling == "bap" and bg_fraction > gap_fallback_bg_fraction and len(valid_protos) > 0
        use_bap.append(bap)
        for k in range(boxes.shape[1]):
            if not box_valid[b, k]:
                continue
            roi = sample_roi(features[b], boxes[b, k])
            sizes[(b, k)] = roi.shape[:2]
            weight_map = np.ones(roi.shape[:2])
            if bap:
                for i in range(roi.shape[0]):
                    for j in range(roi.shape[1]):
                        f = normalize(roi[i, j])
                        attn = np.mean([max(f @ normalize(q), 0.0) for q in valid_protos])
                        weight_map[i, j] = 1.0 - attn
            fg_vectors[(b, k)] = window_pool(roi, weight_map, roi_output)

    weight = np.asarray(classifier_weight, np.float64)
    logits, targets = [], []
    for (b, k), vecs in fg_vectors.items():
        for v in vecs:
            logits.append(v @ weight)
            targets.append(int(box_labels[b, k]))
    for v in bg_vectors.values():
        logits.append(v @ weight)
        targets.append(0)
    losses = []
    for z, t in zip(logits, targets):
        z_max = z.max()
        losses.append(z_max + math.log(np.exp(z - z_max).sum()) - z[t])
    loss = float(np.mean(losses)) if losses else 0.0
    return {
        "loss": loss,
        "fg_vectors": fg_vectors,
        "bg_vectors": bg_vectors,
        "use_bap": use_bap,
        "roi_sizes": sizes,
        "logits": logits,
        "targets": targets,
    }
