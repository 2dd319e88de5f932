"""Stage 1 with a frozen backbone (`model.freeze_backbone = True`): thousands of steps in minutes.

With the backbone fixed, most of stage 1 needs doing only once per training image:

1. Views. Each training image is resized so that its long side is `S` for every `S` in
   `data.view_sizes`, padded to `S x S` like the official training crops (mean pixel; background
   mask 0 in the padding), and mirrored when `data.flip`. A view is the whole padded image: no
   random crop, the backbone sees the whole image as stage 2 does.
2. Features. The frozen part of the backbone (eval mode: BatchNorm statistics stay) runs once per
   view; its output is cached in `WORKDIR/feature_cache` (`bana_jax.feature_cache`), reused by a
   later run of the same backbone on the same pixels and recomputed when either changes.
3. Training, by `train_loop` on batches of views (`data.batch_size`, drawn uniformly or
   class-balanced, `data.class_balanced`):
   - `model.trainable_blocks = 0`: the whole backbone is frozen, so the BAP vectors of a view
     (`bap.bap_vectors`: one foreground vector per box and ROI window, one background vector per
     grid cell) are fixed too. They are pooled once per view and the classifier alone trains on
     them with `bap.vector_loss`: the stage-1 loss without recomputing backbone and pooling.
   - `model.trainable_blocks = n > 0` (EfficientNet-Lite0): the cache holds the input of the
     last n blocks; those blocks (BatchNorm statistics frozen) and the classifier train with the
     stage-1 loss (`stage1.make_loss_fn`) on it. All views of a step have the same size.

The trained labeler (the backbone with its trained blocks, and the classifier) is exported like
any stage-1 labeler, so stage 2 does not know the difference. Every process computes every view
(the cache may be shared); batches are split over processes like the data loader's.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from bana_jax import bap, builders, evaluate_cams
from bana_jax.data import sampling, transforms
from bana_jax.data.batching import pad_boxes
from bana_jax.data.common import bg_mask_from_boxes
from bana_jax.feature_cache import FeatureCache, backbone_fingerprint, image_fingerprint

log = logging.getLogger(__name__)

CACHE_DIR = "feature_cache"
MIN_BOXES = 4  # boxes per view are pooled in power-of-two buckets of at least this many
ROI_STEP = 16  # ROI grids are multiples of this many feature pixels


def network_views(sample: dict, view_sizes, flip: bool) -> list[tuple[str, dict]]:
    """`[(name, network sample)]`: the sample resized to each long side, padded, and mirrored.

    A network sample has `image` `(S, S, 3)` Caffe-normalised, `bg_mask` `(S, S)` float,
    `boxes` `(K', 4)` normalised and `box_labels` `(K',)` (boxes that vanish at a small size are
    dropped, as in the training transform).
    """
    height, width = sample["image"].shape[:2]
    base = dict(image=sample["image"], boxes=np.asarray(sample["boxes"], np.float32).reshape(-1, 4),
                box_labels=np.asarray(sample["box_labels"], np.int32).reshape(-1))
    base["bg_mask"] = bg_mask_from_boxes(base["boxes"], height, width)
    views = []
    for size in view_sizes:
        padded = transforms.pad_to(transforms.rescale(base, size / max(height, width)), size)
        for mirrored in ((False, True) if flip else (False,)):
            view = transforms.hflip(padded) if mirrored else padded
            views.append((f"{size}{'_flip' if mirrored else ''}", transforms.to_network(view)))
    return views


@functools.partial(jax.jit, static_argnames=("options",))
def _view_vectors(features, bg_mask, boxes, box_valid, options):
    return bap.bap_vectors(features[None], bg_mask[None], boxes[None], box_valid[None], **dict(options))


def pooled_view(features: np.ndarray, view: dict, max_boxes: int, options: dict) -> dict:
    """BAP vectors of one view, boxes padded to `max_boxes` (extra boxes: the largest kept).

    Returns float32 `fg_vectors` `(K, R, D)`, `bg_vectors` `(M, D)`, bool `cell_valid` `(M,)`,
    `use_bap` `()`, int32 `box_labels` `(K,)`, bool `box_valid` `(K,)`, K = `max_boxes`.
    """
    boxes = pad_boxes(view, max_boxes)
    count = int(boxes["box_valid"].sum())
    bucket = min(max_boxes, max(MIN_BOXES, 1 << max(count - 1, 0).bit_length()))
    # The ROI grid only as large as the largest box's ROI (rounded up to limit compilations):
    # the same vectors as on the whole feature grid, at a fraction of the cost for small boxes.
    feature_hw = features.shape[:2]
    roi_h, roi_w = (np.asarray(n)[:count] for n in bap.roi_sizes(jnp.asarray(boxes["boxes"]), feature_hw))
    roi_grid = tuple(min(size, -(-int(n.max(initial=1)) // ROI_STEP) * ROI_STEP)
                     for size, n in zip(feature_hw, (roi_h, roi_w)))
    vectors = _view_vectors(jnp.asarray(features, jnp.float32), jnp.asarray(view["bg_mask"]),
                            jnp.asarray(boxes["boxes"][:bucket]), jnp.asarray(boxes["box_valid"][:bucket]),
                            tuple(sorted(options.items())) + (("max_roi_hw", roi_grid),))
    fg = np.zeros((max_boxes,) + vectors["fg_vectors"].shape[2:], np.float32)
    fg[:bucket] = np.asarray(vectors["fg_vectors"][0])
    return dict(fg_vectors=fg, bg_vectors=np.asarray(vectors["bg_vectors"][0]),
                cell_valid=np.asarray(vectors["cell_valid"][0]), use_bap=np.asarray(vectors["use_bap"][0]),
                box_labels=boxes["box_labels"], box_valid=boxes["box_valid"])


def tail_input(features: np.ndarray, view: dict, max_boxes: int) -> dict:
    """One view for training the trainable blocks: the cached input `image` `(h, w, C)` (float16)
    with `bg_mask` `(S, S)` and the boxes padded to `max_boxes` (the stage-1 batch layout)."""
    boxes = pad_boxes(view, max_boxes)
    return dict(image=features, bg_mask=view["bg_mask"].astype(np.float32), boxes=boxes["boxes"],
                box_labels=boxes["box_labels"], box_valid=boxes["box_valid"])


def frozen_blocks(config, backbone) -> int | None:
    """How many backbone blocks stay frozen (`model.trainable_blocks` from the end), None when the
    whole backbone is frozen."""
    trainable = int(config.model.trainable_blocks)
    if trainable == 0:
        return None
    if not hasattr(backbone, "tail"):
        raise ValueError(f"model.trainable_blocks={trainable} needs a backbone made of blocks "
                         f"(efficientnet_lite0_labeler), not {config.model.name!r}")
    if trainable > backbone.num_blocks:
        raise ValueError(f"model.trainable_blocks={trainable}: the backbone has {backbone.num_blocks} blocks")
    return backbone.num_blocks - trainable


def cached_views(config, labeler, source, workdir: str | Path, options: dict, *,
                 progress: bool = False) -> list[list[dict]]:
    """Every view of every image of `source`, `[image][view] -> dict`, from the cached output of
    the backbone's frozen part: `pooled_view`s when the whole backbone is frozen, else
    `tail_input`s. `options`: `bap_vectors` keywords (`stage1.loss_options`).

    The frozen part runs in eval mode where `WORKDIR/feature_cache` has no entry (then cached).
    """
    backbone = labeler.backbone
    backbone.eval()
    stop_block = frozen_blocks(config, backbone)
    # What the cached tensor depends on besides the weights; the head's fields (classes, dropout)
    # leave it valid.
    description = f"{config.model.name} {config.model.dtype} stop_block={stop_block}"
    cache = FeatureCache(Path(workdir) / CACHE_DIR, backbone_fingerprint(backbone, description))
    graphdef, state = nnx.split(backbone)
    extra = {} if stop_block is None else {"stop_block": stop_block}
    forward = jax.jit(lambda state, image: nnx.merge(graphdef, state)(image[None], **extra)[0])
    max_boxes = int(config.data.max_boxes)
    views = []
    bar = _progress(len(source), progress)
    for index in range(len(source)):
        sample = source[index]
        image_id, image_hash = str(sample["id"]), image_fingerprint(sample["image"])
        per_image = []
        for name, view in network_views(sample, config.data.view_sizes, config.data.flip):
            features = cache.get(name, image_id, image_hash)
            if features is None:
                features = cache.put(name, image_id, image_hash, forward(state, jnp.asarray(view["image"])))
            per_image.append(pooled_view(features, view, max_boxes, options) if stop_block is None
                             else tail_input(features, view, max_boxes))
        views.append(per_image)
        bar.update(1)
    bar.close()
    log.info("frozen backbone%s: %d images x %d views (cache %s: %d reused, %d computed)",
             "" if stop_block is None else f" up to block {stop_block}", len(views),
             len(views[0]) if views else 0, cache.directory, cache.hits, cache.misses)
    return views


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="img", desc="features", disable=not enabled, dynamic_ncols=True)


class ViewBatches:
    """This process's training batches of views, resumable (`get_state` / `set_state`).

    All views of a step have the same array shapes: step t draws one shape group from `seed` and
    t, and record i of the stream an image, by `sampler` (or uniformly when None), and one of its
    views in that group, from `seed` and i. Process p of n takes the p-th block of
    batch_size / n records of each global batch.
    """

    def __init__(self, views: list[list[dict]], batch_size: int, seed: int, sampler=None,
                 process_index: int | None = None, process_count: int | None = None):
        self.views, self.seed, self.sampler = views, int(seed), sampler
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size % self.process_count:
            raise ValueError(f"data.batch_size={batch_size} must divide over {self.process_count} processes")
        self.batch_size = batch_size
        self.step = 0
        shapes = [tuple((k, np.shape(v)) for k, v in sorted(view.items())) for view in views[0]]
        self.groups = [[j for j, s in enumerate(shapes) if s == shape] for shape in dict.fromkeys(shapes)]

    def _record(self, index: int, group: list[int]) -> dict:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, index]))
        image = (self.sampler[index].record_key if self.sampler is not None
                 else int(rng.integers(len(self.views))))
        return self.views[image][group[int(rng.integers(len(group)))]]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, (1 << 63) | self.step]))  # apart from records
        group = self.groups[int(rng.integers(len(self.groups)))]
        first = self.step * self.batch_size
        records = [self._record(first + i, group) for i in range(self.batch_size)]
        # Process p's rows are block p of the global batch (mesh.shard_batch stacks processes in
        # order), so the global batch is the same for any process count.
        local = self.batch_size // self.process_count
        self.step += 1
        batch = {key: np.stack([np.asarray(r[key], np.float32) if r[key].dtype == np.float16 else r[key]
                                for r in records[self.process_index * local:(self.process_index + 1) * local]])
                 for key in records[0]}
        if "image" in batch:
            # Boxes cut to the global batch's largest count (a power of two, valid boxes come
            # first): the pooling's cost grows with it; a few shapes, compiled once each.
            count = max(int(r["box_valid"].sum()) for r in records)
            boxes = min(batch["boxes"].shape[1], max(MIN_BOXES, 1 << max(count - 1, 0).bit_length()))
            for key in ("boxes", "box_labels", "box_valid"):
                batch[key] = batch[key][:, :boxes]
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def box_accuracy(classifier_weight, views: list[dict], num_classes: int) -> dict:
    """Ground-truth-box accuracy on pooled views (one per image), as
    `evaluate_cams.box_accuracy_on` reports it."""
    correct = np.zeros(num_classes, np.int64)
    total = np.zeros(num_classes, np.int64)
    weight = np.asarray(classifier_weight, np.float32)
    for view in views:
        valid = view["box_valid"]
        logits = np.einsum("krd,dc->krc", view["fg_vectors"][valid], weight)
        predicted = np.asarray(bap.box_predictions(logits[None]))[0]
        labels = view["box_labels"][valid]
        np.add.at(total, labels, 1)
        np.add.at(correct, labels, (predicted == labels).astype(np.int64))
    return evaluate_cams.accuracy_summary(correct, total)


def first_views_pooled(views: list[list[dict]], options: dict, tail=None) -> list[dict]:
    """Each image's first view (the first of `data.view_sizes`, not mirrored) as pooled vectors;
    `tail_input` views go through `tail` (the trained `TailLabeler`) first."""
    if tail is None:
        return [per_image[0] for per_image in views]
    tail.eval()
    graphdef, state = nnx.split(tail)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x[None])[0])
    pooled = []
    for per_image in views:
        view = per_image[0]
        features = forward(state, jnp.asarray(view["image"], jnp.float32))
        vectors = _view_vectors(features, jnp.asarray(view["bg_mask"]), jnp.asarray(view["boxes"]),
                                jnp.asarray(view["box_valid"]), tuple(sorted(options.items())))
        pooled.append(dict(fg_vectors=np.asarray(vectors["fg_vectors"][0]), box_labels=view["box_labels"],
                           box_valid=view["box_valid"]))
    return pooled


def training_views(config, labeler, workdir, options: dict, *, progress: bool = False):
    """The cached views of the training split and the sampler that draws them."""
    source = builders.data_source(config)
    views = cached_views(config, labeler, source, workdir, options, progress=progress)
    sampler = (sampling.ClassBalancedSampler(sampling.image_classes(source), int(config.train.seed))
               if config.data.class_balanced else None)
    return views, sampler


class TailLabeler(nnx.Module):
    """The trainable end of a frozen-backbone labeler (`model.trainable_blocks > 0`): cached inputs
    `(B, h, w, C)` -> features, and the classifier. It shares its layers with the labeler; the
    blocks sit under `backbone` so that the optimizer groups count them as pretrained."""

    def __init__(self, labeler, start_block: int):
        self.backbone = labeler.backbone.tail(start_block)
        self.classifier = labeler.classifier

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return self.backbone(inputs)
