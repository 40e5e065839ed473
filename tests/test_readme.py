"""The README's commands table: every example runs as written, at smoke size (small data, one epoch)."""

import re
import shlex
import shutil

import pytest

from conftest import REPO, kdcli

TRAINING = {"train-teacher", "distill", "train-ensemble", "train-specialists", "omit-class", "sweep"}


def readme_examples() -> list[str]:
    rows = [line for line in (REPO / "README.md").read_text().splitlines() if re.match(r"\| `[a-z-]+` \|", line)]
    return [re.findall(r"`(kdcli [^`]*)`", row)[-1] for row in rows]


def smoke_size(words: list[str], data_dir, index: int) -> list[str]:
    """The example's own words, then what makes it small: 600 training and 200 test images, one epoch."""
    command = words[1]
    if command not in TRAINING:
        return words
    extra = ["--data-dir", str(data_dir), "--set", "train_limit=600", "--set", "test_limit=200", "--epochs", "1"]
    if command == "train-specialists":  # the README's generalist is trained on MNIST here (the data at hand)
        extra += ["--set", "dataset=mnist", "--set", "val_size=1000"]
    out = ["--out", "sweep-runs"] if command == "sweep" else ["--out", f"runs/readme-{index}"]
    return words + extra + out


def test_the_readme_commands_table_examples_run(teacher_run, data_dir, tmp_path, monkeypatch):
    examples = readme_examples()
    assert {e.split()[1] for e in examples} >= TRAINING | {"eval", "report", "runs", "teachers", "softness"}
    monkeypatch.chdir(tmp_path)  # a checkout's layout: its experiments/, and the runs the examples name
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    shutil.copytree(teacher_run, "runs/teacher")
    made = kdcli("distill", "-c", REPO / "experiments/smoke/distill.yaml", "--teacher", "runs/teacher",
                 "--data-dir", data_dir, "--out", "runs/distill")
    assert made.exit_code == 0, made.output
    made = kdcli("train-teacher", "-c", REPO / "experiments/smoke/generalist-fashion.yaml", "--set", "dataset=mnist",
                 "--data-dir", data_dir, "--out", "runs/generalist-fashion")
    assert made.exit_code == 0, made.output
    for index, example in enumerate(examples):
        words = smoke_size(shlex.split(example), data_dir, index)
        if words[1] == "bench":
            words += ["--seconds", "0.2", "--data-dir", str(data_dir)]
        result = kdcli(*words[1:])
        assert result.exit_code == 0, f"{example}: {result.output[-2000:]}"
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "results" / "REPORT.md").is_file()
    assert (tmp_path / "teachers" / "mnist-1200-s1" / "SHA256SUMS").is_file()
