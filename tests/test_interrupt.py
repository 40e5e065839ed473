"""Interrupt and resume, divergence, run status, and the quality-of-life flags."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import kdcli.train as train_module
from conftest import one_line_error, kdcli, REPO
from kdcli import runs
from kdcli.cli import app
from kdcli.config import make_config
from kdcli.train import Hooks, run_training

runner = CliRunner()


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


# --- Ctrl-C and SIGTERM in a real process ------------------------------------------

SLOW = {"hidden": [32], "epochs": 20, "batch_size": 50, "train_limit": 600, "jitter": 0, "dropout_input": 0.0,
        "dropout_hidden": 0.0, "max_norm": None, "device": "cpu"}
# the real CLI, with a pause after each epoch's save, so that on any machine
# the signal arrives while the run still has epochs to go. SIGINT gets Python's
# usual handler back: a test suite started in the background by a script
# (`make test &`) inherits SIGINT ignored, unlike a user at a terminal.
PAUSING_CLI = """
import signal
import time
signal.signal(signal.SIGINT, signal.default_int_handler)
import kdcli.runs as runs
save = runs.save_checkpoint
def save_then_pause(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(0.3)
runs.save_checkpoint = save_then_pause
from kdcli.cli import main
main()
"""


def interrupt_a_real_run(tmp_path, synthetic_dir, signum):
    """Start `kdcli train-teacher` in a process, send `signum` once an epoch is saved; (returncode, stderr, run_dir)."""
    experiment = tmp_path / "slow.yaml"
    experiment.write_text(json.dumps({**SLOW, "data_dir": str(synthetic_dir)}))  # JSON is YAML
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "KDCLI_DATA_DIR"}
    process = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, "train-teacher", "-c", str(experiment), "--out", str(run_dir)],
                               cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / "resume.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr, run_dir


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_cleanly_and_resume_finishes_like_an_uninterrupted_run(tmp_path, synthetic_dir, signum):
    code, stderr, run_dir = interrupt_a_real_run(tmp_path, synthetic_dir, signum)
    assert code == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "continue with: kdcli train-teacher" in lines[0] and lines[0].endswith("--resume")
    assert runs.run_status(run_dir) == "interrupted"
    saved = torch.load(run_dir / "resume.pt", weights_only=True)["train_state"]
    assert 1 <= saved["epoch"] < SLOW["epochs"]

    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[0] == "kdcli"
    resumed = runner.invoke(app, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert runs.run_status(run_dir) == "finished"

    full = make_config({**SLOW, "data_dir": str(synthetic_dir), "out": str(tmp_path / "full")})
    run_training(full, "train-teacher")
    a, b = weights(run_dir / "model.pt"), weights(tmp_path / "full" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run_dir / "result.json").read_text())["test"] == \
        json.loads((tmp_path / "full" / "result.json").read_text())["test"]


def test_interrupt_before_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, synthetic_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "fit", interrupted)
    result = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "8", "--out", tmp_path / "run")
    assert "nothing to resume yet" in one_line_error(result, 130)
    assert runs.run_status(tmp_path / "run") == "incomplete"
    assert not (tmp_path / "run" / "resume.pt").exists()
    # and the next attempt is not refused: there was nothing to lose
    monkeypatch.undo()
    assert kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "8", "--epochs", "1", "--device", "cpu",
                 "--out", tmp_path / "run").exit_code == 0


def test_resume_restores_python_and_numpy_random_states(synthetic_dir, tmp_path):
    """An extension drawing from `random` and `np.random` sees the same numbers after a resume."""
    cfg = dict(data_dir=str(synthetic_dir), hidden=[8], epochs=4, batch_size=100, device="cpu")

    def drawing(draws, stop_at=None):
        def on_epoch(record):
            if record["epoch"] == stop_at:
                raise KeyboardInterrupt
            draws.append((record["epoch"], random.random(), float(np.random.rand())))
        return Hooks(on_epoch=on_epoch)

    full = []
    run_training(make_config({**cfg, "out": str(tmp_path / "full")}), "train-teacher", drawing(full))
    cut_cfg = make_config({**cfg, "out": str(tmp_path / "cut")})
    cut = []
    with pytest.raises(KeyboardInterrupt):
        run_training(cut_cfg, "train-teacher", drawing(cut, stop_at=3))
    random.seed(12345)  # anything the process did in between must not matter
    np.random.seed(12345)
    run_training(cut_cfg, "train-teacher", drawing(cut), resume=True)
    assert cut == full
    state = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    assert "train_state" not in state  # the final checkpoint is weights + architecture + config only


# --- a loss that becomes NaN ----------------------------------------------------------

def test_nan_loss_stops_with_epoch_step_and_hint_keeping_the_last_good_epoch(synthetic_dir, tmp_path, monkeypatch):
    real_loss, calls = train_module.distillation_loss, []
    steps_per_epoch = 600 // 100

    def loss_turning_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == steps_per_epoch + 3 else loss

    monkeypatch.setattr(train_module, "distillation_loss", loss_turning_nan)
    run_dir = tmp_path / "run"
    result = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "8", "--epochs", "3", "--batch-size", "100",
                   "--lr", "0.07", "--device", "cpu", "--out", run_dir)
    line = one_line_error(result, 1)
    assert "epoch 2, step 3" in line and "--lr (it was 0.07)" in line and "epoch 1 is kept" in line
    assert torch.load(run_dir / "resume.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert runs.run_status(run_dir) == "failed"
    assert "NaN" in runs.read_status(run_dir)["error"]
    assert "--force" in one_line_error(kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "8",
                                             "--out", run_dir), 2)


def test_a_network_that_died_stops_with_one_line_keeping_the_last_good_epoch(synthetic_dir, tmp_path, monkeypatch):
    # the detection itself is tested on a really dead network in test_train.py; here, what the user sees
    real_check, epochs_checked = train_module.dead_members, []

    def dies_in_epoch_2(logits):
        epochs_checked.append(1)
        return [0] if len(epochs_checked) == 2 else real_check(logits)

    monkeypatch.setattr(train_module, "dead_members", dies_in_epoch_2)
    run_dir = tmp_path / "run"
    result = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "8", "--epochs", "3", "--batch-size", "100",
                   "--lr", "0.07", "--device", "cpu", "--out", run_dir)
    line = one_line_error(result, 1)
    assert "the network died" in line and "epoch 2" in line and "--lr (it was 0.07)" in line and "epoch 1 is kept" in line
    assert torch.load(run_dir / "resume.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert "died" in runs.read_status(run_dir)["error"]


# --- kdcli runs ---------------------------------------------------------------------

def test_runs_table_shows_every_status(synthetic_dir, tmp_path, monkeypatch):
    base = dict(data_dir=str(synthetic_dir), hidden=[8], epochs=2, batch_size=100, device="cpu")
    run_training(make_config({**base, "out": str(tmp_path / "a-finished"), "seed": 7}), "train-teacher")

    def stop(record):
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(make_config({**base, "epochs": 5, "out": str(tmp_path / "b-interrupted")}), "train-teacher",
                     Hooks(on_epoch=stop))
    (tmp_path / "c-incomplete").mkdir()
    (tmp_path / "c-incomplete" / "config.yaml").write_text("hidden: [8]\n")
    (tmp_path / "d-running").mkdir()
    runs.write_json(tmp_path / "d-running" / "status.json", {"state": "running", "pid": os.getppid(), "command": "distill"})
    (tmp_path / "e-killed").mkdir()
    runs.write_json(tmp_path / "e-killed" / "status.json", {"state": "running", "pid": 2**22 + 1, "command": "distill"})

    monkeypatch.setenv("COLUMNS", "200")
    result = kdcli("runs", tmp_path)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "finished" in rows["a-finished"] and "train-teacher" in rows["a-finished"] and " 7 " in rows["a-finished"]
    assert "interrupted 2/5" in rows["b-interrupted"]  # epoch 3 was logged, not saved
    assert "incomplete" in rows["c-incomplete"]
    assert "running" in rows["d-running"]
    assert "incomplete" in rows["e-killed"]  # its process is gone
    assert "being trained by process" in one_line_error(
        kdcli("distill", "--teacher", tmp_path / "a-finished", "--out", tmp_path / "d-running"), 2)


def test_runs_of_an_empty_folder(tmp_path):
    result = kdcli("runs", tmp_path)
    assert result.exit_code == 0 and "no run directories" in result.stdout


# --- --dry-run, --verbose, completion -------------------------------------------------

@pytest.mark.parametrize("command", [
    ["train-teacher"], ["distill", "--T", "4"], ["train-ensemble", "--members", "3"], ["omit-class", "--digit", "3"],
])
def test_dry_run_of_every_training_command_prints_the_plan_and_writes_nothing(tmp_path, command):
    result = kdcli(*command, "--dry-run", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert f"{command[0]} would train into" in " ".join(result.stdout.split())
    assert '"seed"' in result.stdout
    assert not (tmp_path / "run").exists()


def test_quiet_by_default_and_verbose_on_request(synthetic_dir, tmp_path):
    args = ["train-teacher", "--data-dir", synthetic_dir, "--hidden", "8", "--epochs", "1", "--device", "cpu"]
    quiet = kdcli(*args, "--out", tmp_path / "q")
    assert quiet.exit_code == 0 and quiet.stderr == ""  # no progress bar either: not a terminal
    assert "test errors" in quiet.stdout
    verbose = kdcli(*args, "--out", tmp_path / "v", "--verbose")
    assert verbose.exit_code == 0
    assert "device cpu" in verbose.stderr and "epoch 1/1" in verbose.stderr


def test_shell_completion_is_offered():
    result = kdcli("--help")
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
