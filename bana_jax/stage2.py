"""Stage 2 runner: pseudo labels `Y_crf`, `Y_ret` for a whole split, resumable, timed and scored.

    bana stage2 --config=configs/voc/stage2.py --workdir=DIR --config.pseudo.stage1_workdir=S1
    bana stage2 --config=configs/voc/stage2.py --workdir=DIR --config.pseudo.labeler=ClsNet.pth

writes `OUT/Y_crf/<id>.png`, `OUT/Y_ret/<id>.png` (uint8 palette PNGs, values = class ids) and
`OUT/summary.json`, OUT = `pseudo.output_dir` or `DIR/pseudo_labels`. The math is
`bana_jax.pseudo_labels.pseudo_labels`, in its two halves; this module schedules them:

- Device (main thread): backbone features, then `image_unaries` (`u_0`, `u_c`, in-box softmax) at a
  bucket size. Retrieval (`Y_ret`) is device work too, run from the CPU workers once the CRF is done.
- CPU (a thread pool): DenseCRF (`crf_ext`, GIL released, one image per thread), `labels_from_refined`
  (box masking, argmax, retrieval), the baselines (box-fill, GrabCut), the atomic PNG writes. Up to
  `2 * workers` images are in flight, so the device works on the next images meanwhile.
- Hosts: process i of n labels images i, i + n, ...; the confusion matrices are summed over hosts
  and process 0 writes the summary.
- Resume: an image is finished when both its PNGs exist (each written to a temporary name and
  renamed, Y_crf last), and a restarted run skips it (it is still scored, from the PNGs).

Classes: the labeler's classifier columns are the class ids, except for a VOC labeler on the 80
COCO classes (`data.classes = 'coco'`): the 20 VOC categories use their VOC columns, the other 60
are unseen classes (`1 - u_0` inside their boxes); see `voc_weights_for_coco`.

Boxes: the data sources give inclusive pixel boxes; `pseudo_labels` wants half-open ones
(`mask[y0:y1, x0:x1]`), so they are converted once here: `pseudo.box_convention = 'official'`
gives the official code's boxes (`baselines.official_half_open_boxes`: its reading of the VOC XML
values drops each box's first row and column), 'pixels' every pixel of the box
(`baselines.half_open_boxes`). The baselines take the inclusive boxes themselves.

Shapes and compilation: by default the backbone is compiled per exact image size, NOT for a
padded bucket. Zero-padding the normalised image changes the features inside the valid region (the
padded region's activations are not zero after the first conv + ReLU, and the receptive field of
fc7 spans most of the image), so padded features are not the official ones (checked on the tiny
and VGG16 labelers: differences of the order of the features themselves). Everything after the
backbone is bucketed: the features are zero-padded to multiples of `FEATURE_STEP`, the image
geometry to multiples of `image_step` pixels, boxes and classes to powers of two, which
`pseudo_labels` proves does not change the result. Datasets have few distinct sizes in practice
(COCO mostly 640 x 480 / 480 x 640), and a persistent compilation cache (`train.compilation_cache`)
keeps the per-size backbone compilations across runs.

`pseudo.image_bucket = B > 0` trades that exactness for compilations: each image is padded with the
mean pixel (0 after Caffe normalisation) at the bottom and right to multiples of B pixels, the
backbone runs on the padded image (one compilation per bucket) and its features are cut back to the
image's own feature grid. The labels then differ from the exact ones near the padded borders
(`bench/image_bucket.py` measures by how much); use it for datasets of many sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

import crf_ext
from bana_jax import artifacts
from bana_jax import baselines as baselines_lib
from bana_jax import builders, coco_export
from bana_jax import io as bio
from bana_jax import metrics
from bana_jax import pseudo_labels as pl
from bana_jax import visualize
from bana_jax.config import ConfigError
from bana_jax.constants import IGNORE_INDEX, VOC_CLASSES
from bana_jax.data.coco import COCO_TO_VOC
from bana_jax.data.transforms import caffe_normalize
from bana_jax.models.torch_import import official_labeler
from bana_jax.train.loop import configure_compilation_cache

log = logging.getLogger(__name__)

FEATURE_STEP = 16  # feature maps are padded to multiples of this (x8 pixels)
IMAGE_STEP = 128  # image geometry is padded to multiples of this
# Boxes and classes per image are padded to powers of two, at least these (VOC: 1-3 classes and
# 1-6 boxes in most images, so one or two compilations per image bucket).
MIN_BOXES, MIN_CLASSES = 8, 4
COCO_CLASSES = 81  # the 80 COCO categories + background (data.classes = 'coco')
BASELINES = ("box_fill", "grabcut")
METHODS = ("y_crf", "y_ret", "agreement") + BASELINES
_FOLDERS = {"y_crf": "Y_crf", "y_ret": "Y_ret", "grabcut": "baselines/grabcut"}  # labels by kind, under OUT


def _round_up(n: int, step: int) -> int:
    return -(-int(n) // step) * step


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(int(n) - 1, 0).bit_length())


def _labeler_features(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


@functools.partial(jax.jit, static_argnums=0)
def _backbone_features(graphdef, state, images):
    """`(1, H, W, 3)` -> float32 `(h, w, D)`; compiled once per input size."""
    return _labeler_features(graphdef, state, images)[0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _crop_to_bucket(features, valid_hw, bucket):
    """The first `valid_hw` rows and columns of `features`, zero-padded to `bucket`."""
    features = features[:valid_hw[0], :valid_hw[1]]
    return jnp.pad(features, ((0, bucket[0] - valid_hw[0]), (0, bucket[1] - valid_hw[1]), (0, 0)))


class FeatureExtractor:
    """Eval-mode labeler features of one image, compiled once per exact image size (or per image
    bucket, when `image_bucket` > 0: see the module docstring).

    `extractor(image uint8 (H, W, 3))` -> (float32 features `(hb, wb, D)` on the device, zero-padded
    to the feature bucket, the true feature size `(h, w)`). The labeler is put in eval mode.
    """

    def __init__(self, labeler, feature_step: int = FEATURE_STEP, image_bucket: int = 0):
        if image_bucket < 0:
            raise ValueError(f"pseudo.image_bucket must be >= 0 (0: exact sizes), got {image_bucket}")
        labeler.eval()
        self.classifier_weight = np.asarray(labeler.classifier.weight, np.float32)  # (D, C)
        self._graphdef, self._state = nnx.split(labeler)
        self.feature_step = feature_step
        self.image_bucket = image_bucket
        self._feature_sizes = {}
        self.image_sizes = set()  # distinct sizes seen
        self.backbone_sizes = set()  # distinct backbone input sizes (one compilation each)

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        if (height, width) not in self._feature_sizes:
            shape = jax.eval_shape(functools.partial(_labeler_features, self._graphdef), self._state,
                                   jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)).shape
            self._feature_sizes[height, width] = int(shape[1]), int(shape[2])
        return self._feature_sizes[height, width]

    def __call__(self, image: np.ndarray):
        height, width = image.shape[:2]
        h, w = self.feature_size(height, width)
        bucket = (_round_up(h, self.feature_step), _round_up(w, self.feature_step))
        self.image_sizes.add((height, width))
        normalised = caffe_normalize(image)
        if self.image_bucket:
            padded = (_round_up(height, self.image_bucket), _round_up(width, self.image_bucket))
            normalised = np.pad(normalised, ((0, padded[0] - height), (0, padded[1] - width), (0, 0)))
        self.backbone_sizes.add(normalised.shape[:2])
        features = _backbone_features(self._graphdef, self._state, jnp.asarray(normalised[None]))
        return _crop_to_bucket(features, (h, w), bucket), (h, w)


def _stale_temporaries(out_dir: Path) -> dict:
    """Temporary files a killed run left (`.NAME.png.XXXX.tmp`, see bana_jax.io), by image id.

    Listed once up front (not globbed per image, which would be quadratic in the split size)."""
    stale = collections.defaultdict(list)
    for folder in [out_dir / f for f in _FOLDERS.values()] + [out_dir / "visualisations"]:
        if folder.is_dir():
            for entry in os.scandir(folder):
                name = entry.name
                if name.startswith(".") and name.endswith(".tmp") and ".png." in name:
                    stale[name[1:name.rindex(".png.")]].append(Path(entry.path))
    return stale


@dataclasses.dataclass(frozen=True, slots=True)
class _Job:
    """One image between the device (main thread) and a CPU worker.

    image uint8 `(H, W, 3)`; boxes `(K, 4)` inclusive pixels; box_labels `(K,)`; label `(H, W)` or
    None (no ground truth); compute: False when both PNGs exist (then read back and scored); unaries:
    None without boxes (all background) or when not computed; device_seconds: backbone + unaries.
    """

    id: str
    image: np.ndarray
    boxes: np.ndarray
    box_labels: np.ndarray
    label: np.ndarray | None
    paths: dict
    compute: bool
    visualise: bool
    unaries: pl.ImageUnaries | None
    device_seconds: float


def _image_unaries(extractor, weight, image, boxes, box_labels, visualise: bool, *, pseudo, unseen_classes,
                   image_step) -> pl.ImageUnaries:
    """Backbone + unaries of one image (device), at the runner's bucket sizes; u_0 and u_c on the host
    only for a panel."""
    height, width = image.shape[:2]
    features, feature_hw = extractor(image)
    half_open, region = stage2_boxes(boxes, (height, width), pseudo.box_convention)
    return pl.image_unaries(features, (height, width), half_open, box_labels, weight, feature_hw=feature_hw,
                            use_bg_unary=bool(pseudo.use_u0), unseen_classes=unseen_classes,
                            image_bucket=(_round_up(height, image_step), _round_up(width, image_step)),
                            max_boxes=_pow2_at_least(len(boxes), MIN_BOXES),
                            max_classes=_pow2_at_least(len(np.unique(box_labels)), MIN_CLASSES),
                            region_boxes=region, host_unaries=visualise)


def _make_job(sample, out_dir: Path, unaries_of, visualise: bool) -> _Job:
    """One sample of the source, checked, as a job; its unaries are computed here (device) unless it
    was finished earlier."""
    image = np.asarray(sample["image"])
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"sample {sample.get('id')!r}: image must be uint8 (H, W, 3), got "
                         f"{image.dtype} {image.shape}")
    boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(sample["box_labels"], np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"sample {sample['id']!r}: {len(boxes)} boxes but {len(labels)} box_labels")
    label = sample.get("label")
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[:2]:
            raise ValueError(f"sample {sample['id']!r}: label shape {label.shape} differs from the "
                             f"image {image.shape[:2]}")
    image_id = str(sample["id"])
    paths = {kind: out_dir / folder / f"{image_id}.png" for kind, folder in _FOLDERS.items()}
    compute = not (paths["y_crf"].is_file() and paths["y_ret"].is_file())  # else finished earlier
    visualise = compute and visualise
    start = time.perf_counter()
    unaries = unaries_of(image, boxes, labels, visualise) if compute and len(boxes) else None
    return _Job(image_id, image, boxes, labels, label, paths, compute, visualise, unaries,
                time.perf_counter() - start)


def _label_image(job: _Job, crf_params: dict, vis_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """CPU side of one image (a worker thread): CRF, Y_crf, Y_ret, their PNGs and its panel, or its
    PNGs read back when it was finished earlier.

    Returns uint8 `y_crf`, `y_ret` `(H, W)` and the seconds of its "crf", "retrieval" and "features"
    (backbone, unaries and retrieval) work (none without boxes or when read back).
    """
    if not job.compute:
        return bio.read_label_png(job.paths["y_crf"]), bio.read_label_png(job.paths["y_ret"]), {}
    if job.unaries is None:  # no boxes: everything is background (and not timed)
        y_crf = y_ret = np.zeros(job.image.shape[:2], np.uint8)
        seconds = {}
    else:
        start = time.perf_counter()
        refined = crf_ext.dense_crf(job.image, job.unaries.probs, num_threads=1, **crf_params)
        crf_end = time.perf_counter()
        y_crf, y_ret = pl.labels_from_refined(job.unaries, refined)
        retrieval = time.perf_counter() - crf_end
        seconds = dict(crf=crf_end - start, retrieval=retrieval, features=job.device_seconds + retrieval)
    bio.write_label_png(job.paths["y_ret"], y_ret)
    bio.write_label_png(job.paths["y_crf"], y_crf)  # last: its presence marks "finished"
    if job.visualise:
        unaries = job.unaries
        tiles, titles = visualize.pseudo_label_panel(
            job.image, job.boxes, job.box_labels, y_crf, y_ret, label=job.label,
            bg_unary=np.ones(job.image.shape[:2], np.float32) if unaries is None else unaries.bg_unary,
            class_unary_max=None if unaries is None else unaries.class_unary.max(0))
        # The titles travel inside the panel: panels differ in columns (no u_c tile without boxes,
        # no ground truth without labels), and index.html also lists the panels of earlier runs.
        visualize.write_png(vis_dir / f"{job.id}.png", tiles, titles=titles)
    return y_crf, y_ret, seconds


class _Scorer:
    """Scores and timings of this host's images: per image in the workers (`score`), added up in the
    main thread (`add`); `_summary` sums them over hosts."""

    def __init__(self, num_classes: int, baselines: Sequence[str]):
        self.num_classes, self.baselines = num_classes, tuple(baselines)
        self.methods = [m for m in METHODS if m not in BASELINES or m in self.baselines]
        self.conf = {m: np.zeros((num_classes, num_classes), np.int64) for m in METHODS}
        self.images = collections.Counter()  # computed, skipped, scored
        self.seconds = collections.defaultdict(list)  # per computed image: features, crf, retrieval, baselines

    def score(self, job: _Job, y_crf: np.ndarray, y_ret: np.ndarray) -> dict:
        """Confusion matrices `(C, C)` of one image's labels and baselines against its ground truth."""
        start = time.perf_counter()
        preds = {"y_crf": y_crf, "y_ret": y_ret}
        if "box_fill" in self.baselines:
            preds["box_fill"] = baselines_lib.box_fill(job.boxes, job.box_labels, job.image.shape[:2])
        if "grabcut" in self.baselines:
            path = job.paths["grabcut"]
            if path.is_file():
                preds["grabcut"] = bio.read_label_png(path)
            else:
                preds["grabcut"] = baselines_lib.grabcut(job.image, job.boxes, job.box_labels)
                bio.write_label_png(path, preds["grabcut"])
        seconds = time.perf_counter() - start
        conf = {m: metrics.confusion_matrix(p, job.label, self.num_classes) for m, p in preds.items()}
        reliable_label = np.where(y_crf == y_ret, job.label, IGNORE_INDEX)
        conf["agreement"] = metrics.confusion_matrix(y_crf, reliable_label, self.num_classes)
        return {"conf": conf, "baselines": seconds}

    def add(self, result: dict) -> None:
        for m, c in result.get("conf", {}).items():
            self.conf[m] += c
        self.images["scored"] += "conf" in result
        for key in ("features", "crf", "retrieval", "baselines"):
            if key in result:
                self.seconds[key].append(result[key])


def _summary(scorer: _Scorer, *, num_images: int, wall: float, timing_scope: str, extractor: FeatureExtractor,
             settings: dict, class_names) -> dict:
    """The summary of a run (see `generate_pseudo_labels`): scores and counts summed over hosts."""
    conf = {m: metrics.sum_across_hosts(scorer.conf[m]) for m in METHODS}  # exact int64
    computed, seconds = scorer.images["computed"], scorer.seconds
    counts = metrics.sum_across_hosts(np.array(
        [[num_images, computed, scorer.images["skipped"], scorer.images["scored"]]], np.int64))[0]
    median = lambda values: float(np.median(values)) if values else None  # noqa: E731
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    methods = scorer.methods
    summary = {
        "images": int(counts[0]), "computed": int(counts[1]), "skipped": int(counts[2]),
        "images_with_ground_truth": int(counts[3]),
        # Medians over this run's computed images (compilations show in the means and in wall).
        "seconds_per_image": {
            "features": median(seconds["features"]), "crf": median(seconds["crf"]),
            "retrieval": median(seconds["retrieval"]), "baselines": median(seconds["baselines"]),
            "features_mean": mean(seconds["features"]), "crf_mean": mean(seconds["crf"]),
            "wall": wall / computed if computed else None,
        },
        "timing_scope": timing_scope,
        "backbone_image_sizes": len(extractor.image_sizes),
        "backbone_compilations": len(extractor.backbone_sizes),
        # Summed over hosts (exact integers): rows = ground truth, columns = prediction.
        "confusion": {m: conf[m].tolist() for m in methods} if counts[3] else {},
        "settings": settings,
    }
    if counts[3]:
        ious = {m: metrics.per_class_iou(conf[m]) for m in methods}
        summary["miou"] = {m: _percent(metrics.mean_iou(conf[m])) for m in methods}
        summary["per_class"] = {name: {m: _percent(ious[m][c]) for m in methods}
                                for c, name in enumerate(class_names)}
        labelled = conf["y_crf"].sum()
        summary["agreement_fraction"] = float(conf["agreement"].sum() / labelled) if labelled else None
        summary["pixel_accuracy"] = {m: _percent(metrics.pixel_accuracy(conf[m])) for m in methods}
    return summary


def generate_pseudo_labels(labeler, source, config, out_dir, *, baselines: Sequence[str] = BASELINES,
                           unseen_classes: Sequence[int] = (), classifier_weight: np.ndarray | None = None,
                           num_classes: int | None = None, class_names: Sequence[str] | None = None,
                           workers: int | None = None, image_step: int = IMAGE_STEP,
                           num_visualisations: int = 8, progress: bool = True, report: bool = True,
                           process_index: int | None = None, process_count: int | None = None) -> dict:
    """Label every image of `source` (this host's share) and score the labels; returns the summary.

    Args:
      labeler: a `bana_jax.models.Labeler` (trained; put in eval mode here).
      source: random-access raw samples (`image`, `boxes` inclusive pixels, `box_labels`, `id`,
        optional `label`).
      config: uses `pseudo.use_u0`, `pseudo.box_convention`, `pseudo.save_visualisations`,
        `pseudo.image_bucket` (0: exact backbone sizes), `crf.*`,
        `model.num_classes` (unless num_classes is given).
      out_dir: where `Y_crf/`, `Y_ret/`, `baselines/grabcut/`, `visualisations/`, `summary.json` go.
      baselines: which of "box_fill", "grabcut" to score when ground truth exists (GrabCut costs
        about a second per box on a CPU; its labels are kept under `baselines/grabcut/`).
      unseen_classes: class ids without a trained classifier weight (`1 - u_0` inside their boxes).
      classifier_weight: `(D, C)` weights per class id of `source`, replacing the labeler's own
        (e.g. VOC columns re-indexed for COCO classes, `pseudo_labels.remap_classifier_weight`).
      num_classes: classes of the labels, for scoring (default `model.num_classes`).
      class_names: names of the C classes for the per-class table (default: the source's, if any).
      workers: CPU threads for the CRF and baselines (default: all cores).
      image_step: image buckets are multiples of this many pixels.
      num_visualisations: panels for the first N images of this host (when save_visualisations).
      progress: show a tqdm bar (rate, ETA).
      report: print the per-class table and the timing split at the end (process 0).
      process_index, process_count: host sharding (default: jax.process_index() / process_count()).

    Returns the summary dict (also `out_dir/summary.json`, written by process 0):
      `{"images": N, "computed": n, "skipped": n, "images_with_ground_truth": n,
        "miou": {"y_crf", "y_ret", "agreement", "box_fill", "grabcut"} (percent, or absent without
        ground truth), "per_class": {name: {method: IoU %}}, "agreement_fraction": ..,
        "seconds_per_image": {"features", "crf", "retrieval", "baselines", "features_mean",
        "crf_mean", "wall"}, ...}`.
      "agreement" is Y_crf scored only on the pixels where Y_crf == Y_ret (the reliable region S);
      "agreement_fraction" the share of labelled pixels in S. Timings are medians over the images
      computed in this run on this host (None when all were done already): "features" = backbone +
      unaries + retrieval (device), "crf" = DenseCRF (CPU, one thread); "wall" = this run's wall
      time per computed image (compilations included; CPU and device work overlap).
    """
    out_dir = Path(out_dir)
    pseudo, crf_cfg = config.pseudo, config.crf
    stage2_boxes(np.zeros((0, 4), np.float32), (1, 1), pseudo.box_convention)  # a bad value fails here
    if set(baselines) - set(BASELINES):
        raise ValueError(f"baselines must be a subset of {BASELINES}, got {tuple(baselines)}")
    num_classes = int(config.model.num_classes if num_classes is None else num_classes)
    if class_names is None:
        class_names = getattr(source, "class_names", None)
    if class_names is None or len(class_names) != num_classes:
        class_names = tuple(f"class_{c}" for c in range(num_classes))
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    indices = range(process_index, len(source), process_count)
    crf_params = dict(bi_w=crf_cfg.bi_w, bi_xy_std=crf_cfg.bi_xy_std, bi_rgb_std=crf_cfg.bi_rgb_std,
                      pos_w=crf_cfg.pos_w, pos_xy_std=crf_cfg.pos_xy_std, n_iter=crf_cfg.iterations)
    workers = workers or os.cpu_count() or 1
    extractor = FeatureExtractor(labeler, image_bucket=pseudo.image_bucket)
    own = extractor.classifier_weight  # (D, C)
    weight = own if classifier_weight is None else np.asarray(classifier_weight, np.float32)
    if weight.ndim != 2 or weight.shape[0] != own.shape[0]:
        raise ValueError(f"classifier_weight must be (D, C) with the labeler's D = {own.shape[0]}, got shape "
                         f"{weight.shape}")
    unaries_of = functools.partial(_image_unaries, extractor, weight, pseudo=pseudo,
                                   unseen_classes=unseen_classes, image_step=image_step)
    visualise = bool(pseudo.save_visualisations) and num_visualisations > 0
    vis_dir = out_dir / "visualisations"
    scorer = _Scorer(num_classes, baselines)

    def process(job: _Job) -> dict:  # a CPU worker
        y_crf, y_ret, result = _label_image(job, crf_params, vis_dir)
        return result if job.label is None else result | scorer.score(job, y_crf, y_ret)

    bar = tqdm(total=len(indices), unit="img", desc="stage2", disable=not progress, dynamic_ncols=True)
    stale = _stale_temporaries(out_dir)  # only this host's images' are removed (hosts may share out_dir)
    wall_start = time.perf_counter()
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stage2-cpu") as pool:

        def drain(limit: int) -> None:
            while len(pending) > limit:
                scorer.add(pending.popleft().result())
                bar.update(1)
                bar.set_postfix(computed=scorer.images["computed"], skipped=scorer.images["skipped"],
                                refresh=False)

        for position, index in enumerate(indices):
            # Panels by position, not by count of computed images: a resumed run adds no second set.
            job = _make_job(source[index], out_dir, unaries_of, visualise and position < num_visualisations)
            for tmp in stale.pop(job.id, ()):
                tmp.unlink(missing_ok=True)
            scorer.images["computed" if job.compute else "skipped"] += 1
            pending.append(pool.submit(process, job))
            drain(2 * workers)
        drain(0)
    bar.close()
    wall = time.perf_counter() - wall_start

    summary = _summary(
        scorer, num_images=len(indices), wall=wall, extractor=extractor, class_names=class_names,
        timing_scope=f"host {process_index} of {process_count}, {scorer.images['computed']} computed images, "
                     f"{workers} CPU workers, device {jax.devices()[0].platform}",
        settings={"use_u0": bool(pseudo.use_u0), "image_bucket": extractor.image_bucket, "crf": crf_params,
                  "unseen_classes": list(unseen_classes), "baselines": list(baselines)})
    if process_index == 0:
        bio.write_json(out_dir / "summary.json", summary)
        panels = sorted(vis_dir.glob("*.png")) if visualise else []
        if panels:  # every panel so far, this run's and earlier runs'
            # A panel written before titles were stored in it gets none rather than wrong ones.
            visualize.write_index(vis_dir, [{"id": p.stem, "file": p.name,
                                             "titles": visualize.read_titles(p) or []} for p in panels])
        if report:
            _report(summary, class_names)
    return summary


def stage2_boxes(boxes, image_hw, box_convention: str) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive pixel boxes -> (the half-open boxes stage 2 labels with, those whose union is the
    in-box region), per `pseudo.box_convention` (see `pseudo_labels.prepare_boxes`)."""
    if box_convention == "official":
        return (baselines_lib.official_half_open_boxes(boxes, image_hw),
                baselines_lib.official_region_boxes(boxes))
    if box_convention == "pixels":
        half_open = baselines_lib.half_open_boxes(boxes)
        return half_open, half_open
    raise ValueError(f"pseudo.box_convention must be 'official' or 'pixels', got {box_convention!r}")


def _percent(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else 100.0 * value


def _report(summary: dict, class_names) -> None:
    t = summary["seconds_per_image"]
    fmt = lambda v: "   n/a" if v is None else f"{v:6.3f}"  # noqa: E731
    lines = [f"stage 2: {summary['images']} images ({summary['computed']} computed, "
             f"{summary['skipped']} already done)",
             f"seconds per image (supplement Table 4): features {fmt(t['features'])} "
             f"(retrieval {fmt(t['retrieval'])})  CRF {fmt(t['crf'])}  wall {fmt(t['wall'])}  "
             f"baselines {fmt(t['baselines'])}  [{summary['timing_scope']}]"]
    if "miou" in summary:
        methods = list(summary["miou"])
        width = max(10, *(len(n) for n in class_names))
        cell = lambda v: "   n/a" if v is None else f"{v:6.2f}"  # noqa: E731
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{m:>9}" for m in methods))
        for name in class_names:
            row = summary["per_class"][name]
            lines.append(f"{name:<{width}}  " + "  ".join(f"{cell(row[m]):>9}" for m in methods))
        lines.append(f"{'mIoU':<{width}}  " + "  ".join(f"{cell(summary['miou'][m]):>9}" for m in methods))
        if summary.get("agreement_fraction") is not None:
            lines.append(f"agreement region (Y_crf == Y_ret): {100 * summary['agreement_fraction']:.1f}% "
                         "of labelled pixels")
    text = "\n".join(lines)
    log.info("%s", text)
    print(text, flush=True)


def _category_map(source) -> dict[int, int] | None:
    """COCO category id -> class id of the CocoSource inside `source` (through the builders'
    wrappers, which keep it as `.source`), or None."""
    while source is not None:
        mapping = getattr(source, "category_map", None)
        if mapping is not None:
            return dict(mapping)
        source = getattr(source, "source", None)
    return None


def voc_weights_for_coco(labeler_weight, source) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """The classifier weights of a VOC labeler for the 80 COCO classes, or None if this is not that case.

    The case (the paper's unseen-class experiment, VOC -> COCO): the labeler scores the 21 VOC classes
    (`labeler_weight` `(D, 21)`) and `source` gives the 80 COCO classes (`data.classes = 'coco'`,
    class ids 1..80 = categories in ascending id). A category that is a VOC class (COCO_TO_VOC) is
    scored by that VOC class's column; the other 60 have no weight (unseen: `1 - u_0` inside their
    boxes). Returns the weights `(D, 81)` and the unseen class ids (see
    `pseudo_labels.remap_classifier_weight`).
    """
    names = getattr(source, "class_names", None)
    if labeler_weight.shape[1] != len(VOC_CLASSES) or names is None or len(names) != COCO_CLASSES:
        return None
    category_map = _category_map(source)
    if category_map is None or len(category_map) != COCO_CLASSES - 1:
        raise ValueError(f"a VOC labeler on {COCO_CLASSES - 1} classes needs a COCO source with its "
                         "category map (data.name 'coco' or 'coco_subset', data.classes 'coco')")
    columns = np.full(COCO_CLASSES, -1, np.int64)
    columns[0] = 0  # background
    for category, cls in category_map.items():
        columns[cls] = COCO_TO_VOC.get(category, -1)
    return pl.remap_classifier_weight(labeler_weight, columns)


def _class_weights(labeler, source, class_names) -> dict:
    """generate_pseudo_labels arguments for the classes of `source`: the VOC -> COCO weights and
    unseen classes where that applies (logged), else nothing (the labeler's own weights)."""
    weight = np.asarray(labeler.classifier.weight, np.float32)  # (D, C)
    remapped = voc_weights_for_coco(weight, source)
    if remapped is None:
        return {}
    remapped_weight, unseen = remapped
    names = class_names if class_names is not None else source.class_names
    log.info("VOC labeler on %d COCO classes: %d use their VOC classifier column, %d are unseen "
             "(1 - u_0 inside their boxes): %s", COCO_CLASSES - 1, COCO_CLASSES - 1 - len(unseen),
             len(unseen), ", ".join(names[c] for c in unseen))
    return dict(classifier_weight=remapped_weight, unseen_classes=unseen, num_classes=COCO_CLASSES)


def load_official_labeler(path):
    """The labeler of an official PyTorch `Labeler` state dict (`pseudo.labeler`), eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pseudo.labeler={str(path)!r}: no such file (expected an official Labeler "
                                "state dict, e.g. written by `bana export-torch`)")
    labeler = official_labeler(path, where=f"pseudo.labeler={str(path)!r}")
    log.info("labeler from %s: %d classes, feature width %d", path, labeler.num_classes, labeler.feature_dim)
    return labeler


def main(config, workdir) -> dict:
    """`bana stage2`: label `pseudo.split` with the labeler of `pseudo.stage1_workdir`, or with an
    official PyTorch Labeler state dict (`pseudo.labeler`, e.g. from `bana export-torch`).

    A VOC labeler (21 classes) on COCO with `data.classes = 'coco'` labels all 80 COCO classes: the
    20 VOC ones with their VOC weights, the other 60 as unseen classes (`voc_weights_for_coco`).
    COCO data: the labels are also written as RLE instance masks, `OUT/instances_y_crf.json`."""
    if bool(config.pseudo.stage1_workdir) == bool(config.pseudo.labeler):
        raise ConfigError("set exactly one of pseudo.stage1_workdir (the workdir of a finished `bana stage1` "
                          "run) and pseudo.labeler (an official PyTorch Labeler .pth), got "
                          f"stage1_workdir={config.pseudo.stage1_workdir!r}, labeler={config.pseudo.labeler!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # what `bana stage2` compares a re-run with
        bio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    configure_compilation_cache(config.train.compilation_cache, workdir)
    if config.pseudo.labeler:
        labeler = load_official_labeler(config.pseudo.labeler)
    else:
        labeler = artifacts.load_model(config.pseudo.stage1_workdir, "labeler")
    source = builders.data_source(config, config.pseudo.split)
    try:
        names = builders.class_names(config)
    except Exception:  # noqa: BLE001 - names are cosmetic
        names = None
    out_dir = Path(config.pseudo.output_dir) if config.pseudo.output_dir else workdir / "pseudo_labels"
    summary = generate_pseudo_labels(labeler, source, config, out_dir, class_names=names,
                                     baselines=tuple(config.pseudo.baselines),
                                     progress=bool(config.train.progress_bar) and sys.stderr.isatty(),
                                     **_class_weights(labeler, source, names))
    if config.data.name in ("coco", "coco_subset") and jax.process_index() == 0:
        # COCO: also as instance masks (RLE), one per box, for Mask R-CNN training elsewhere.

        annotations = (config.data.annotations if config.data.name == "coco_subset" else
                       Path(config.data.root) / "annotations" / f"instances_{config.pseudo.split}.json")
        counts = coco_export.export_instances(annotations, out_dir / "Y_crf", out_dir / "instances_y_crf.json",
                                              classes=config.data.classes)
        log.info("wrote %s: %d instances in %d images", out_dir / "instances_y_crf.json",
                    counts["instances"], counts["images"])
    return summary
