"""Every command end to end on the smoke experiments, and bad input through the real CLI."""

import json

import pytest
import torch

import kdcli.cli as cli
import kdcli.train as train_module
from conftest import kdcli, one_line_error
from kdcli.runs import write_json


def test_train_teacher_writes_the_run_directory(teacher_run):
    for name in ("config.yaml", "model.pt", "metrics.jsonl", "result.json"):
        assert (teacher_run / name).is_file()
    result = json.loads((teacher_run / "result.json").read_text())
    assert set(result["test"]) >= {"n_errors", "accuracy", "per_class_errors", "confusion"}
    assert sum(map(sum, result["test"]["confusion"])) == result["test"]["n_examples"]
    for key in ("wall_seconds", "samples_per_s", "device", "device_name", "threads", "seed", "torch_version",
                "command_line"):
        assert key in result


def test_distill_from_the_teacher_with_flag_overrides(teacher_run, data_dir, tmp_path):
    out = tmp_path / "distill"
    result = kdcli("distill", "-c", "experiments/smoke/distill.yaml", "--teacher", teacher_run,
                   "--data-dir", data_dir, "--out", out, "--T", "5", "--alpha", "0.7")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["temperature"] == 5.0 and saved["config"]["alpha"] == 0.7
    assert saved["members"][0]["temperature"] == 5.0


def test_distill_matching_logits_trains_a_student_of_its_own(teacher_run, data_dir, tmp_path):
    """--match logits reaches the loss: same seed and data as the soft-target student, other weights."""
    runs = {}
    for match in ("soft_targets", "logits"):
        out = tmp_path / match
        result = kdcli("distill", "-c", "experiments/smoke/distill.yaml", "--teacher", teacher_run,
                       "--data-dir", data_dir, "--out", out, "--match", match)
        assert result.exit_code == 0, result.output
        runs[match] = out
    saved = json.loads((runs["logits"] / "result.json").read_text())
    assert saved["config"]["match"] == "logits"
    weights = [torch.load(out / "model.pt", weights_only=True)["state_dict"] for out in runs.values()]
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items())


def test_precision_flag_reaches_the_run(teacher_run, data_dir, tmp_path):
    """--precision bf16 is recorded and trains other weights than the fp32 teacher of the same config and seed."""
    out = tmp_path / "bf16"
    result = kdcli("train-teacher", "-c", "experiments/smoke/teacher.yaml", "--data-dir", data_dir, "--out", out,
                   "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "result.json").read_text())["config"]["precision"] == "bf16"
    weights = [torch.load(run / "model.pt", weights_only=True)["state_dict"] for run in (teacher_run, out)]
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items())


def test_eval_prints_and_writes_json(teacher_run, data_dir, tmp_path):
    result = kdcli("eval", teacher_run, "--data-dir", data_dir, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "test errors" in result.stdout
    trained = json.loads((teacher_run / "result.json").read_text())["test"]["n_errors"]
    assert json.loads((tmp_path / "e.json").read_text())["test"]["n_errors"] == trained


def test_eval_against_itself_agrees_everywhere(teacher_run, data_dir, tmp_path):
    result = kdcli("eval", teacher_run, "--data-dir", data_dir, "--against", teacher_run, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "agreement with" in result.stdout
    agreement = json.loads((tmp_path / "e.json").read_text())["agreement"]
    for split in ("train", "test"):
        assert agreement[split]["n_disagree"] == 0 and agreement[split]["agreement"] == 1.0
        assert abs(agreement[split]["kl_from_reference"]) < 1e-5
    assert agreement["train"]["n_examples"] > agreement["test"]["n_examples"] > 0


def test_eval_against_a_missing_run_is_one_line(teacher_run, data_dir, tmp_path):
    line = one_line_error(kdcli("eval", teacher_run, "--data-dir", data_dir, "--against", tmp_path / "nothing"))
    assert "nothing" in line


def test_train_ensemble_smoke(data_dir, tmp_path):
    out = tmp_path / "ens"
    result = kdcli("train-ensemble", "-c", "experiments/smoke/ensemble.yaml", "--data-dir", data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "result.json").read_text())
    assert len(saved["members"]) == 3 and set(saved["ensemble"]) == {"mean_probs", "mean_logits"}


def test_flags_reach_the_config(monkeypatch, tmp_path, teacher_run):
    seen = {}
    monkeypatch.setattr(train_module, "run_training", lambda cfg, *a, **k: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr("kdcli.report.print_result", lambda *a: None)
    kdcli("distill", "--T", "8", "--epochs", "2", "--batch-size", "64", "--lr", "0.3", "--seed", "9",
          "--teacher", teacher_run, "--out", tmp_path / "x", "--device", "cpu", "--hidden", "30,30")
    cfg = seen["cfg"]
    assert (cfg.temperature, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, cfg.hidden) == (8.0, 2, 64, 0.3, 9, [30, 30])
    assert cfg.alpha == 1.0 and cfg.name == "distill"  # from experiments/distill.yaml


def test_dry_run_trains_nothing(tmp_path):
    result = kdcli("train-teacher", "--dry-run", "--out", tmp_path / "t", "--epochs", "3")
    assert result.exit_code == 0 and '"epochs": 3' in result.stdout
    assert not (tmp_path / "t").exists()


def test_finished_run_is_not_overwritten(teacher_run, data_dir):
    before = (teacher_run / "result.json").read_bytes()
    line = one_line_error(kdcli("train-teacher", "-c", "experiments/smoke/teacher.yaml", "--out", teacher_run,
                                "--data-dir", data_dir))
    assert "--force" in line
    assert (teacher_run / "result.json").read_bytes() == before


@pytest.mark.parametrize("args, expected", [
    (["distill", "--T", "0"], "temperature"),
    (["distill", "--T", "-1"], "temperature"),
    (["distill", "--alpha", "2"], "alpha"),
    (["train-teacher", "--epochs", "-3"], "epochs"),
    (["train-teacher", "--batch-size", "0"], "batch_size"),
    (["train-teacher", "--hidden", ","], "hidden"),
    (["distill", "--teacher", "runs/does-not-exist"], "not found"),
    (["train-teacher", "-c", "experiments/missing.yaml"], "not found"),
    (["train-ensemble", "--members", "0"], "members"),
    (["eval", "runs/does-not-exist"], "no checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path):
    line = one_line_error(kdcli(*args, *(["--out", tmp_path / "o"] if args[0] != "eval" else [])))
    assert expected in line


def test_malformed_yaml_and_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    assert "malformed YAML" in one_line_error(kdcli("train-teacher", "-c", bad))
    bad.write_text("epoch: 3\n")
    assert "did you mean 'epochs'" in one_line_error(kdcli("train-teacher", "-c", bad))


def test_tables_written_to_a_pipe_are_not_squeezed_into_80_columns(monkeypatch, tmp_path):
    name = "a-run-directory-whose-name-alone-takes-up-most-of-an-80-column-line"
    write_json(tmp_path / name / "status.json", {"state": "running", "pid": 2**22 + 1, "command": "distill"})
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(cli, "out", cli.stdout_console())  # the CLI's stdout console, made as a plain run makes it
    result = kdcli("runs", tmp_path)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if name in line)
    assert "incomplete" in row and "distill" in row  # one line of the table holds the whole row
    assert max(map(len, result.stdout.splitlines())) > 80
    monkeypatch.setenv("COLUMNS", "80")  # a width the user asks for still holds
    assert cli.stdout_console().width == 80
