"""The `bana` command line: override syntax, errors naming the field, help, dispatch."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bana_jax import cli

REPO = Path(__file__).resolve().parents[1]
VOC_STAGE1 = str(REPO / "configs" / "voc" / "stage1.py")
VOC_STAGE2 = str(REPO / "configs" / "voc" / "stage2.py")


def test_print_config_with_overrides_both_syntaxes(capsys, tmp_path):
    code = cli.main(["stage1", f"--config={VOC_STAGE1}", "--workdir", str(tmp_path),
                     "--config.train.num_steps=5", "--config.optim.lr", "0.25",
                     "--config.data.flip=false", "--print-config"])
    out = capsys.readouterr().out
    assert code == 0
    assert "num_steps: 5" in out and "lr: 0.25" in out and "flip: false" in out


def test_unknown_field_fails_before_running(capsys, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(cli, "resolve_command", lambda command: called.append(command))
    code = cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={tmp_path}",
                     "--config.train.num_step=5"])
    err = capsys.readouterr().err
    assert code == 2 and not called
    assert "unknown config field 'train.num_step'" in err and "'train.num_steps'" in err


def test_wrong_type_fails_naming_the_field(capsys, tmp_path):
    code = cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={tmp_path}",
                     "--config.data.batch_size=big"])
    err = capsys.readouterr().err
    assert code == 2 and "--config.data.batch_size='big': expected an integer" in err


def test_missing_value_and_missing_required_flags(capsys, tmp_path):
    assert cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={tmp_path}",
                     "--config.train.seed"]) == 2
    assert "needs a value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["stage1", f"--config={VOC_STAGE1}"])  # no --workdir
    assert exit_info.value.code == 2
    assert "--workdir" in capsys.readouterr().err


def test_help_lists_subcommands_and_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "stage1", "stage2", "stage3", "evaluate", "evaluate-cams",
                 "compare-torch"):
        assert name in out
    with pytest.raises(SystemExit):
        cli.main(["stage3", "--help"])
    out = capsys.readouterr().out
    assert "--config" in out and "--workdir" in out and "--shrink" in out
    assert "--config.GROUP.FIELD=VALUE" in out


def test_missing_implementation_fails_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "stage1", ("bana_jax._not_written_yet", "x"))
    code = cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'bana stage1' is not implemented yet" in err and "bana_jax._not_written_yet" in err


def test_dispatch_passes_resolved_config_and_workdir(tmp_path, monkeypatch):
    received = {}
    fake = types.ModuleType("bana_jax._fake_stage")
    fake.main = lambda config, workdir: received.update(config=config, workdir=workdir)
    monkeypatch.setitem(sys.modules, "bana_jax._fake_stage", fake)
    monkeypatch.setitem(cli.SUBCOMMANDS, "stage2", ("bana_jax._fake_stage", "x"))
    code = cli.main(["stage2", f"--config={VOC_STAGE1}", f"--workdir={tmp_path}", "--shrink",
                     "--config.train.seed=3"])
    assert code == 0
    assert received["workdir"] == str(tmp_path)
    assert received["config"].train.seed == 3
    assert received["config"].train.num_steps == 30  # shrunk
    assert received["config"].is_locked


def test_demo_has_default_config_and_workdir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the packaged configs, not ./configs
    assert cli.main(["demo", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: vgg_tiny" in out and "synthetic" in out


def test_config_by_packaged_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["stage2", "--config=voc/stage2.py", "--workdir=w", "--print-config"]) == 0
    assert "bi_xy_std: 55.0" in capsys.readouterr().out
    assert cli.main(["stage2", "--config=voc/stage9.py", "--workdir=w"]) == 2
    err = capsys.readouterr().err
    assert "bana stage2: error: config file 'voc/stage9.py' does not exist" in err and "voc/stage2.py" in err


def test_compare_torch_takes_its_own_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare-torch", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--arch" in out and "--checkpoint" in out


def test_a_run_off_a_terminal_logs_steps_resume_and_summary(tmp_path):
    """stderr to a file (nohup, SLURM): step lines, 'resumed', and the final summary appear; they
    used to be swallowed because importing orbax had configured logging at WARNING first."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "bana_jax.cli", "stage1", "--config=configs/demo/stage1.py", "--shrink",
               f"--workdir={workdir}", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
               f"--config.train.compilation_cache={tmp_path / 'jax_cache'}"]
    logs = []
    for steps in (2, 3):  # the second run resumes from the first one's checkpoint
        log = tmp_path / f"stderr_{steps}.txt"
        with open(log, "w") as stderr:
            subprocess.run(command + [f"--config.train.num_steps={steps}"], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=stderr, check=True, timeout=600)
        logs.append(log.read_text())
    assert re.search(r"step 1/2 loss [\d.]+ lr [\d.e+-]+ [\d.]+ img/s ETA", logs[0]), logs[0][-2000:]
    assert "step 2/2" in logs[0] and "classification accuracy on ground-truth boxes" in logs[0]
    assert re.search(r"resumed from .* at step 2", logs[1]) and "step 3/3" in logs[1], logs[1][-2000:]
    assert "\r" not in logs[0] + logs[1]  # no progress bar off a terminal


def test_rerun_with_a_config_that_changes_the_result_stops_before_writing(tmp_path, capsys, monkeypatch):
    """A finished BAP workdir re-run with GAP used to exit 0 and rewrite config.json to say GAP
    beside the BAP weights."""
    calls = []
    monkeypatch.setattr(cli, "resolve_command", lambda name: lambda config, workdir: calls.append(config))
    workdir = tmp_path / "run"
    workdir.mkdir()
    stored = cli.resolve_config(VOC_STAGE1, [], False).to_json_best_effort(indent=2)
    (workdir / "config.json").write_text(stored)
    base = ["stage1", f"--config={VOC_STAGE1}", f"--workdir={workdir}"]
    assert cli.main(base + ["--config.loss.pooling=gap", "--config.optim.lr=0.5",
                            "--config.train.num_steps=10"]) == 2
    err = capsys.readouterr().err
    assert "loss.pooling: 'bap' -> 'gap'" in err and "optim.lr: 0.001 -> 0.5" in err
    assert "train.num_steps" not in err and "--force" in err
    assert calls == [] and (workdir / "config.json").read_text() == stored
    # Fields that do not change the result may change; --force resumes anyway.
    assert cli.main(base + ["--config.train.num_steps=10", "--config.train.log_every=1"]) == 0
    assert cli.main(base + ["--config.loss.pooling=gap", "--force"]) == 0
    assert [c.loss.pooling for c in calls] == ["bap", "gap"]


def test_stage2_rerun_with_other_crf_settings_stops(tmp_path, capsys, monkeypatch):
    """A resumed stage 2 labels only its unfinished images: with other CRF settings it used to mix
    two label sets in one folder, silently."""
    calls = []
    monkeypatch.setattr(cli, "resolve_command", lambda name: lambda config, workdir: calls.append(config))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(cli.resolve_config(VOC_STAGE2, [], False).to_json_best_effort())
    base = ["stage2", f"--config={VOC_STAGE2}", f"--workdir={workdir}"]
    assert cli.main(base + ["--config.crf.bi_w=5", "--config.pseudo.save_visualisations=false"]) == 2
    err = capsys.readouterr().err
    assert "crf.bi_w: 4.0 -> 5.0" in err and "save_visualisations" not in err and calls == []
    assert cli.main(base + ["--config.pseudo.save_visualisations=false"]) == 0 and len(calls) == 1
    # Fields stage 2 does not read (a workdir written when its configs still set them) may differ.
    assert cli.main(base + ["--config.model.init=none", "--config.data.split=val", "--config.optim.lr=0.5"]) == 0


def test_unwritable_workdir_stops_at_start(tmp_path, capsys, monkeypatch):
    """It used to fail with an OSError traceback from jax_cache, or at the first save."""
    calls = []
    monkeypatch.setattr(cli, "resolve_command", lambda name: lambda config, workdir: calls.append(config))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"bana stage1: error: cannot write to --workdir={blocker / 'run'}" in err and calls == []


@pytest.mark.parametrize("error", ["data", "disk", "diverged"])
def test_bad_data_disk_and_divergence_end_in_one_line(error, tmp_path, capsys, monkeypatch):
    from bana_jax.data.common import DataError

    raised = {"data": DataError(tmp_path / "broken.jpg", "cannot decode the image"),
              "disk": OSError(28, "No space left on device", str(tmp_path / "run" / "metrics.jsonl")),
              "diverged": FloatingPointError("loss is nan at step 10")}[error]

    def fails(config, workdir):
        raise raised

    monkeypatch.setattr(cli, "resolve_command", lambda name: fails)
    assert cli.main(["stage1", f"--config={VOC_STAGE1}", f"--workdir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"bana stage1: error: {raised}" and "Traceback" not in err


def test_unwritable_compilation_cache_is_turned_off_with_a_warning(tmp_path, caplog):
    from bana_jax.train.loop import configure_compilation_cache

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level("WARNING"):
        assert configure_compilation_cache(str(blocker / "cache"), tmp_path) is None
    assert f"cannot write to {blocker / 'cache'}" in caplog.text
