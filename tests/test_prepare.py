"""`bana prepare` + `data.source=tfds`: the prepared records give the folder reader's samples at the
same indices (synthetic, a tiny VOC tree, COCO photos), and the training batches, host by host."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bana_jax import builders, cli
from bana_jax.data import loader
from bana_jax.data.transforms import AugmentConfig
from bana_jax.config import ConfigError, apply_overrides, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo" / "stage1.py")
KEYS = ("image", "boxes", "box_labels", "label", "id")


def config_with(overrides, path=DEMO):
    return validate_config(apply_overrides(load_config(path), list(overrides)))


def assert_same_samples(files, records):
    assert len(files) == len(records) > 0
    for i in range(len(files)):
        a, b = files[i], records[i]
        for key in KEYS:
            np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=f"{i} {key}")


def prepare(workdir, overrides, path=DEMO):
    args = ["prepare", f"--config={path}", f"--workdir={workdir}"]
    assert cli.main(args + [f"--config.{k}={v}" for k, v in overrides]) == 0


SYNTHETIC = [("data.synthetic_images", "6"), ("data.synthetic_size", "40"), ("data.crop_size", "32"),
             ("data.batch_size", "4"), ("data.num_workers", "0")]


@pytest.fixture(scope="module")
def synthetic_prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    prepare(folder, SYNTHETIC)
    files = config_with(SYNTHETIC)
    records = config_with(SYNTHETIC + [("data.source", "tfds"), ("data.prepared_dir", str(folder))])
    return folder, files, records


def test_synthetic_records_are_the_generated_samples(synthetic_prepared):
    _, files, records = synthetic_prepared
    for split in ("train", "val"):
        assert_same_samples(builders.data_source(files, split), builders.data_source(records, split))
    assert builders.class_names(records) == builders.class_names(files)


def test_training_batches_match_and_hosts_split_them(synthetic_prepared):
    _, files, records = synthetic_prepared
    want = builders.training_batches(files)
    got = builders.training_batches(records)
    for _ in range(3):  # crosses the first epoch (6 images, batch 4)
        a, b = next(want), next(got)
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    # Two hosts on the prepared records: each reads its own rows, stacked they are one host's batch.
    source_files, source_records = builders.data_source(files), builders.data_source(records)
    options = dict(aug=AugmentConfig(crop_size=32), max_boxes=4, seed=0)
    whole = iter(loader.make_train_loader(source_files, batch_size=4, shard_index=0, shard_count=1, **options))
    hosts = [iter(loader.make_train_loader(source_records, batch_size=2, shard_index=p, shard_count=2, **options))
             for p in (0, 1)]
    for _ in range(2):
        batch, parts = next(whole), [next(h) for h in hosts]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), batch[key])


def test_missing_records_and_fields_name_the_fix(tmp_path, synthetic_prepared):
    with pytest.raises(ConfigError, match="data.prepared_dir"):
        config_with(SYNTHETIC + [("data.source", "tfds")])
    with pytest.raises(ConfigError, match="data.name"):
        config_with(SYNTHETIC + [("data.source", "tfds"), ("data.prepared_dir", "x"),
                                 ("data.name", "coco_subset")])
    other = config_with(SYNTHETIC + [("data.source", "tfds"), ("data.prepared_dir", str(tmp_path))])
    with pytest.raises(FileNotFoundError, match="bana prepare"):
        builders.data_source(other, "train")
    folder, _, _ = synthetic_prepared
    # Another synthetic setting is another record set: not silently the prepared one.
    resized = config_with(SYNTHETIC + [("data.source", "tfds"), ("data.prepared_dir", str(folder)),
                                       ("data.synthetic_size", "48")])
    with pytest.raises(FileNotFoundError, match="no prepared records"):
        builders.data_source(resized, "train")


def make_voc_tree(root: Path) -> None:
    """Two images with boxes and palette label maps, in the VOC + SBD layout."""
    for d in ("JPEGImages", "Annotations", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w), cls in (("a", (12, 16), ("aeroplane", 1)), ("b", (20, 14), ("dog", 12))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(root / f"JPEGImages/{name}.jpg")
        (root / f"Annotations/{name}.xml").write_text(
            f"<annotation><object><name>{cls[0]}</name><bndbox><xmin>2</xmin><ymin>3</ymin>"
            "<xmax>9</xmax><ymax>8</ymax></bndbox></object></annotation>")
        label = np.zeros((h, w), np.uint8)
        label[3:8, 2:9] = cls[1]
        label[-1] = 255
        im = Image.fromarray(label, mode="P")
        im.putpalette([0, 0, 0] * 256)
        im.save(root / f"SegmentationClassAug/{name}.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("b\na\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\n")


def test_voc_records_are_the_folder_samples(tmp_path):
    root = tmp_path / "voc"
    make_voc_tree(root)
    path = str(REPO / "configs" / "voc" / "stage1.py")
    fields = [("data.root", str(root)), ("model.init", "none")]
    prepare(tmp_path / "prepared", fields, path)
    files = config_with(fields, path)
    records = config_with(fields + [("data.source", "tfds"), ("data.prepared_dir", str(tmp_path / "prepared"))], path)
    for split in ("train_aug", "val"):
        assert_same_samples(builders.data_source(files, split), builders.data_source(records, split))
    assert builders.data_source(records, "train_aug")[0]["id"] == "b"  # the list's order, not sorted


def test_coco_records_are_the_folder_samples(tmp_path, coco_photos):
    path = str(REPO / "configs" / "coco" / "stage1.py")
    for classes in ("voc", "coco"):
        fields = [("data.root", str(coco_photos / "coco_mini")), ("data.classes", classes),
                  ("model.init", "none"), ("data.split", "train2017")]
        if classes == "coco":
            fields.append(("model.num_classes", "81"))
        prepare(tmp_path / "prepared", fields, path)
        files = config_with(fields, path)
        records = config_with(fields + [("data.source", "tfds"), ("data.prepared_dir", str(tmp_path / "prepared"))],
                              path)
        assert_same_samples(builders.data_source(files), builders.data_source(records))
        assert builders.data_source(records).class_names == builders.data_source(files).class_names
