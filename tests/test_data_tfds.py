"""tfds builders: build a tiny VOC tree and a COCO subset as array_record, read back without TF."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    import tensorflow_datasets as tfds
    from bana_jax.data import coco, tfds_builders, voc

    tmp, photos = Path(sys.argv[1]), Path(sys.argv[2])
    root = tmp / "voc"
    for d in ("JPEGImages", "Annotations", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    label = np.zeros((12, 16), np.uint8); label[2:5, 3:9] = 1; label[8:, 10:] = 255
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(root / "JPEGImages/a.jpg")
    (root / "Annotations/a.xml").write_text(
        "<annotation><object><name>aeroplane</name><bndbox><xmin>4</xmin><ymin>3</ymin>"
        "<xmax>9</xmax><ymax>5</ymax></bndbox></object></annotation>")
    im = Image.fromarray(label, mode="P"); im.putpalette([0, 0, 0, 128, 0, 0] + [9] * 762)
    im.save(root / "SegmentationClassAug/a.png")
    (root / "ImageSets/Segmentation/train_aug.txt").write_text("a\\n")

    b = tfds_builders.VocSbd(data_dir=str(tmp / "tfds"))
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
                           file_format="array_record")
    src = tfds_builders.TfdsSource(b.as_data_source(split="train_aug"))
    want = voc.VocSource(root)[0]
    got = src[0]
    assert len(src) == 1 and got["id"] == "a"
    for k in ("image", "boxes", "box_labels", "label"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # COCO: the first few coco_mini images.
    croot = tmp / "coco"; (croot / "annotations").mkdir(parents=True)
    data = json.loads((photos / "coco_mini/annotations/instances_train2017.json").read_text())
    keep = {im["id"] for im in data["images"][:3]}
    data["images"] = data["images"][:3]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    (croot / "annotations/instances_train2017.json").write_text(json.dumps(data))
    (croot / "train2017").symlink_to(photos / "coco_mini/train2017")
    cb = tfds_builders.CocoBoxes(data_dir=str(tmp / "tfds"), config="voc20")
    cb.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(croot)),
                            file_format="array_record")
    csrc = tfds_builders.TfdsSource(cb.as_data_source(split="train2017"))
    ref = coco.CocoSource(croot)
    assert len(csrc) == len(ref) > 0
    got_ids = sorted(csrc[i]["id"] for i in range(len(csrc)))
    assert got_ids == sorted(ref[i]["id"] for i in range(len(ref)))
    s = csrc[0]; r = ref[[ref[i]["id"] for i in range(len(ref))].index(s["id"])]
    for k in ("image", "boxes", "box_labels", "label"):
        np.testing.assert_array_equal(s[k], r[k], err_msg=k)
    assert "tensorflow" not in sys.modules, "TensorFlow was imported"
    print("OK")
""")


def test_builders_round_trip_without_tensorflow(tmp_path, coco_photos):
    # A fresh interpreter, so nothing else in the test session can have imported TensorFlow.
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(coco_photos)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]
