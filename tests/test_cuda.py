"""The CUDA path: what `device: auto` picks when a GPU is there. Skipped on machines without one
(CI has none); run on a GPU machine with `make gpu-check`."""

import json

import pytest
import torch

from conftest import interrupt_after_epoch, kdcli, synthetic_config as config, weights
from kdcli.train import run_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_training_matches_cpu_training(synthetic_dir, tmp_path):
    """Same seed, same batches, same jitter (drawn on the CPU either way): the CUDA run differs
    from the CPU run by float rounding only. Dropout is off: its masks come from each device's own RNG."""
    kw = dict(jitter=2, max_norm=2.0, optimizer="adam", lr=0.002)
    on_cpu = run_training(config(synthetic_dir, tmp_path / "cpu", device="cpu", **kw), "train-teacher")
    on_cuda = run_training(config(synthetic_dir, tmp_path / "cuda", device="cuda", **kw), "train-teacher")
    assert on_cuda["device"].startswith("cuda")
    a, b = weights(tmp_path / "cpu" / "run"), weights(tmp_path / "cuda" / "run")
    for name in a:
        assert torch.allclose(a[name], b[name].cpu(), atol=1e-3, rtol=1e-3), name
    assert abs(on_cpu["test"]["n_errors"] - on_cuda["test"]["n_errors"]) <= 2


def test_cuda_resume_after_interrupt_equals_uninterrupted(synthetic_dir, tmp_path):
    """The CUDA RNG (dropout masks) is saved and restored with the rest of the state."""
    kw = dict(dropout_input=0.2, dropout_hidden=0.3, jitter=2, max_norm=2.0, epochs=4, device="cuda")
    full = run_training(config(synthetic_dir, tmp_path / "full", **kw), "train-teacher")
    cfg = config(synthetic_dir, tmp_path / "cut", **kw)
    interrupt_after_epoch(cfg, 2)
    resumed = run_training(cfg, "train-teacher", resume=True)
    assert resumed["test"]["n_errors"] == full["test"]["n_errors"]
    a, b = weights(tmp_path / "full" / "run"), weights(tmp_path / "cut" / "run")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_bf16_trains_on_cuda(synthetic_dir, tmp_path):
    result = run_training(config(synthetic_dir, tmp_path, device="cuda", precision="bf16", epochs=4), "train-teacher")
    assert result["test"]["n_errors"] < 20  # of 200; chance is 180


def test_auto_picks_cuda_and_the_run_evaluates_on_cpu(synthetic_dir, tmp_path):
    """A run trained on the GPU is read back on a machine without one: same test errors."""
    run = tmp_path / "teacher"
    trained = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "24", "--epochs", "3", "--out", run)
    assert trained.exit_code == 0, trained.output
    result = json.loads((run / "result.json").read_text())
    assert result["device"].startswith("cuda") and result["device_name"] == torch.cuda.get_device_name()
    evaluated = kdcli("eval", run, "--data-dir", synthetic_dir, "--device", "cpu", "--json", tmp_path / "e.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "e.json").read_text())["test"]["n_errors"] == result["test"]["n_errors"]


def test_distill_ensemble_and_omit_class_run_on_cuda(data_dir, tmp_path):
    """Cached soft targets, stacked members and the bias fit, all with tensors on the GPU
    (the smoke experiments hold out 1,000 validation images: more than the small synthetic set has)."""
    common = ["--data-dir", data_dir, "--epochs", "2", "--device", "cuda"]
    teacher = tmp_path / "teacher"
    steps = [
        ("train-ensemble", "-c", "experiments/smoke/ensemble.yaml", *common, "--out", tmp_path / "ensemble"),
        ("train-teacher", "-c", "experiments/smoke/teacher.yaml", *common, "--out", teacher),
        ("distill", "-c", "experiments/smoke/distill.yaml", *common, "--teacher", teacher, "--out", tmp_path / "d"),
        ("omit-class", "-c", "experiments/smoke/omit-3.yaml", *common, "--teacher", teacher,
         "--bias-shift", "3=+3.5", "--out", tmp_path / "omit"),
    ]
    for args in steps:
        result = kdcli(*args)
        assert result.exit_code == 0, (args[0], result.output)
    omit = json.loads((tmp_path / "omit" / "result.json").read_text())
    assert omit["device"].startswith("cuda") and "bias_correction" in omit
