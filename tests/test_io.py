import json
import os

import numpy as np
import pytest
from PIL import Image

from bana_jax import io


def test_voc_palette_known_colours():
    palette = io.voc_palette()
    # The standard VOC colours: background black, aeroplane (128,0,0), person (192,128,128).
    assert palette[0].tolist() == [0, 0, 0]
    assert palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128]
    assert palette[20].tolist() == [0, 64, 128]


def test_label_png_round_trip_keeps_ids(tmp_path):
    labels = np.random.default_rng(0).integers(0, 21, (13, 17)).astype(np.uint8)
    labels[0, 0] = 255
    path = tmp_path / "sub" / "x.png"
    io.write_label_png(path, labels)
    with Image.open(path) as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(io.read_label_png(path), labels)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # no temporary left behind


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    io.write_json(path, {"a": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")  # as the OS says it: no file name

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left on device") as error:
        io.write_json(path, {"a": 2})
    assert error.value.filename == str(path)  # the user is told which file
    assert json.loads(path.read_text()) == {"a": 1}  # the old file survives intact
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_bad_labels_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W\) uint8"):
        io.write_label_png(tmp_path / "x.png", np.zeros((3, 4), np.int32))
