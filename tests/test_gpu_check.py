"""bench/gpu_check.py --cpu-smoke: the one-shot GPU check's code paths at tiny shapes, so the script
a GPU owner runs once cannot rot unnoticed."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = [f"{stage}/{dtype}/{framework}" for dtype in ("float32", "bfloat16")
         for stage in ("stage1", "v1", "v2") for framework in ("jax", "torch")]
OTHER = ["stage2/float32/jax", "eval_msf_crf/float32/jax", "eval_single_scale/float32/jax"]


def test_cpu_smoke_measures_everything(tmp_path):
    has_torch = importlib.util.find_spec("torch") is not None
    cache = os.environ.get("BANA_TEST_JAX_CACHE",
                           str(Path(tempfile.gettempdir()) / "bana_jax_test_jax_cache"))
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-smoke",
               "--out", str(tmp_path), "--compilation-cache", cache]
    if not has_torch:
        command.append("--no-torch")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a GPU box
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["environment"]["jax_backend"] == "cpu"
    results = {r["name"]: r for r in report["results"]}
    expected = [n for n in TRAIN if has_torch or not n.endswith("/torch")] + OTHER
    assert sorted(results) == sorted(expected)
    for name in expected:
        assert "error" not in results[name], results[name]
    for name in TRAIN:
        if name in results:
            r = results[name]
            assert r["images_per_s"] > 0 and r["batch"] == 2 and r["crop"] == 65, r
            assert r["first_loss"] == r["first_loss"], r  # not NaN
    assert results["stage2/float32/jax"]["features_s_per_image"] > 0
    assert results["eval_msf_crf/float32/jax"]["crf"] and not results["eval_single_scale/float32/jax"]["crf"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| stage1 | float32 | vgg_tiny | 2 x 65 |" in table and "stage 2 features" in table
    assert "Not measured" not in table
