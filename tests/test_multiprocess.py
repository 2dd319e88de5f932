"""Two real JAX processes (coordinator on 127.0.0.1, gloo CPU collectives, 4 simulated devices
each) against one process with 8: `bana stage1` for a few steps and `bana stage2` on the synthetic
set must give what one process gives. The two processes read the records `bana prepare` wrote
(data.source=tfds, each host its own rows through grain), the one process the generator itself.

- stage 1 (the two processes in two pieces, the second resuming from their checkpoint): the same
  losses and, within float tolerance, the same trained labeler; the two-process train checkpoint
  is restorable by one process and equals the one-process checkpoint.
- stage 2 (both runs label with the one-process labeler, so any difference is the host split's):
  the union of the hosts' PNGs is byte-identical, the summed confusion matrices equal.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess_worker.py"
STEPS = 6
TIMEOUT = 300  # seconds per launch; a hung collective (a peer died) must not hang CI
# Variables that would make a worker join some other cluster than the one the test starts.
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                     "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_dir() -> str:
    # The compilation cache tests/test_stage1.py uses: reruns compile nothing.
    return os.environ.get("BANA_TEST_JAX_CACHE",
                          str(Path(tempfile.gettempdir()) / "bana_jax_test_jax_cache"))


DATA = ["--config.data.synthetic_size=48", "--config.data.synthetic_images=16"]


def commands(workdir: Path, labeler_workdir: Path, prepared: Path | None = None,
             pieces: tuple[int, ...] = (STEPS,)) -> list[str]:
    """`bana stage1 ... [--then bana stage1 ...] --then bana stage2 ...` for the worker, tiny
    sizes. `prepared`: read the records `bana prepare` wrote there (data.source=tfds) instead of
    the generator. `pieces`: stage 1 runs to each of these steps in turn, resuming each time (the
    learning rate is constant before the demo's step boundary, so pieces do not change it)."""
    common = DATA + ["--config.train.progress_bar=false", f"--config.train.compilation_cache={cache_dir()}"]
    if prepared is not None:
        common += ["--config.data.source=tfds", f"--config.data.prepared_dir={prepared}"]
    out = []
    for steps in pieces:
        out += ["stage1", f"--config={REPO / 'configs/demo/stage1.py'}", f"--workdir={workdir / 'stage1'}",
                "--config.data.crop_size=48", f"--config.train.num_steps={steps}",
                "--config.eval.max_images=4", f"--config.train.log_every={STEPS // 2}",
                # The plain trunk: after 6 steps its labels show foreground (the demo's BatchNorm
                # trunk's are background only), so stage 2 has something to get wrong.
                "--config.model.vgg_norm=none"] + common + ["--then"]
    stage2 = ["stage2", f"--config={REPO / 'configs/demo/stage2.py'}", f"--workdir={workdir / 'stage2'}",
              f"--config.pseudo.stage1_workdir={labeler_workdir / 'stage1'}",
              "--config.pseudo.save_visualisations=false", "--config.pseudo.baselines=box_fill"] + common
    return out + stage2


def launch(args: list[str], devices: int, process_id: int | None = None, processes: int = 1,
           port: int | None = None, log: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(REPO))
    if process_id is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log} (exit {proc.returncode}):\n{log.read_text()[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from bana_jax import cli

    root = tmp_path_factory.mktemp("multiprocess")
    single, multi, prepared = root / "single", root / "multi", root / "prepared"
    # The two processes read prepared records (as a cluster would), the one process the generator.
    assert cli.main(["prepare", f"--config={REPO / 'configs/demo/stage1.py'}", f"--workdir={prepared}"] + DATA) == 0
    logs = [root / "single.log"]
    wait_all([launch(commands(single, single), devices=8, log=logs[0])], logs)
    port = free_port()
    logs = [root / f"multi{i}.log" for i in range(2)]
    # Stage 1 in two pieces: the second resumes from the two-process checkpoint, each process
    # from its own data position.
    wait_all([launch(commands(multi, single, prepared, pieces=(STEPS // 2, STEPS)), devices=4,
                     process_id=i, processes=2, port=port, log=logs[i]) for i in range(2)], logs)
    return single, multi, root


def test_two_processes_really_ran(runs):
    _, multi, root = runs
    for i in range(2):
        text = (root / f"multi{i}.log").read_text()
        assert "Connecting to JAX distributed service on 127.0.0.1" in text, text[-3000:]
    stored = json.loads((multi / "stage1" / "config.json").read_text())
    assert stored["data"]["source"] == "tfds"
    assert f"at step {STEPS // 2}" in (root / "multi0.log").read_text()  # the second piece resumed


def assert_close(got, want, tolerance: float = 1e-4) -> None:
    """Equal up to float summation order: the gradient all-reduce adds in another order over two
    processes, and 6 SGD steps carry that on (measured: relative norm differences 3e-8 to 3e-5,
    the largest in conv1_1 on Caffe-range pixels). A different batch, order of rows or dropout mask
    differs by about the update itself, 1e-2 and up."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.linalg.norm(want), 1e-12)
    assert np.linalg.norm(got - want) <= tolerance * scale, (np.linalg.norm(got - want) / scale)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "stage1" / "metrics.jsonl").read_text().splitlines()]


def test_stage1_losses_and_labeler_match(runs):
    from bana_jax import artifacts

    single, multi, _ = runs
    a, b = metrics(single), metrics(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [STEPS // 2, STEPS]
    for ra, rb in zip(a, b):
        for key in ("loss", "accuracy", "fg_accuracy", "bg_accuracy"):
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=key)
    # The exported labelers, restored by this (single) process.
    la, lb = (jax.device_get(artifacts.load_model(w / "stage1", "labeler")) for w in (single, multi))
    from flax import nnx
    pa, pb = (nnx.to_pure_dict(nnx.state(m, nnx.Param)) for m in (la, lb))
    flat_a, flat_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(flat_a) == len(flat_b) > 10
    for x, y in zip(flat_a, flat_b):
        assert_close(y, x)
    # Same stage-1 summary: box accuracy over the same images (each process evaluates them all).
    sa, sb = (json.loads((w / "stage1" / "stage1_summary.json").read_text()) for w in (single, multi))
    assert sa["box_accuracy"]["num_boxes"] == sb["box_accuracy"]["num_boxes"] > 0


def restore_state(workdir: Path, step: int):
    """The train state of a checkpoint, restored by this one process onto one device."""
    import orbax.checkpoint as ocp

    path = workdir / "stage1" / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.device_get(checkpointer.restore(path, target))


def test_two_process_checkpoint_restores_in_one_process(runs):
    single, multi, _ = runs
    a, b = restore_state(single, STEPS), restore_state(multi, STEPS)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if np.issubdtype(np.asarray(x).dtype, np.floating):
            assert_close(y, x)
        else:
            np.testing.assert_array_equal(y, x)
    # One data position per process (a two-process resume restores its own).
    data = json.loads((multi / "stage1" / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
    assert len(data["processes"]) == 2


def test_stage2_pngs_and_confusion_matrices_match(runs):
    single, multi, _ = runs
    for kind in ("Y_crf", "Y_ret"):
        da, db = (w / "stage2" / "pseudo_labels" / kind for w in (single, multi))
        names = sorted(p.name for p in da.glob("*.png"))
        assert len(names) == 16
        assert sorted(p.name for p in db.glob("*.png")) == names, kind
        for name in names:
            assert (da / name).read_bytes() == (db / name).read_bytes(), f"{kind}/{name}"
    sa, sb = (json.loads((w / "stage2" / "pseudo_labels" / "summary.json").read_text()) for w in (single, multi))
    assert sa["images"] == sb["images"] == 16 and sb["computed"] == 16
    assert sa["confusion"] and sb["confusion"] == sa["confusion"]
    assert sb["miou"] == sa["miou"]
    # Not a trivial agreement: foreground in Y_crf, and Y_ret differs from it somewhere.
    assert np.asarray(sa["confusion"]["y_crf"])[:, 1:].sum() > 0
    assert sa["agreement_fraction"] < 1
    assert "host 0 of 2" in sb["timing_scope"] and "host 0 of 1" in sa["timing_scope"]
