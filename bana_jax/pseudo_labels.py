"""Stage 2 of BANA: pseudo labels `Y_crf` and `Y_ret` from a trained stage-1 labeler (main paper, stage 2).

The official code upsamples the 1024-channel features to image size (bilinear, align_corners=True)
and does every step there (~0.75 GB per VOC image). Everything stage 2 needs from the upsampled
features `F = R_y f R_x^T` is one of three things, and each is exact at feature resolution:

- dot products with a few vectors (CAMs, cosines with prototypes): linear, so
  `F(p) . v = upsample(f . v)(p)`;
- the norm of `F(p)`: `F(p)` mixes four grid neighbours, so `|F(p)|^2` is a quadratic form in the
  Gram matrix of those four features (five inner-product maps on the grid);
- the sum of `F` over a pixel mask `M`: `sum_p M(p) F(p) = sum_ij (R_y^T M R_x)_ij f_ij`.

`fast=True` uses these; `fast=False` materialises `F` like the official code and is the reference
they are tested against. The math after these primitives is shared.

Bucketing: the geometry (interpolation weights, valid extents) is passed as arrays, not shapes, so
an image and its feature map can be zero-padded to a bucket size `(Hb, Wb)` / `(hb, wb)` and one
compiled function serves every image of that bucket. Padding never changes the result in the valid
region: padded feature cells get zero interpolation weight and are zeroed, padded pixels are outside
every mask and excluded from the maximum of the background attention. (The backbone itself must see
the unpadded image for its features to match the official ones; that is the caller's business.)

Boxes are pixel coordinates `[x_min, y_min, x_max, y_max]`; box k covers rows
`floor(y_min) .. floor(y_max) - 1` and columns `floor(x_min) .. floor(x_max) - 1` (the official
`mask[hmin:hmax, wmin:wmax]` after `.long()`), clipped to the image. The background mask is the
complement of the union of these rectangles.

Channels: 0 = background, then one channel per class present in the image, ascending class id.
The classifier may be trained with BAP or GAP; stage 2 is the same math either way.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bana_jax.models.layers import l2_normalize
from bana_jax.resize import interp_matrix

EPS_NORM = 1e-12  # F.normalize
EPS_DENOM = 1e-12  # prototype and CAM-maximum denominators in the official code
BG_THRESHOLD = 0.99
_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Host-side preparation (NumPy)
# ------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    """Bilinear (align_corners=True) map from a feature grid to the image, possibly padded.

    rows `(Hb, hb)`, cols `(Wb, wb)`: interpolation matrices, zero in padding.
    row_index `(Hb,)` int32, row_weights `(Hb, 2)`: the two neighbours `i, i + 1` of each image row
    and their weights (the same numbers as `rows`); likewise col_index `(Wb,)`, col_weights `(Wb, 2)`.
    pixel_rows `(Hb,)`, pixel_cols `(Wb,)`: bool, True inside the image `(H, W)`.
    feature_rows `(hb,)`, feature_cols `(wb,)`: bool, True inside the feature map `(h, w)`.
    """

    rows: np.ndarray
    cols: np.ndarray
    row_index: np.ndarray
    row_weights: np.ndarray
    col_index: np.ndarray
    col_weights: np.ndarray
    pixel_rows: np.ndarray
    pixel_cols: np.ndarray
    feature_rows: np.ndarray
    feature_cols: np.ndarray


def _check_hw(name, hw):
    if len(hw) != 2 or min(int(hw[0]), int(hw[1])) < 1:
        raise ValueError(f"{name} must be (height, width) >= 1, got {hw}")
    return int(hw[0]), int(hw[1])


def _axis_geometry(in_size, out_size, in_pad, out_pad):
    weights = interp_matrix(in_size, out_size, True)  # (out, in)
    matrix = np.zeros((out_pad, in_pad), np.float32)
    matrix[:out_size, :in_size] = weights
    index = np.zeros(out_pad, np.int32)
    pair = np.zeros((out_pad, 2), np.float32)
    for o in range(out_size):
        nonzero = np.flatnonzero(weights[o])
        i = int(nonzero[0])
        # Bilinear: at most two adjacent source cells per output.
        assert nonzero[-1] <= i + 1, (in_size, out_size, o, nonzero)
        index[o] = i
        pair[o, 0] = weights[o, i]
        pair[o, 1] = weights[o, i + 1] if i + 1 < in_size else 0.0
    valid_out = np.arange(out_pad) < out_size
    valid_in = np.arange(in_pad) < in_size
    return matrix, index, pair, valid_out, valid_in


def make_geometry(feature_hw, image_hw, *, padded_feature_hw=None, padded_image_hw=None) -> Geometry:
    """Geometry of upsampling a `feature_hw` grid to `image_hw`, padded to the given bucket sizes."""
    h, w = _check_hw("feature_hw", feature_hw)
    height, width = _check_hw("image_hw", image_hw)
    hb, wb = _check_hw("padded_feature_hw", padded_feature_hw or (h, w))
    hh, ww = _check_hw("padded_image_hw", padded_image_hw or (height, width))
    if hb < h or wb < w or hh < height or ww < width:
        raise ValueError(
            f"padded sizes must contain the real ones: feature {(h, w)} in {(hb, wb)}, "
            f"image {(height, width)} in {(hh, ww)}")
    rows, row_index, row_weights, pixel_rows, feature_rows = _axis_geometry(h, height, hb, hh)
    cols, col_index, col_weights, pixel_cols, feature_cols = _axis_geometry(w, width, wb, ww)
    return Geometry(rows, cols, row_index, row_weights, col_index, col_weights,
                    pixel_rows, pixel_cols, feature_rows, feature_cols)


def box_pixels(boxes, image_hw) -> np.ndarray:
    """Pixel boxes `(K, 4)` float `[x_min, y_min, x_max, y_max]` -> int32 `[x0, y0, x1, y1]`.

    The box covers `[y0, y1) x [x0, x1)` (floor of the coordinates, clipped to the image).
    """
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4) [x_min, y_min, x_max, y_max], got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes must be finite")
    height, width = _check_hw("image_hw", image_hw)
    px = np.floor(boxes).astype(np.int64)
    px[:, [0, 2]] = np.clip(px[:, [0, 2]], 0, width)
    px[:, [1, 3]] = np.clip(px[:, [1, 3]], 0, height)
    return px.astype(np.int32)


class PreparedBoxes(NamedTuple):
    """One image's boxes and classes in channel form, padded to fixed sizes for jit.

    boxes_px `(Kb, 4)` int32 `[x0, y0, x1, y1]`; box_channel `(Kb,)` int32, the box's channel
    1..P (0 for padding boxes); classes `(P,)` int, the class id of channels 1..P (host only);
    channel_weights `(D, 1 + Pb)` classifier weights per channel (zeros where a class has none);
    channel_has_weight `(1 + Pb,)` bool; channel_valid `(1 + Pb,)` bool (False for padding channels);
    region_px `(Kb, 4)` int32: the boxes whose union is the in-box region (background prototype,
    `u_0`, where the softmax applies, Y_ret's forced background); `boxes_px` unless given apart.
    """

    boxes_px: np.ndarray
    box_channel: np.ndarray
    classes: np.ndarray
    channel_weights: np.ndarray
    channel_has_weight: np.ndarray
    channel_valid: np.ndarray
    region_px: np.ndarray


def prepare_boxes(boxes, box_labels, image_hw, classifier_weight, *, unseen_classes: Sequence[int] = (),
                  max_boxes: int | None = None, max_classes: int | None = None,
                  region_boxes=None) -> PreparedBoxes:
    """Channels for the classes present (ascending id) and their classifier weights.

    region_boxes `(K, 4)`: other boxes (same convention, one per box) whose union is the in-box
    region, as the official code's `BgMaskfromBoxes` is not cut from the boxes it labels with
    (`baselines.official_half_open_boxes`); default `boxes`.

    classifier_weight `(D, C)`: column c scores class c (column 0 background). A class in
    `unseen_classes` (or with id >= C) has no weight: its unary is `1 - u_0` inside its boxes.
    max_boxes / max_classes pad K and P to bucket sizes (no effect on results).
    """
    weight = np.asarray(classifier_weight, np.float32)
    if weight.ndim != 2:
        raise ValueError(f"classifier_weight must be (D, C), got shape {weight.shape}")
    labels = np.asarray(box_labels)
    if labels.ndim != 1 or len(labels) != len(np.asarray(boxes)):
        raise ValueError(f"box_labels must be (K,) matching boxes, got shape {labels.shape} for "
                         f"{len(np.asarray(boxes))} boxes")
    if np.any(labels < 1):
        raise ValueError(f"box_labels must be class ids >= 1, got {labels.tolist()}")
    boxes_px = box_pixels(boxes, image_hw)
    classes = np.unique(labels).astype(np.int64)
    k, p = len(labels), len(classes)
    kb = k if max_boxes is None else int(max_boxes)
    pb = p if max_classes is None else int(max_classes)
    if kb < k or pb < p:
        raise ValueError(f"max_boxes={max_boxes}, max_classes={max_classes} smaller than the image's "
                         f"{k} boxes / {p} classes")
    unseen = {int(c) for c in unseen_classes}
    dims, num_weights = weight.shape
    channel_weights = np.zeros((dims, 1 + pb), np.float32)
    has_weight = np.zeros(1 + pb, bool)
    channel_weights[:, 0], has_weight[0] = weight[:, 0], True
    for ch, cls in enumerate(classes, 1):
        if cls < num_weights and cls not in unseen:
            channel_weights[:, ch], has_weight[ch] = weight[:, cls], True
    padded_boxes = np.zeros((kb, 4), np.int32)
    padded_boxes[:k] = boxes_px
    padded_region = padded_boxes.copy()
    if region_boxes is not None:
        if np.shape(region_boxes) != np.shape(boxes_px):
            raise ValueError(f"region_boxes must be (K, 4) like boxes, got shape {np.shape(region_boxes)}")
        padded_region[:k] = box_pixels(region_boxes, image_hw)
    box_channel = np.zeros(kb, np.int32)
    box_channel[:k] = np.searchsorted(classes, labels) + 1
    channel_valid = np.arange(1 + pb) <= p
    return PreparedBoxes(padded_boxes, box_channel, classes, channel_weights, has_weight, channel_valid,
                         padded_region)


def remap_classifier_weight(classifier_weight, columns) -> tuple[np.ndarray, tuple[int, ...]]:
    """A labeler's classifier weights re-indexed for another class list (e.g. VOC -> COCO).

    classifier_weight `(D, C_src)`; columns `(C,)` int: the column of `classifier_weight` that
    scores class c of the new list, or -1 where none does (an unseen class). Column 0
    (background) must exist. Returns the weights `(D, C)` (zero columns for unseen classes, which
    `prepare_boxes` never reads) and the unseen class ids, ascending: pass both to `prepare_boxes`.
    """
    weight = np.asarray(classifier_weight, np.float32)
    columns = np.asarray(columns, np.int64)
    if weight.ndim != 2 or columns.ndim != 1 or len(columns) < 1:
        raise ValueError(f"classifier_weight must be (D, C_src) and columns (C,), got shapes "
                         f"{weight.shape} and {columns.shape}")
    if columns[0] < 0 or np.any(columns >= weight.shape[1]) or np.any(columns < -1):
        raise ValueError(f"columns must be in [-1, {weight.shape[1]}) with a background column 0, "
                         f"got {columns.tolist()}")
    seen = columns >= 0
    remapped = np.zeros((weight.shape[0], len(columns)), np.float32)
    remapped[:, seen] = weight[:, columns[seen]]
    return remapped, tuple(int(c) for c in np.flatnonzero(~seen))


# ------------------------------------------------------------------------------------------------
# The three feature primitives: direct (full resolution) and fast (feature resolution)
# ------------------------------------------------------------------------------------------------


def _masked_features(features, geom):
    valid = geom.feature_rows[:, None, None] & geom.feature_cols[None, :, None]
    return jnp.where(valid, features, 0.0)


def _upsample_maps(maps, geom):
    """(K, hb, wb) -> (K, Hb, Wb), bilinear align_corners=True."""
    return jnp.einsum("yh,khw,xw->kyx", geom.rows, maps, geom.cols, precision=_HI)


class _DirectOps:
    """Materialises the upsampled features `(Hb, Wb, D)` (the official code's way)."""

    def __init__(self, features, geom):
        self.up = jnp.einsum("yh,hwd,xw->yxd", geom.rows, features, geom.cols, precision=_HI)

    def dots(self, vectors):  # (D, K) -> (K, Hb, Wb)
        return jnp.einsum("yxd,dk->kyx", self.up, vectors, precision=_HI)

    def norms(self):  # (Hb, Wb)
        return jnp.sqrt(jnp.sum(self.up * self.up, axis=-1))

    def masked_sums(self, masks):  # (K, Hb, Wb) -> (K, D)
        return jnp.einsum("kyx,yxd->kd", masks, self.up, precision=_HI)


class _FastOps:
    """The same three quantities computed on the feature grid."""

    def __init__(self, features, geom):
        self.features, self.geom = features, geom

    def dots(self, vectors):
        grid = jnp.einsum("hwd,dk->khw", self.features, vectors, precision=_HI)
        return _upsample_maps(grid, self.geom)

    def norms(self):
        g = self.geom
        hb, wb, dims = self.features.shape
        n = hb * wb
        # Flat layout: the neighbours of cell q = i * wb + j are q + 1, q + wb, q + wb + 1, so each
        # inner-product map is a product of two contiguous slices. A zero tail keeps every
        # neighbour in range; at the last row/column the neighbour's weight is 0 (and where it
        # wraps to the next row it is finite, so it contributes nothing).
        flat = jnp.pad(self.features.reshape(n, dims), ((0, wb + 2), (0, 0)))

        def inner(s, t):  # <f[q + s], f[q + t]> for all q, zero-padded to n + wb + 2
            return jnp.pad(jnp.sum(flat[s:s + n] * flat[t:t + n], -1), (0, wb + 2))

        sq, horiz, vert = inner(0, 0), inner(0, 1), inner(0, wb)
        main, anti = inner(0, wb + 1), inner(1, wb)  # <f_ij, f_i+1,j+1>, <f_i,j+1, f_i+1,j>
        base = g.row_index[:, None] * wb + g.col_index[None, :]  # (Hb, Wb)

        def at(m, di, dj):  # m at cell (i(y) + di, j(x) + dj)
            return m[base + di * wb + dj]

        a0, a1 = g.row_weights[:, 0, None], g.row_weights[:, 1, None]
        b0, b1 = g.col_weights[None, :, 0], g.col_weights[None, :, 1]
        c00, c01, c10, c11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
        norm_sq = (c00 * c00 * at(sq, 0, 0) + c01 * c01 * at(sq, 0, 1)
                   + c10 * c10 * at(sq, 1, 0) + c11 * c11 * at(sq, 1, 1)
                   + 2.0 * (c00 * c01 * at(horiz, 0, 0) + c10 * c11 * at(horiz, 1, 0)
                            + c00 * c10 * at(vert, 0, 0) + c01 * c11 * at(vert, 0, 1)
                            + c00 * c11 * at(main, 0, 0) + c01 * c10 * at(anti, 0, 0)))
        return jnp.sqrt(jnp.maximum(norm_sq, 0.0))

    def masked_sums(self, masks):
        grid_weights = jnp.einsum("yh,kyx,xw->khw", self.geom.rows, masks, self.geom.cols,
                                  precision=_HI)
        return jnp.einsum("khw,hwd->kd", grid_weights, self.features, precision=_HI)


def _ops(features, geom, fast):
    features = _masked_features(features, geom)
    return _FastOps(features, geom) if fast else _DirectOps(features, geom)


def _relu_cosines(ops, vectors):
    """ReLU(cos(F(p), v_k)) for vectors `(D, K)` -> `(K, Hb, Wb)` (F.normalize on both sides)."""
    dots = ops.dots(l2_normalize(vectors, axis=0, eps=EPS_NORM))
    return jax.nn.relu(dots / jnp.maximum(ops.norms(), EPS_NORM))


# ------------------------------------------------------------------------------------------------
# Box masks
# ------------------------------------------------------------------------------------------------


def _box_extents(boxes_px, box_channel, geom):
    """Per-box row `(K, Hb)` and column `(K, Wb)` indicators (padding boxes are empty)."""
    ys = jnp.arange(geom.rows.shape[0])
    xs = jnp.arange(geom.cols.shape[0])
    valid = (box_channel > 0)[:, None]
    in_rows = (ys[None] >= boxes_px[:, 1:2]) & (ys[None] < boxes_px[:, 3:4]) & valid
    in_cols = (xs[None] >= boxes_px[:, 0:1]) & (xs[None] < boxes_px[:, 2:3]) & valid
    return in_rows, in_cols


def _channel_box_masks(in_rows, in_cols, box_channel, num_channels):
    """`(1 + P, Hb, Wb)` bool: union of each class channel's boxes (channel 0: union of all)."""
    onehot = jax.nn.one_hot(box_channel, num_channels, dtype=jnp.float32)  # (K, 1 + P)
    onehot = onehot.at[:, 0].set((box_channel > 0).astype(jnp.float32))
    counts = jnp.einsum("kc,ky,kx->cyx", onehot, in_rows.astype(jnp.float32),
                        in_cols.astype(jnp.float32), precision=_HI)
    return counts > 0.5


# ------------------------------------------------------------------------------------------------
# Unaries (device)
# ------------------------------------------------------------------------------------------------


class Unaries(NamedTuple):
    """probs `(1 + Pb, Hb, Wb)` (the CRF input; padding channels 0); bg_unary `(Hb, Wb)` = u_0;
    class_unary `(Pb, Hb, Wb)` = u_c; bg_attention `(Hb, Wb)` = A before the 0.99 threshold."""

    probs: jax.Array
    bg_unary: jax.Array
    class_unary: jax.Array
    bg_attention: jax.Array


def _inside(region_px, box_channel, geom):
    """`(Hb, Wb)` bool: the union of the region boxes."""
    rows, cols = _box_extents(region_px, box_channel, geom)
    return _channel_box_masks(rows, cols, box_channel, 1)[0]


def _unaries(features, geom, boxes_px, box_channel, channel_weights, channel_has_weight,
             channel_valid, region_px, *, use_bg_unary, fast):
    num_channels = channel_weights.shape[1]
    ops = _ops(features, geom, fast)
    pixel_valid = geom.pixel_rows[:, None] & geom.pixel_cols[None, :]
    in_rows, in_cols = _box_extents(boxes_px, box_channel, geom)
    class_masks = _channel_box_masks(in_rows, in_cols, box_channel, num_channels)
    inside = _inside(region_px, box_channel, geom)
    background = pixel_valid & ~inside

    # Single background prototype: mean upsampled feature outside every box. With no background
    # pixel it is the zero vector, so A = 0 (the official code divides 0 by 0 here).
    bg_mask = background.astype(jnp.float32)
    bg_proto = ops.masked_sums(bg_mask[None])[0] / (jnp.sum(bg_mask) + EPS_DENOM)
    attention = _relu_cosines(ops, bg_proto[:, None])[0]
    attention = jnp.where(pixel_valid, attention, 0.0)
    kept = jnp.where(attention < BG_THRESHOLD * jnp.max(attention), 0.0, attention)
    inside_value = kept if use_bg_unary else jnp.zeros_like(kept)  # ablation: constant 0 logit
    bg_unary = jnp.where(inside, inside_value, 1.0)

    # CAMs normalised by their maximum within each box; later boxes overwrite earlier ones.
    cams = jax.nn.relu(ops.dots(channel_weights[:, 1:]))  # (Pb, Hb, Wb)

    def normalise_box(normed, box):
        rows, cols, channel = box
        mask = rows[:, None] & cols[None, :]
        index = jnp.maximum(channel - 1, 0)
        cam = cams[index]
        denom = jnp.max(jnp.where(mask, cam, 0.0)) + EPS_DENOM
        updated = jnp.where(mask, cam / denom, normed[index])
        return normed.at[index].set(updated), None

    class_unary, _ = jax.lax.scan(normalise_box, jnp.zeros_like(cams), (in_rows, in_cols, box_channel))
    # Classes without a classifier weight (unseen): 1 - u_0 inside their boxes.
    unseen_unary = jnp.where(class_masks[1:], 1.0 - bg_unary[None], 0.0)
    class_unary = jnp.where(channel_has_weight[1:, None, None], class_unary, unseen_unary)

    unaries = jnp.concatenate([bg_unary[None], class_unary], axis=0)
    softmax = jax.nn.softmax(jnp.where(channel_valid[:, None, None], unaries, -jnp.inf), axis=0)
    # Outside the region the unaries go to the CRF as they are, as in the official code: the one-hot
    # background, unless a class box reaches out of the region (region_px apart from boxes_px).
    probs = jnp.where(inside[None], softmax, jnp.where(channel_valid[:, None, None], unaries, 0.0))
    return Unaries(probs, bg_unary, class_unary, attention)


_unaries_jit = jax.jit(_unaries, static_argnames=("use_bg_unary", "fast"))


def _as_device_args(geom, prepared):
    return (Geometry(*map(jnp.asarray, geom)), jnp.asarray(prepared.boxes_px),
            jnp.asarray(prepared.box_channel), jnp.asarray(prepared.channel_weights),
            jnp.asarray(prepared.channel_has_weight), jnp.asarray(prepared.channel_valid),
            jnp.asarray(prepared.region_px))


def _check_features(features, geom):
    if features.ndim != 3 or features.shape[:2] != (geom.rows.shape[1], geom.cols.shape[1]):
        raise ValueError(f"features must be (hb, wb, D) = ({geom.rows.shape[1]}, {geom.cols.shape[1]}, D) "
                         f"for this geometry, got shape {features.shape}")


def stage2_unaries(features, geom: Geometry, prepared: PreparedBoxes, *, use_bg_unary: bool = True,
                   fast: bool = True) -> Unaries:
    """The CRF input of one image: `[u_0, u_c1, ...]` softmaxed inside boxes, one-hot outside.

    features `(hb, wb, D)` (eval mode, zero or anything finite in padding). use_bg_unary=False is the
    paper's "without u_0" ablation: inside boxes u_0 is replaced by the constant 0, so the background
    competes through the softmax with a fixed logit (outside boxes it stays 1).
    """
    _check_features(features, geom)
    return _unaries_jit(jnp.asarray(features, jnp.float32), *_as_device_args(geom, prepared),
                        use_bg_unary=use_bg_unary, fast=fast)


# ------------------------------------------------------------------------------------------------
# Y_crf (host) and Y_ret (device)
# ------------------------------------------------------------------------------------------------


def crf_channels(refined, boxes_px, box_channel) -> np.ndarray:
    """After the CRF: mask each class channel by its boxes, argmax -> channel map `(H, W)` int32.

    refined `(1 + P, H, W)`; boxes_px / box_channel as in PreparedBoxes (padding boxes ignored).
    Ties go to the lowest channel (background).
    """
    refined = np.asarray(refined)
    if refined.ndim != 3:
        raise ValueError(f"refined must be (1 + P, H, W), got shape {refined.shape}")
    masked = refined.copy()
    masks = np.zeros(refined.shape, bool)
    masks[0] = True
    for (x0, y0, x1, y1), ch in zip(np.asarray(boxes_px), np.asarray(box_channel)):
        if 0 < ch < refined.shape[0]:
            masks[ch, y0:y1, x0:x1] = True
    masked[~masks] = 0.0
    return masked.argmax(0).astype(np.int32)


def channels_to_classes(channel_map, classes) -> np.ndarray:
    """Channel map (0 = background, k = classes[k - 1]) -> uint8 class ids."""
    lookup = np.concatenate([[0], np.asarray(classes, np.int64)])
    channel_map = np.asarray(channel_map)
    return lookup[np.clip(channel_map, 0, len(lookup) - 1)].astype(np.uint8)


class Retrieval(NamedTuple):
    """channels `(Hb, Wb)` int32: argmax of the constrained ReLU-cosines `scores` `(1 + Pb, Hb, Wb)`."""

    channels: jax.Array
    scores: jax.Array


def _retrieval(features, geom, crf_map, boxes_px, box_channel, channel_weights, channel_has_weight,
               channel_valid, region_px, *, fast):
    num_channels = channel_weights.shape[1]
    ops = _ops(features, geom, fast)
    pixel_valid = geom.pixel_rows[:, None] & geom.pixel_cols[None, :]
    in_rows, in_cols = _box_extents(boxes_px, box_channel, geom)
    class_masks = _channel_box_masks(in_rows, in_cols, box_channel, num_channels)
    inside = _inside(region_px, box_channel, geom)

    # Prototype per channel: mean feature of its Y_crf pixels, else its classifier weight, else
    # (unseen class without pixels) zero, which scores 0 everywhere.
    members = (crf_map[None] == jnp.arange(num_channels)[:, None, None]) & pixel_valid[None]
    members = members.astype(jnp.float32)
    counts = jnp.sum(members, axis=(1, 2))
    means = ops.masked_sums(members) / jnp.maximum(counts, 1.0)[:, None]
    fallback = jnp.where(channel_has_weight[None], channel_weights, 0.0)
    protos = jnp.where((counts > 0)[None], means.T, fallback)  # (D, 1 + Pb)

    scores = _relu_cosines(ops, protos)
    scores = scores.at[0].set(jnp.where(inside, scores[0], 1.0))
    scores = scores.at[1:].multiply(class_masks[1:].astype(jnp.float32))
    scores = jnp.where(channel_valid[:, None, None], scores, -1.0)
    return Retrieval(jnp.argmax(scores, axis=0).astype(jnp.int32), scores)


_retrieval_jit = jax.jit(_retrieval, static_argnames=("fast",))


def retrieval(features, geom: Geometry, crf_map, prepared: PreparedBoxes, *, fast: bool = True) -> Retrieval:
    """Y_ret as a channel map: ReLU-cosine with per-channel prototypes from `crf_map` `(Hb, Wb)`
    (channel ids, anything in padding); background 1 outside boxes, classes 0 outside theirs."""
    _check_features(features, geom)
    crf_map = np.asarray(crf_map)
    if crf_map.shape != (geom.rows.shape[0], geom.cols.shape[0]):
        raise ValueError(f"crf_map must be (Hb, Wb) = {(geom.rows.shape[0], geom.cols.shape[0])}, "
                         f"got shape {crf_map.shape}")
    device_geom, *box_args = _as_device_args(geom, prepared)
    return _retrieval_jit(jnp.asarray(features, jnp.float32), device_geom, jnp.asarray(crf_map, jnp.int32),
                          *box_args, fast=fast)


# ------------------------------------------------------------------------------------------------
# One image, end to end
# ------------------------------------------------------------------------------------------------


def _pad_to(array, shape, value=0):
    pads = [(0, s - d) for d, s in zip(array.shape, shape)]
    return np.pad(array, pads + [(0, 0)] * (array.ndim - len(shape)), constant_values=value)


_cached_geometry = functools.lru_cache(maxsize=256)(make_geometry)  # the same few sizes, image after image


class ImageUnaries(NamedTuple):
    """One image's CRF input and what `labels_from_refined` needs after the CRF.

    features `(hb, wb, D)` float32 on the device (zero past the feature map); geom, prepared: the
    image's geometry and boxes; probs `(1 + P, H, W)` float32, the CRF input; bg_unary u_0 `(H, W)`
    and class_unary u_c `(P, H, W)`: float32, or None when not asked for (`image_unaries`).
    """

    features: jax.Array
    geom: Geometry
    prepared: PreparedBoxes
    probs: np.ndarray
    bg_unary: np.ndarray | None
    class_unary: np.ndarray | None


def image_unaries(features, image_hw, boxes, box_labels, classifier_weight, *, feature_hw=None,
                  use_bg_unary: bool = True, unseen_classes: Sequence[int] = (), fast: bool = True,
                  image_bucket=None, max_boxes: int | None = None, max_classes: int | None = None,
                  region_boxes=None, host_unaries: bool = True) -> ImageUnaries:
    """The first half of `pseudo_labels` (device): boxes -> unaries -> CRF input `probs`.

    features `(hb, wb, D)` (host or device): the labeler's `feature_hw` grid (default: all of it),
    zero-padded to a bucket size; image_hw `(H, W)`; host_unaries: also copy u_0 and u_c to the host;
    the rest as in `pseudo_labels`.
    """
    features = jnp.asarray(features, jnp.float32)
    feature_hw = features.shape[:2] if feature_hw is None else feature_hw
    geom = _cached_geometry(tuple(feature_hw), tuple(image_hw), padded_feature_hw=features.shape[:2],
                            padded_image_hw=None if image_bucket is None else tuple(image_bucket))
    prepared = prepare_boxes(boxes, box_labels, image_hw, classifier_weight, unseen_classes=unseen_classes,
                             max_boxes=max_boxes, max_classes=max_classes, region_boxes=region_boxes)
    unaries = stage2_unaries(features, geom, prepared, use_bg_unary=use_bg_unary, fast=fast)
    (height, width), num_present = image_hw, len(prepared.classes)
    probs = np.ascontiguousarray(np.asarray(unaries.probs)[:1 + num_present, :height, :width])
    if not host_unaries:
        return ImageUnaries(features, geom, prepared, probs, None, None)
    return ImageUnaries(features, geom, prepared, probs, np.asarray(unaries.bg_unary)[:height, :width],
                        np.asarray(unaries.class_unary)[:num_present, :height, :width])


def labels_from_refined(unaries: ImageUnaries, refined, *, fast: bool = True) -> tuple[np.ndarray, ...]:
    """The second half of `pseudo_labels`: the CRF output `(1 + P, H, W)` -> uint8 y_crf, y_ret `(H, W)`."""
    refined = np.asarray(refined, np.float32)
    if refined.shape != unaries.probs.shape:
        raise ValueError(f"crf returned shape {refined.shape}, expected {unaries.probs.shape}")
    geom, prepared = unaries.geom, unaries.prepared
    crf_map = crf_channels(refined, prepared.boxes_px, prepared.box_channel)
    padded_map = _pad_to(crf_map, (geom.rows.shape[0], geom.cols.shape[0]), value=-1)
    ret_map = np.asarray(retrieval(unaries.features, geom, padded_map, prepared, fast=fast).channels)
    return (channels_to_classes(crf_map, prepared.classes),
            channels_to_classes(ret_map[:crf_map.shape[0], :crf_map.shape[1]], prepared.classes))


def pseudo_labels(features, image, boxes, box_labels, classifier_weight, *,
                  crf: Callable[[np.ndarray, np.ndarray], np.ndarray], use_bg_unary: bool = True,
                  unseen_classes: Sequence[int] = (), fast: bool = True, feature_bucket=None,
                  image_bucket=None, max_boxes: int | None = None, max_classes: int | None = None,
                  region_boxes=None) -> dict:
    """Y_crf and Y_ret of one image (main paper, stage 2, as the official script computes it):
    `image_unaries`, the CRF, `labels_from_refined`.

    features `(h, w, D)` from the labeler in eval mode; image uint8 `(H, W, 3)` RGB; boxes `(K, 4)`
    pixel `[x_min, y_min, x_max, y_max]`; box_labels `(K,)` in 1..C-1; classifier_weight `(D, C)`.
    crf(image, probs `(1 + P, H, W)`) -> refined probs, e.g.
    `functools.partial(crf_ext.dense_crf, bi_w=4, bi_xy_std=55, bi_rgb_std=3, pos_w=3, pos_xy_std=3,
    n_iter=10)`. feature_bucket / image_bucket / max_boxes / max_classes pad to fixed shapes so one
    compilation serves many images; the result does not depend on them. region_boxes: see
    `prepare_boxes`.
    Returns uint8 `y_crf`, `y_ret` `(H, W)` and float32 `probs` `(1 + P, H, W)`, `bg_unary` `(H, W)`,
    `class_unary` `(P, H, W)`, plus `classes` `(P,)`.
    """
    features = np.asarray(features, np.float32)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    feature_hw = features.shape[:2]
    feature_bucket = feature_hw if feature_bucket is None else tuple(feature_bucket)
    if np.any(np.less(feature_bucket, feature_hw)):
        raise ValueError(f"padded sizes must contain the real ones: feature {feature_hw} in {feature_bucket}")
    unaries = image_unaries(_pad_to(features, feature_bucket), image.shape[:2], boxes, box_labels,
                            classifier_weight, feature_hw=feature_hw, use_bg_unary=use_bg_unary,
                            unseen_classes=unseen_classes, fast=fast, image_bucket=image_bucket,
                            max_boxes=max_boxes, max_classes=max_classes, region_boxes=region_boxes)
    y_crf, y_ret = labels_from_refined(unaries, crf(image, unaries.probs), fast=fast)
    return {"y_crf": y_crf, "y_ret": y_ret, "probs": unaries.probs, "bg_unary": unaries.bg_unary,
            "class_unary": unaries.class_unary, "classes": unaries.prepared.classes}
