"""grain loader: shapes, determinism, resumption from a checkpointed position, host sharding."""

import pickle

import numpy as np
import pytest

from bana_jax import builders
from bana_jax.data import loader, synthetic, transforms
from bana_jax.data.common import DataError
from bana_jax.config import apply_overrides, base_config

LOADER = dict(aug=transforms.AugmentConfig(crop_size=32), batch_size=2, max_boxes=3, seed=7)


def _loader(source, **kwargs):
    return loader.make_train_loader(source, **{**LOADER, **kwargs})


@pytest.fixture(scope="module")
def source():
    """12 synthetic 40x40 images of 3 classes."""
    return builders.data_source(apply_overrides(base_config(), [
        ("data.name", "synthetic"), ("data.split", "train"), ("data.synthetic_images", "12"),
        ("data.synthetic_size", "40"), ("model.num_classes", "4")]))


class _Tagged:
    """Adds an extra per-pixel map holding the record index (it survives every transform)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        s = dict(self.source[i])
        s["record"] = np.full(s["image"].shape[:2], i, np.uint8)
        return s


def _records(batch):
    return [int(r.min()) for r in batch["record"]]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_batches_have_the_fixed_layout(source):
    b = next(iter(_loader(source)))
    assert b["image"].shape == (2, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["bg_mask"].shape == (2, 32, 32) and b["bg_mask"].dtype == np.float32
    assert b["boxes"].shape == (2, 3, 4) and b["box_labels"].dtype == np.int32
    assert b["box_valid"].dtype == bool and b["label"].shape == (2, 32, 32)
    assert np.all(np.abs(b["boxes"][b["box_valid"]]) <= 1)
    assert np.all((b["box_labels"] >= 1) == b["box_valid"])


def test_resume_sees_the_same_batches(source):
    it = iter(_loader(source, shard_index=0, shard_count=1))
    _take(it, 3)
    state = it.get_state()
    want = _take(it, 5)  # crosses the epoch boundary (6 batches per epoch)
    resumed = iter(_loader(source, shard_index=0, shard_count=1))
    resumed.set_state(state)
    for a, b in zip(want, _take(resumed, 5)):
        _same(a, b)


def test_epochs_reshuffle_deterministically(source):
    def order(seed):
        l = _loader(_Tagged(source), seed=seed, num_epochs=2, shard_index=0, shard_count=1, batch_size=1)
        return [r for b in l for r in _records(b)]

    a, b, c = order(1), order(1), order(2)
    assert a == b and len(a) == 24 and a != c
    assert a[:12] != a[12:]  # the second epoch is a different permutation...
    assert sorted(a[:12]) == sorted(a[12:]) == list(range(12))  # ...of all the records


def test_hosts_see_disjoint_shards():
    src = synthetic.SyntheticSource(num_images=12, image_size=40, num_classes=3)
    ids = []
    for host in range(2):
        l = _loader(_Tagged(src), shard_index=host, shard_count=2, num_epochs=1, batch_size=1)
        ids.append([r for b in l for r in _records(b)])
    assert len(ids[0]) == len(ids[1]) == 6 and sorted(ids[0] + ids[1]) == list(range(12))


def test_workers_give_the_same_records(source):
    """With worker processes batches are formed within each worker (positions k, k + n, ...), but
    every record is augmented exactly as without workers: grain seeds each record's Generator from
    the sampler position, not from the worker."""
    tagged = _Tagged(source)
    single = {}
    for b in _take(iter(_loader(tagged, shard_index=0, shard_count=1)), 2):
        for r, img, box in zip(_records(b), b["image"], b["boxes"]):
            single[r] = (img, box)
    it = iter(_loader(tagged, shard_index=0, shard_count=1, num_workers=2))
    seen = []
    for b in _take(it, 2):
        for r, img, box in zip(_records(b), b["image"], b["boxes"]):
            np.testing.assert_array_equal(np.asarray(img), single[r][0])
            np.testing.assert_array_equal(np.asarray(box), single[r][1])
            seen.append(r)
    assert sorted(seen) == sorted(single)


class _Corrupt(_Tagged):
    """Record 3 fails as a corrupt file does in a reader."""

    def __getitem__(self, i):
        if i == 3:
            raise DataError("/data/photos/000003.jpg", "cannot decode the image (truncated JPEG)")
        return super().__getitem__(i)


def test_data_errors_in_workers_reach_the_parent_with_file_and_reason(source):
    error = pickle.loads(pickle.dumps(DataError("/data/a.jpg", "corrupt")))
    assert (error.path, error.problem, str(error)) == ("/data/a.jpg", "corrupt", "/data/a.jpg: corrupt")
    it = iter(_loader(_Corrupt(source), shard_index=0, shard_count=1, num_workers=1))
    with pytest.raises(Exception) as caught:
        _take(it, 6)  # every record of an epoch
    chain, err = [], caught.value
    while err is not None:  # grain may wrap the worker's exception
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, DataError) and e.path == "/data/photos/000003.jpg"
               and "truncated JPEG" in str(e) for e in chain), [repr(e) for e in chain]


def test_hosts_stack_to_the_single_host_batches():
    """Process p's local batch is block p of the global batch one process reads (same records,
    same augmentation), for the default shuffle and the class-balanced sampler."""
    from bana_jax.data import sampling

    src = _Tagged(synthetic.SyntheticSource(num_images=10, image_size=40, num_classes=3))
    balanced = sampling.ClassBalancedSampler(sampling.image_classes(src), seed=0)
    for sampler in (None, balanced):
        def batches(shard_index, shard_count):
            it = iter(_loader(src, batch_size=4 // shard_count, seed=3, shard_index=shard_index,
                              shard_count=shard_count, sampler=sampler))
            return _take(it, 4)  # crosses the first epoch's end (10 records)

        whole, hosts = batches(0, 1), [batches(p, 2) for p in (0, 1)]
        for k, batch in enumerate(whole):
            stacked = {key: np.concatenate([hosts[0][k][key], hosts[1][k][key]]) for key in batch}
            _same(batch, stacked)


def test_host_block_sampler_keeps_whole_global_batches_only():
    import grain.python as grain

    inner = grain.IndexSampler(num_records=10, shard_options=grain.NoSharding(), shuffle=False,
                               num_epochs=1, seed=0)
    sampler = loader.HostBlockSampler(inner, local_batch=2, shard_count=2)
    assert len(sampler) == 8
    # Loader positions j * 2 + p; process 0 reads 0, 2, 4, 6 -> logical 0, 1, 4, 5.
    assert [sampler.logical_index(i) for i in range(8)] == [0, 2, 1, 3, 4, 6, 5, 7]
    assert [sampler[i].record_key for i in (0, 2, 4, 6)] == [0, 1, 4, 5]


# grain stores repr(data_source) in the iterator state and refuses another on restore: these are the
# reprs checkpoints were written with, so they must not change.
PINNED_REPRS = [
    ([("data.name", "synthetic"), ("data.split", "train"), ("model.num_classes", "4")], {},
     'bana_source({"annotations": "", "classes": "voc", "images": "", "max_images": 0, "name": "synthetic", '
     '"pseudo_labels": "", "root": "", "size": 200, "split": "train", "synthetic": {"image_size": 112, '
     '"name": "synthetic", "num_classes": 3, "num_images": 200, "synthetic_seed": 0}})'),
    ([("data.name", "synthetic"), ("model.num_classes", "4"), ("data.synthetic_images", "6"),
      ("data.synthetic_size", "40")], dict(split="val", pseudo_labels="/runs/pseudo", max_images=3),
     'bana_source({"annotations": "", "classes": "voc", "images": "", "max_images": 3, "name": "synthetic", '
     '"pseudo_labels": "/runs/pseudo", "root": "", "size": 3, "split": "val", "synthetic": {"image_size": 40, '
     '"name": "synthetic", "num_classes": 3, "num_images": 6, "synthetic_seed": 1}})'),
    ([("data.name", "coco_subset"), ("data.images", "ROOT/train2017"), ("data.classes", "coco"),
      ("data.annotations", "ROOT/annotations/instances_train2017.json")], {},
     'bana_source({"annotations": "ROOT/annotations/instances_train2017.json", "classes": "coco", '
     '"images": "ROOT/train2017", "max_images": 0, "name": "coco_subset", "pseudo_labels": "", "root": "", '
     '"size": 3, "split": "train_aug"})'),
    ([("data.name", "coco"), ("data.root", "ROOT"), ("data.split", "train2017")], {},
     'bana_source({"annotations": "", "classes": "voc", "images": "", "max_images": 0, "name": "coco", '
     '"pseudo_labels": "", "root": "ROOT", "size": 2, "split": "train2017"})'),
]


@pytest.mark.parametrize("overrides, kwargs, want", PINNED_REPRS)
def test_source_repr_is_what_checkpoints_hold(overrides, kwargs, want, coco_photos):
    root = str(coco_photos / "coco_mini")
    config = apply_overrides(base_config(), [(k, v.replace("ROOT", root)) for k, v in overrides])
    assert repr(builders.data_source(config, **kwargs)) == want.replace("ROOT", root)
