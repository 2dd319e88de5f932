"""Training-batch loading with grain: worker processes, prefetch, per-host sharding, checkpointable
position, epoch-wise shuffling from a seed (`builders.training_batches` sets it up from a config).

    source = builders.data_source(config)      # synthetic / voc / coco / prepared records
    loader = make_train_loader(source, aug=transforms.AugmentConfig(), batch_size=8, max_boxes=16)
    it = iter(loader)                          # batches: see batching.py
    state = it.get_state(); ...; it2 = iter(loader); it2.set_state(state)   # resume

Randomness: the sampler shuffles the index with `seed` anew each epoch; each record's augmentation
draws from a Generator that grain derives from `seed` and the record's position, so batches do not
depend on the worker count and a resumed iterator sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import os
import sys

import grain.python as grain
import jax
import numpy as np
from absl import flags

from bana_jax.data import batching, transforms
from bana_jax.data.common import DataError, read_index_png

log = logging.getLogger(__name__)


class WithPixelMaps:
    """Adds per-pixel maps read from `<dir>/<id>.png` to another source's samples (stage 3:
    `{"y_crf": dir1, "y_ret": dir2}`), each checked against the image size."""

    def __init__(self, source, map_dirs: dict[str, str]):
        self.source, self.map_dirs = source, dict(map_dirs)
        self.class_names = getattr(source, "class_names", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.source[index])
        h, w = sample["image"].shape[:2]
        for key, folder in self.map_dirs.items():
            path = os.path.join(folder, f"{sample['id']}.png")
            m = read_index_png(path)
            if m.shape != (h, w):
                raise DataError(path, f"{key} is {m.shape} but the image is {(h, w)}")
            sample[key] = m
        return sample


class TrainTransform(grain.RandomMapTransform):
    """Raw sample -> network-ready sample with boxes padded to `max_boxes` (per record)."""

    def __init__(self, aug: transforms.AugmentConfig, max_boxes: int):
        self.aug, self.max_boxes = aug, max_boxes

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        return batching.pad_boxes(transforms.train_transform(element, rng, self.aug),
                                  self.max_boxes)


def _shard(shard_index, shard_count) -> grain.ShardOptions:
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                              drop_remainder=True)


class HostBlockSampler:
    """Puts process p's records in block p of every global batch, as one process would.

    grain's DataLoader gives process p of n the sampler positions p, p + n, p + 2n, ...; stacked
    by `mesh.shard_batch` (process 0's rows first), global batch k would then hold positions
    kB, kB + 2, ..., kB + 1, kB + 3, ...: the same records as one process reads, in another order,
    so the loss sums in another order and dropout masks land on other images. This wrapper maps
    loader position j * n + p (local record j = k * b + r, b = B / n) to the logical position
    k * B + p * b + r of `sampler`, whose record and augmentation stream it returns: row p * b + r
    of global batch k is then logical position k * B + p * b + r for any process count.
    Exact without worker processes: with workers, grain batches each worker's positions apart.
    """

    def __init__(self, sampler, local_batch: int, shard_count: int):
        if local_batch < 1 or shard_count < 1:
            raise ValueError(f"local_batch and shard_count must be >= 1, got {local_batch}, {shard_count}")
        self.sampler, self.local_batch, self.shard_count = sampler, int(local_batch), int(shard_count)

    def __len__(self) -> int:
        # Whole global batches only: the positions of a partial last one would map past the end.
        size = len(self.sampler)
        whole = self.local_batch * self.shard_count
        return size if size == sys.maxsize else size // whole * whole

    def __repr__(self) -> str:  # grain checks it on restore: it must not depend on the process
        return (f"HostBlockSampler({self.sampler!r}, local_batch={self.local_batch}, "
                f"shard_count={self.shard_count})")

    def logical_index(self, index: int) -> int:
        local, shard = divmod(int(index), self.shard_count)
        step, row = divmod(local, self.local_batch)
        return (step * self.shard_count + shard) * self.local_batch + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if index < 0:
            raise IndexError(f"record index must be >= 0, got {index}")
        inner = self.sampler[self.logical_index(index)]
        # grain tracks the loader position (`index`) for get_state()/set_state().
        return grain.RecordMetadata(index=index, record_key=inner.record_key, rng=inner.rng)


def make_train_loader(source, *, aug: transforms.AugmentConfig, batch_size: int, max_boxes: int,
                      seed: int = 0, num_epochs: int | None = None, num_workers: int = 0,
                      prefetch: int = 2, shard_index: int | None = None, shard_count: int | None = None,
                      sampler=None) -> grain.DataLoader:
    """A grain DataLoader of training batches (batching.py layout), `batch_size` per host.

    `aug`: each record's augmentation (its crop_size is the batch's image size); `num_epochs`:
    None = forever; `num_workers`: worker processes (0 = read in this process); `prefetch`: batches
    each worker buffers. Sharding defaults to jax.process_index() / jax.process_count(); each host
    sees a disjoint part of every epoch. `sampler`: another grain sampler (e.g.
    `sampling.ClassBalancedSampler`) instead of the epoch-wise shuffle; it is endless, so
    `num_epochs` does not apply.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_options = _shard(shard_index, shard_count)
    if sampler is None:
        # One shuffle of all records, the same on every host (NoSharding): the loader's
        # shard_options split its positions over hosts, so the global batches do not depend on
        # the process count (with grain's own per-host shards they would). One host keeps its
        # ShardOptions(0, 1): the same order, and the repr its checkpoints were written with.
        sampler = grain.IndexSampler(
            num_records=len(source), shuffle=True, num_epochs=num_epochs, seed=seed,
            shard_options=shard_options if shard_options.shard_count == 1 else grain.NoSharding())
    if shard_options.shard_count > 1:
        sampler = HostBlockSampler(sampler, batch_size, shard_options.shard_count)
    if num_workers:
        # grain's worker processes read absl flags; a program that never parsed them (pytest, a
        # notebook) would fail with UnparsedFlagAccessError.

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    operations = [TrainTransform(aug, max_boxes),
                  grain.Batch(batch_size, drop_remainder=True, batch_fn=batching.collate)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            shard_options=shard_options,
                            worker_count=num_workers, worker_buffer_size=prefetch,
                            read_options=grain.ReadOptions(num_threads=1 if num_workers else 2,
                                                           prefetch_buffer_size=4 * batch_size))

