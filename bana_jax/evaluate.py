"""`bana evaluate`: mIoU of a stage-3 DeepLab on `eval.split`, as the official `validation()`.

    bana evaluate --config=configs/voc/stage3_deeplab_v1.py --workdir=DIR

Per image (batch 1, full resolution): scales `eval.scales` x {image, h-flip}, scores upsampled to
the image and averaged, softmax(tau * mean), DenseCRF (`crf.*`) if `eval.crf`, argmax; see
bana_jax.evaluation for the math. Confusion matrices are accumulated per host (each host scores
every process_count-th image) and summed over hosts.

Image sizes. Images (and their rescaled copies) come in many sizes, and one XLA program per size
would mean hundreds of compilations. `BucketedScorer` pads each network input at the bottom and
right, with the colour training pads crops with, to the next multiple of `bucket` pixels (one
program per bucket), and keeps the top-left block of the output the unpadded input would give
(`output_size` of the network for that size). The feature grid is the same (the network's
strides are anchored at the top-left pixel), so the upsampling to the image is the official one;
what differs is the context: near the bottom and right edges the network sees mean-colour padding
(as in training crops) where the unpadded run sees the conv layers' zero padding. So bucketing is
not bit-exact, only close; `eval.size_bucket=0` runs every size unpadded (exact, one compilation
per size).

Outputs: WORKDIR/eval_<split>.json (scores, per-class table, settings), the table on stdout, and
with `eval.save_predictions` palette PNGs in WORKDIR/predictions/<split>/<id>.png.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bana_jax import builders, io, metrics
from bana_jax.data.transforms import MEAN_RGB_PAD, caffe_normalize
from bana_jax.evaluation import CRF_PARAM_NAMES, official_crf_image, predict
from bana_jax.stage3 import load_trained_deeplab, resolve_checkpoint
from bana_jax.train.mesh import is_main_process

logger = logging.getLogger("bana_jax.evaluate")

SIZE_BUCKET = 64


class BucketedScorer:
    """`score_fn(images (B, h, w, 3)) -> scores (B, h', w', C)` float32 for evaluation.predict,
    compiled once per padded size (see the module docstring)."""

    def __init__(self, model: nnx.Module, bucket: int = SIZE_BUCKET):
        if bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0 = no padding), got {bucket}")
        model.eval()
        graphdef, state = nnx.split(model)
        self.bucket = bucket
        self._state = state
        self._pad_value = caffe_normalize(np.asarray(MEAN_RGB_PAD, np.float32))

        @jax.jit
        def scores(state, images):
            return nnx.merge(graphdef, state)(images)[1].astype(jnp.float32)

        self._scores = scores

    @functools.lru_cache(maxsize=1024)
    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') of the scores for an unpadded `(1, height, width, 3)` input (traced, not run)."""
        shape = jax.eval_shape(self._scores, self._state,
                               jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)).shape
        return int(shape[1]), int(shape[2])

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.bucket:
            return height, width
        return (math.ceil(height / self.bucket) * self.bucket,
                math.ceil(width / self.bucket) * self.bucket)

    def __call__(self, images) -> jax.Array:
        batch, height, width, _ = images.shape
        padded_h, padded_w = self.padded_size(height, width)
        if (padded_h, padded_w) == (height, width):
            return self._scores(self._state, images)
        padded = np.empty((batch, padded_h, padded_w, 3), np.float32)
        padded[...] = self._pad_value
        padded[:, :height, :width] = np.asarray(images, np.float32)
        out_h, out_w = self.output_size(height, width)
        return self._scores(self._state, padded)[:, :out_h, :out_w]


def crf_params(config) -> tuple[float, ...]:
    """`[bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std]` from `config.crf`."""
    return tuple(float(config.crf[name]) for name in CRF_PARAM_NAMES)


def _class_names(source, config, num_classes: int) -> tuple[str, ...]:
    names = getattr(source, "class_names", None)
    if names is None or len(names) != num_classes:
        try:
            names = builders.class_names(config)
        except Exception:  # noqa: BLE001  (names are cosmetic)
            names = None
    if names is None or len(names) != num_classes:
        names = tuple(str(c) for c in range(num_classes))
    return tuple(names)


def _progress(iterable, total: int, enabled: bool):
    if enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
        return tqdm(iterable, total=total, desc="evaluate", dynamic_ncols=True)
    return iterable


def _nan_to_none(values) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


def _softmax_tau(model: nnx.Module, config) -> float:
    """The temperature of the evaluation softmax: the model's trained tau for the cosine head
    (whose scores are cosines), 1 for the dot head (whose scores are logits).

    The trained tau is `model.tau` (stage 3 builds the model with the tau of WORKDIR/model.json).
    `config.loss.tau` is a training setting: where it differs (an override at evaluation time) it
    is not used, with a warning, since another tau would change the CRF's input.
    """
    if model.classifier.kind != "cosine":
        return 1.0
    config_tau = float(config.loss.tau)
    tau = float(getattr(model, "tau", config_tau))
    if not math.isclose(tau, config_tau, rel_tol=1e-9, abs_tol=0.0):
        logger.warning("loss.tau=%g differs from the model's trained tau=%g; evaluating with the "
                       "trained tau", config_tau, tau)
    return tau


def evaluate_model(model: nnx.Module, source, config, *, predictions_dir=None,
                   bucket: int = SIZE_BUCKET, progress: bool = True, crf_fn=None) -> dict:
    """Scores `model` on the samples of `source` (which must carry `label`), per `config.eval`.

    Args:
      model: a DeepLab (`model(images) -> (features, scores)`); switched to eval mode.
      source: random-access raw samples; the first `eval.max_images` (0 = all) are used, this
        host taking every process_count-th one.
      config: uses `eval.*`, `crf.*`, `model.num_classes` (`loss.tau` only to warn when it
        differs from the model's own `tau`, which is used).
      predictions_dir: if set, each prediction is written there as `<id>.png` (palette PNG).
      bucket: input padding granularity, 0 = exact sizes (see the module docstring).
      crf_fn: DenseCRF override for tests (default crf_ext.dense_crf).

    Returns:
      dict with `miou`, `pixel_accuracy`, `mean_accuracy` (fractions), `iou`, `accuracy` (per
      class, None where undefined), `class_names`, `confusion` (int64 `(C, C)`, all hosts),
      `num_images`, `tau` (of the softmax), `table` (text).
    """
    ev = config.eval
    num_classes = int(config.model.num_classes)
    tau = _softmax_tau(model, config)
    scorer = BucketedScorer(model, bucket)
    params = crf_params(config) if ev.crf else None
    total = len(source) if not ev.max_images else min(len(source), int(ev.max_images))
    indices = range(jax.process_index(), total, jax.process_count())
    out_dir = Path(predictions_dir) if predictions_dir else None

    confusion = np.zeros((num_classes, num_classes), np.int64)
    for index in _progress(indices, len(indices), progress and is_main_process()):
        sample = source[index]
        if "label" not in sample:
            raise ValueError(f"sample {sample.get('id', index)!r} has no ground-truth 'label'; "
                             f"eval.split={ev.split!r} must be a labelled split")
        image_rgb = np.asarray(sample["image"], np.uint8)
        images = caffe_normalize(image_rgb)[None]
        crf_images = official_crf_image(images) if ev.crf_uint8_quirk else image_rgb[None]
        prediction = predict(scorer, jnp.asarray(images), crf_images=crf_images, tau=tau,
                             scales=tuple(ev.scales), flip=bool(ev.flip), crf_params=params,
                             n_iter=int(config.crf.iterations), crf_fn=crf_fn)[0]
        confusion += metrics.confusion_matrix(prediction, sample["label"], num_classes)
        if out_dir is not None:
            io.write_label_png(out_dir / f"{sample['id']}.png", prediction.astype(np.uint8))

    confusion = metrics.sum_across_hosts(confusion)
    num_images = int(metrics.sum_across_hosts(np.array([[len(indices)]], np.int64))[0, 0])
    scores = metrics.segmentation_scores(confusion)
    names = _class_names(source, config, num_classes)
    return {
        "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
        "mean_accuracy": scores["mean_accuracy"], "iou": _nan_to_none(scores["iou"]),
        "accuracy": _nan_to_none(scores["accuracy"]), "class_names": list(names),
        "confusion": confusion, "num_images": num_images, "tau": tau,
        "table": metrics.format_table(confusion, names),
    }


def main(config, workdir) -> int:
    workdir = Path(workdir)
    ev = config.eval
    checkpoint_path, _ = resolve_checkpoint(workdir, ev.checkpoint)
    model = load_trained_deeplab(workdir, ev.checkpoint)
    source = builders.data_source(config, ev.split, max_images=0)
    predictions_dir = workdir / "predictions" / ev.split if ev.save_predictions else None
    result = evaluate_model(model, source, config, predictions_dir=predictions_dir,
                            bucket=int(ev.size_bucket), progress=bool(config.train.progress_bar))
    if is_main_process():
        print(f"{ev.split}: {result['num_images']} images, scales {tuple(ev.scales)}, "
              f"flip {ev.flip}, CRF {crf_params(config) if ev.crf else 'off'}")
        print(result["table"])
        record = {k: v for k, v in result.items() if k not in ("confusion", "table")}
        record.update(
            confusion=result["confusion"].tolist(), checkpoint=str(checkpoint_path),
            split=ev.split, scales=list(ev.scales), flip=bool(ev.flip), crf=bool(ev.crf),
            crf_params=list(crf_params(config)), crf_iterations=int(config.crf.iterations),
            crf_uint8_quirk=bool(ev.crf_uint8_quirk), size_bucket=int(ev.size_bucket),
            predictions=str(predictions_dir) if predictions_dir else None)
        io.write_json(workdir / f"eval_{ev.split}.json", record)
        logger.info("mIoU %.2f%% on %s; results in %s", 100 * result["miou"], ev.split,
                    workdir / f"eval_{ev.split}.json")
    return 0
