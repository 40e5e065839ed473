"""Ensembles: stacked training, combination rules, an ensemble as the teacher."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kdcli.cli import app
from kdcli.losses import soft_targets
from kdcli.models import StackedMLP, stack_models
from kdcli.runs import RunError, save_checkpoint
from kdcli.train import load_teacher, teacher_targets

runner = CliRunner()


def test_one_member_ensemble_teacher_equals_that_member():
    member = StackedMLP([12], members=1, seeds=[4]).eval()
    x = torch.rand(9, 784)
    for rule in ("mean_probs", "mean_logits"):
        as_ensemble = teacher_targets(stack_models([member]), x, [3.0], rule)
        assert torch.allclose(as_ensemble, teacher_targets(member, x, [3.0], rule))
        assert torch.allclose(as_ensemble[0], torch.log_softmax(member(x)[0] / 3.0, -1), atol=1e-6)


def test_stacking_runs_keeps_each_members_logits():
    a, b = StackedMLP([12], members=2, seeds=[1, 2]).eval(), StackedMLP([12], members=1, seeds=[3]).eval()
    x = torch.rand(5, 784)
    stacked = stack_models([a, b]).eval()
    assert torch.allclose(stacked(x), torch.cat([a(x), b(x)]), atol=1e-6)


def test_members_with_different_architectures_are_refused(tmp_path):
    save_checkpoint(tmp_path / "a.pt", StackedMLP([12]), {"dataset": "mnist"})
    save_checkpoint(tmp_path / "b.pt", StackedMLP([16]), {"dataset": "mnist"})
    with pytest.raises(RunError, match="different architectures"):
        load_teacher(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", torch.device("cpu"))


def test_ensemble_teacher_targets_are_the_mean_of_softened_members():
    teacher = StackedMLP([12], members=3, seeds=[1, 2, 3]).eval()
    x = torch.rand(4, 784)
    probs = torch.softmax(teacher(x) / 5.0, -1).mean(0)
    assert torch.allclose(teacher_targets(teacher, x, [5.0], "mean_probs")[0].exp(), probs, atol=1e-6)
    assert torch.allclose(soft_targets(teacher(x), 5.0, "mean_probs").exp(), probs, atol=1e-6)


def test_distill_from_an_ensemble_run(data_dir, tmp_path):
    ens = tmp_path / "ens"
    r = runner.invoke(app, ["train-ensemble", "-c", "experiments/smoke/ensemble.yaml", "--data-dir", str(data_dir),
                            "--out", str(ens)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "student"
    r = runner.invoke(app, ["distill", "-c", "experiments/smoke/distill.yaml", "--teacher", str(ens),
                            "--data-dir", str(data_dir), "--out", str(out), "--combine", "mean_logits"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "result.json").read_text())["config"]["combine"] == "mean_logits"


@pytest.mark.parametrize("members", ["0", "-2"])
def test_bad_member_counts(members):
    r = runner.invoke(app, ["train-ensemble", "--members", members])
    assert r.exit_code == 2 and "members" in r.stderr and "Traceback" not in r.output


def test_teacher_directory_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "checkpoint" in r.stderr
