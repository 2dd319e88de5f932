"""Stage 1 with a frozen backbone (`model.freeze_backbone = True`): thousands of steps in minutes.

With the backbone fixed, the BAP vectors of an image (`bana_jax.bap.bap_vectors`: one foreground
vector per box and ROI window, one background vector per grid cell) do not depend on anything that
trains, so stage 1 becomes:

1. Views. Each training image is resized so that its long side is `S` for every `S` in
   `data.view_sizes`, padded to `S x S` like the official training crops (mean pixel; background
   mask 0 in the padding), and mirrored when `data.flip`. A view is the whole padded image: no
   random crop, the backbone sees the whole image as stage 2 does.
2. Features. The backbone (eval mode) runs once per view; its features are cached in
   `WORKDIR/feature_cache` (`bana_jax.feature_cache`), reused by a later run of the same backbone
   on the same pixels and recomputed when either changes.
3. Vectors. `bap_vectors` of every view (pooling `loss.pooling`, grid `loss.grid_size`), kept in
   memory.
4. Training. `train_loop` trains the classifier alone on batches of views (`data.batch_size`
   views, drawn uniformly or class-balanced, `data.class_balanced`) with `bap.vector_loss`: the
   same loss as `bap_loss` on the same views, without recomputing the backbone and the pooling.

The trained labeler (the frozen backbone and the trained classifier) is exported like any stage-1
labeler, so stage 2 does not know the difference. Every process computes every view (the cache
may be shared); batches are split over processes like the data loader's.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bana_jax import bap, builders, evaluate_cams
from bana_jax.data import sampling, transforms
from bana_jax.data.common import bg_mask_from_boxes
from bana_jax.feature_cache import FeatureCache, backbone_fingerprint, image_fingerprint

log = logging.getLogger(__name__)

CACHE_DIR = "feature_cache"
MIN_BOXES = 4  # boxes per view are pooled in power-of-two buckets of at least this many
ROI_STEP = 16  # ROI grids are multiples of this many feature pixels
VECTOR_KEYS = ("fg_vectors", "bg_vectors", "cell_valid", "use_bap", "box_labels", "box_valid")


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
    from bana_jax.data.batching import pad_boxes

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


def pooled_views(config, labeler, source, workdir: str | Path, options: dict, *,
                 progress: bool = False) -> list[list[dict]]:
    """`pooled_view`s of every view of every image of `source`: `[image][view] -> dict`.

    Features come from `WORKDIR/feature_cache` where present, else from the labeler's backbone in
    eval mode (then cached). `options`: `bap_vectors` keywords (`stage1.loss_options`).
    """
    backbone = labeler.backbone
    backbone.eval()
    cache = FeatureCache(Path(workdir) / CACHE_DIR,
                         backbone_fingerprint(backbone, repr(config.model.to_dict())))
    graphdef, state = nnx.split(backbone)
    forward = jax.jit(lambda state, image: nnx.merge(graphdef, state)(image[None])[0])
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
            per_image.append(pooled_view(features, view, int(config.data.max_boxes), options))
        views.append(per_image)
        bar.update(1)
    bar.close()
    log.info("frozen backbone: %d images x %d views, features %s (cache %s: %d reused, %d computed)",
             len(views), len(views[0]) if views else 0, views[0][0]["fg_vectors"].shape[1:] if views else "-",
             cache.directory, cache.hits, cache.misses)
    return views


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="features", disable=not enabled, dynamic_ncols=True)


class ViewBatches:
    """This process's training batches of pooled views, resumable (`get_state` / `set_state`).

    Record i of the stream is an image drawn by `sampler` (or uniformly when None) and one of its
    views, both from `seed` and i; process p of n takes records p, p + n, ... of each global batch.
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

    def _record(self, index: int) -> dict:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, index]))
        image = (self.sampler[index].record_key if self.sampler is not None
                 else int(rng.integers(len(self.views))))
        return self.views[image][int(rng.integers(len(self.views[image])))]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.step * self.batch_size
        records = [self._record(first + i)
                   for i in range(self.process_index, self.batch_size, self.process_count)]
        self.step += 1
        return {key: np.stack([r[key] for r in records]) for key in VECTOR_KEYS}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def box_accuracy(classifier_weight, views: list[list[dict]], num_classes: int) -> dict:
    """Ground-truth-box accuracy on each image's first view (the first of `data.view_sizes`, not
    mirrored), as `evaluate_cams.box_accuracy_on` reports it."""
    correct = np.zeros(num_classes, np.int64)
    total = np.zeros(num_classes, np.int64)
    weight = np.asarray(classifier_weight, np.float32)
    for per_image in views:
        view = per_image[0]
        valid = view["box_valid"]
        logits = np.einsum("krd,dc->krc", view["fg_vectors"][valid], weight)
        predicted = np.asarray(bap.box_predictions(logits[None]))[0]
        labels = view["box_labels"][valid]
        np.add.at(total, labels, 1)
        np.add.at(correct, labels, (predicted == labels).astype(np.int64))
    return evaluate_cams.accuracy_summary(correct, total)


def training_views(config, labeler, workdir, options: dict, *, progress: bool = False):
    """The pooled views of the training split and the sampler that draws them."""
    source = builders.data_source(config)
    views = pooled_views(config, labeler, source, workdir, options, progress=progress)
    sampler = (sampling.ClassBalancedSampler(sampling.image_classes(source), int(config.train.seed))
               if config.data.class_balanced else None)
    return views, sampler
