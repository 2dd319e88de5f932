"""train_loop on a toy NNX conv net with 8 simulated CPU devices: sharding, learning, resume."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from bana_jax.train import mesh as mesh_lib
from bana_jax.config import base_config, validate_config
from bana_jax.train.loop import train_loop
from bana_jax.train.optim import make_optimizer
from bana_jax.train.state import create_train_state, jit_train_step, label_tree, make_train_step

BATCH = 8
SIZE = 8
CLASSES = 3


class ToyNet(nnx.Module):
    """conv -> BatchNorm -> ReLU -> dropout -> global average -> linear classifier."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed, dropout=seed + 1)
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(8, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = self.drop(jax.nn.relu(self.bn(self.conv(x))))
        return self.head(h.mean(axis=(1, 2)))


TOY_LABELS = {
    "conv": {"kernel": "pretrained_weight", "bias": "pretrained_bias"},
    "bn": {"scale": "pretrained_weight", "bias": "pretrained_bias"},
    "head": {"kernel": "new_weight", "bias": "new_bias"},
}


def toy_loss(model, batch, step):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = (logits.argmax(-1) == batch["label"]).mean()
    return loss, {"accuracy": accuracy}


def toy_batch(index: int) -> dict:
    """Batch `index` of a deterministic stream: the class is the brightest colour channel."""
    rng = np.random.default_rng(1000 + index)
    label = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    image = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
    image[np.arange(BATCH), :, :, label] += 1.5
    return {"image": image, "label": label}


class ToyIterator:
    """In-memory iterator with a grain-like position; optionally crashes after `fail_after`."""

    def __init__(self, fail_after: int | None = None):
        self.position = 0
        self.fail_after = fail_after
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_after is not None and self.served >= self.fail_after:
            raise RuntimeError("simulated crash")
        batch = toy_batch(self.position)
        self.position += 1
        self.served += 1
        return batch

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


def toy_config(cache_dir, num_steps, **train):
    config = base_config()
    config.data.batch_size = BATCH
    config.optim.lr = 0.05
    config.optim.schedule = "step"
    config.optim.step_boundaries = (max(1, num_steps - 2),)
    config.train.num_steps = num_steps
    config.train.log_every = 2
    config.train.checkpoint_every = 4
    config.train.keep_checkpoints = 2
    config.train.compilation_cache = cache_dir
    config.train.progress_bar = False
    for key, value in train.items():
        config.train[key] = value
    return validate_config(config)


def test_sharded_step_equals_single_device_step(cache_dir):
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    config = toy_config(cache_dir, 4)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = mesh_lib.make_data_mesh(devices)
        model = ToyNet()
        params = nnx.state(model, nnx.Param)
        tx, _ = make_optimizer(config.optim, 4, label_tree(params, TOY_LABELS))
        graphdef, rng_template, state = create_train_state(model, tx, seed=0)
        state = mesh_lib.replicate(state, mesh)
        step = jit_train_step(make_train_step(graphdef, rng_template, tx, toy_loss), mesh,
                              donate=False)
        losses = []
        for index in range(3):
            batch = mesh_lib.shard_batch(toy_batch(index), mesh)
            assert len(batch["image"].sharding.device_set) == len(devices)
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((jax.device_get(state), losses))
    (single, single_losses), (sharded, sharded_losses) = results
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 sharded.params, single.params)
    # BatchNorm statistics: the global batch in both cases.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 sharded.model_state, single.model_state)
    assert int(sharded.step) == 3


def test_loss_falls_and_metrics_are_logged(cache_dir, tmp_path):
    config = toy_config(cache_dir, 40, log_every=5, checkpoint_every=0)
    result = train_loop(config, tmp_path, ToyNet(), toy_loss, ToyIterator(), TOY_LABELS)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    for key in ("loss", "accuracy", "lr", "images_per_s", "eta_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["loss"] < 0.6 * records[0]["loss"], [r["loss"] for r in records]
    assert records[0]["lr"] == pytest.approx(0.05) and records[-1]["lr"] == pytest.approx(0.005)
    assert int(result.state.step) == 40
    assert (tmp_path / "train_done.json").exists()
    # checkpoint_every=0: only the final step is saved.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["40"]


def test_interrupted_run_resumes_bitwise(cache_dir, tmp_path):
    num_steps = 12
    config = toy_config(cache_dir, num_steps)
    full = train_loop(config, tmp_path / "full", ToyNet(), toy_loss, ToyIterator(), TOY_LABELS)
    assert full.resumed_from is None
    # Last 2 checkpoints kept.
    assert sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()) == [8, 12]

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(config, tmp_path / "split", ToyNet(), toy_loss, ToyIterator(fail_after=10),
                   TOY_LABELS)
    # A fresh process would rebuild model and iterator from scratch (different init seed here:
    # the restored checkpoint must override it).
    iterator = ToyIterator()
    resumed = train_loop(config, tmp_path / "split", ToyNet(seed=7), toy_loss, iterator,
                         TOY_LABELS)
    assert resumed.resumed_from == 8
    assert iterator.served == 4 and iterator.position == 12

    full_state, resumed_state = jax.device_get(full.state), jax.device_get(resumed.state)
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(a, b)
    assert int(resumed_state.step) == num_steps


def test_batch_size_must_split_over_devices(cache_dir, tmp_path):
    config = toy_config(cache_dir, 2)
    with config.unlocked():
        config.data.batch_size = 12
    with pytest.raises(ValueError, match="data.batch_size=12"):
        train_loop(config, tmp_path, ToyNet(), toy_loss, ToyIterator(), TOY_LABELS)


def test_a_resumed_metric_logger_drops_the_records_it_will_log_again(tmp_path):
    """A run killed after logging step 15 resumes from its checkpoint at step 10 and logs 15 again:
    the file used to hold step 15 twice (and a torn last line broke every JSONL reader)."""
    from bana_jax.train import metrics_log
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (5, 10, 15))
                    + '{"step": 20, "lo')
    log = metrics_log.MetricLogger(tmp_path, total_steps=30, initial_step=10, progress_bar=False)
    log.write(15, {"loss": 0.5})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15] and records[-1]["loss"] == 0.5
    untouched = path.read_text()
    metrics_log.MetricLogger(tmp_path, total_steps=30, initial_step=15, progress_bar=False).close()
    assert path.read_text() == untouched


def test_metric_logger_jsonl_rates_and_eta(tmp_path, monkeypatch):
    from bana_jax.train import metrics_log
    clock = iter([100.0, 102.0, 106.0, 200.0, 201.0])
    monkeypatch.setattr(metrics_log.time, "perf_counter", lambda: next(clock))
    log = metrics_log.MetricLogger(tmp_path, total_steps=100, initial_step=10,
                                   tensorboard=True, progress_bar=True)
    first = log.write(20, {"loss": 2.0, "lr": 0.1}, images=40)   # 10 steps in 2 s
    second = log.write(25, {"loss": 1.0, "lr": 0.1}, images=20)  # 5 steps in 4 s
    log.close()
    assert first["images_per_s"] == pytest.approx(20.0) and first["eta_s"] == pytest.approx(16.0)
    assert second["images_per_s"] == pytest.approx(5.0) and second["eta_s"] == pytest.approx(60.0)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [20, 25] and lines[1]["loss"] == 1.0
    assert metrics_log.format_seconds(3725) == "1:02:05"
    disabled = metrics_log.MetricLogger(tmp_path / "other", 10, 0, enabled=False)
    disabled.write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()


FULL_DISK_RUN = """
import json, resource, sys
sys.path.insert(0, {tests!r})
from test_train_loop import TOY_LABELS, ToyIterator, ToyNet, toy_config, toy_loss
from bana_jax.train.loop import train_loop


class FillsTheDisk(ToyIterator):
    def __next__(self):
        if self.served == 1:  # no file may grow any more (EFBIG): the save at step 10 fails
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        return super().__next__()


iterator = FillsTheDisk()
try:
    train_loop(toy_config("", 40, checkpoint_every=10, log_every=100), {workdir!r}, ToyNet(), toy_loss,
               iterator, TOY_LABELS)
except OSError as err:
    print(json.dumps({{"error": str(err), "served": iterator.served}}))
"""


def test_a_failed_save_stops_the_run_at_once_naming_the_folder(tmp_path):
    """orbax saves in the background; a failed save used to surface only at the next save (step
    20 here), every step in between trained for nothing. The disk is 'full' (RLIMIT_FSIZE, in a
    child process) from the first save on."""
    import subprocess
    import sys
    from pathlib import Path

    script = FULL_DISK_RUN.format(tests=str(Path(__file__).parent), workdir=str(tmp_path / "run"))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert f"saving a checkpoint under {tmp_path / 'run' / 'checkpoints'} failed" in report["error"]
    assert report["served"] < 15  # of 40 steps
