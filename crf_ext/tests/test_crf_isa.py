"""The core built per instruction-set level: every level this CPU runs gives the same bits, through
both APIs, and CRF_EXT_ISA picks the level. A level the CPU lacks shows as skipped, with why."""

import os
import subprocess
import sys

import numpy as np
import pytest
from photos import load_photo

import crf_ext
from crf_ext import _isa, api, densecrf

BASELINE = _isa.runnable_levels()[-1]  # the lowest level built and runnable here
OTHER_LEVELS = [level for level in _isa.LEVELS if level != BASELINE]


def level_or_skip(level):
    if level not in _isa.built_levels():
        pytest.skip(f"level {level} is not built in this installation")
    if level not in _isa.runnable_levels():
        pytest.skip(f"this CPU cannot run level {level}")
    return _isa.load(level)


def workload(seed=0):
    """Outputs of every code path: dense_crf for label counts with each row layout (1 and 2 labels
    take pydensecrf's other slicing, 3-24 fixed strides, 30 a run-time stride), dense_crf_batch,
    the DenseCRF API with free-form features of 3 and 7 dimensions and every normalisation,
    stepInference and klDivergence."""
    rng = np.random.default_rng(seed)
    image = np.ascontiguousarray(load_photo("000000000009")[120:200, 240:350])
    height, width = image.shape[:2]
    outputs = {}
    for n_labels in (1, 2, 3, 5, 8, 10, 21, 30):
        probs = rng.dirichlet(np.ones(n_labels), (height, width)).transpose(2, 0, 1).astype(np.float32)
        outputs[f"dense_crf C={n_labels}"] = crf_ext.dense_crf(image, probs, num_threads=2)
    probs = rng.dirichlet(np.ones(4), (height, width)).transpose(2, 0, 1)
    outputs["dense_crf_batch"] = np.concatenate(
        crf_ext.dense_crf_batch([image, image[:40]], [probs, probs[:, :40]], num_threads=2), axis=1)
    n_points = height * width
    unary = -np.log(rng.dirichlet(np.ones(6), n_points).T).astype(np.float32)
    features3 = np.concatenate([np.stack(np.mgrid[0:height, 0:width], 0).reshape(2, -1) / 5.0,
                                image[..., :1].reshape(1, -1) / 10.0])
    features7 = rng.normal(scale=2.0, size=(7, n_points))
    for normalization in range(4):
        crf = crf_ext.DenseCRF(n_points, 6)
        crf.setUnaryEnergy(unary)
        crf.addPairwiseEnergy(features3, compat=rng.uniform(1, 4, 6), normalization=normalization)
        crf.addPairwiseEnergy(features7, compat=rng.uniform(-1, 3, (6, 6)), normalization=normalization)
        q, tmp1, tmp2 = crf.startInference()
        crf.stepInference(q, tmp1, tmp2)
        crf.stepInference(q, tmp1, tmp2)
        outputs[f"DenseCRF normalization={normalization}"] = q
        outputs[f"klDivergence normalization={normalization}"] = np.array([crf.klDivergence(q)])
    crf = crf_ext.DenseCRF2D(width, height, 6)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=10, rgbim=image, compat=5)
    outputs["DenseCRF2D"] = crf.inference(5)
    return outputs


def on_level(monkeypatch, module):
    """Runs crf_ext's Python layer on `module` (a level's core) for the rest of the test."""
    monkeypatch.setattr(api, "_core", module)
    monkeypatch.setattr(densecrf, "_core", module)


@pytest.fixture(scope="module")
def baseline_outputs():
    with pytest.MonkeyPatch.context() as monkeypatch:
        on_level(monkeypatch, _isa.load(BASELINE))
        return workload()


@pytest.mark.parametrize("level", OTHER_LEVELS)
def test_every_level_gives_the_baseline_bits(level, baseline_outputs, monkeypatch):
    module = level_or_skip(level)
    assert module.isa == level
    on_level(monkeypatch, module)
    outputs = workload()
    for name, expected in baseline_outputs.items():
        got = outputs[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), f"{name}: {level} differs from {BASELINE}"


def test_the_highest_runnable_level_is_the_default():
    if os.environ.get(_isa.ENV):
        pytest.skip(f"{_isa.ENV} is set")
    assert crf_ext.isa == crf_ext.isa_levels()[0]
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        # The wheel's levels, against what the kernel reports for this CPU.
        assert ("sse4.2" in crf_ext.isa_levels()) == ("sse4_2" in flags and "popcnt" in flags)
        assert ("avx2" in crf_ext.isa_levels()) == ("avx2" in flags and "fma" in flags and "bmi2" in flags)
        assert ("avx512" in crf_ext.isa_levels()) == all(
            f"avx512{x}" in flags for x in ("f", "bw", "cd", "dq", "vl"))


def run_with_level(level):
    code = ("import sys, numpy as np, crf_ext; from photos import load_photo\n"
            "image = np.ascontiguousarray(load_photo('000000000030')[:90, :120])\n"
            "probs = np.random.default_rng(0).dirichlet(np.ones(5), (90, 120)).transpose(2, 0, 1)\n"
            "sys.stdout.write(crf_ext.isa + ' ' + crf_ext.dense_crf(image, probs).tobytes().hex())")
    env = dict(os.environ, **{_isa.ENV: level})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__))


def test_the_environment_variable_forces_each_level():
    results = {}
    for level in _isa.runnable_levels():
        run = run_with_level(level)
        assert run.returncode == 0, run.stderr
        name, data = run.stdout.split()
        assert name == level
        results[level] = data
    assert len(set(results.values())) == 1, f"levels differ: {sorted(results)}"


@pytest.mark.parametrize("level, message", [
    ("avx1024", "unknown instruction-set level 'avx1024'"),
    ("native", "level 'native' is not built"),
])
def test_a_level_that_cannot_run_is_a_clear_import_error(level, message):
    if level in _isa.built_levels():
        pytest.skip(f"{level} is built here")
    run = run_with_level(level)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and message in run.stderr, run.stderr
