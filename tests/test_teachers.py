"""Released teachers: release, name resolution, checksum refusal, and the fallback a fresh clone relies on."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, kdcli, one_line_error, weights
from kdcli import teachers


@pytest.fixture
def released(teacher_run, tmp_path, monkeypatch):
    """A smoke teacher released as mnist-1200-s1 into ./teachers of an empty working folder
    (a fresh clone's layout: no runs/ there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(teachers, "REPO_TEACHERS", tmp_path / "no-checkout-teachers")
    result = kdcli("release-teacher", teacher_run, "--name", "mnist-1200-s1")
    assert result.exit_code == 0, result.output
    return tmp_path / "teachers" / "mnist-1200-s1"


def test_a_release_holds_the_runs_weights_its_files_and_their_checksums(released, teacher_run):
    assert sorted(p.name for p in released.iterdir()) == sorted(teachers.FILES + (teachers.CHECKSUMS,))
    saved = load_file(str(released / teachers.WEIGHTS))
    original = weights(teacher_run)
    assert saved.keys() == original.keys()
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], original[k]) for k in saved)
    for line in (released / teachers.CHECKSUMS).read_text().splitlines():  # sha256sum -c format
        digest, filename = line.split("  ")
        assert hashlib.sha256((released / filename).read_bytes()).hexdigest() == digest
    assert json.loads((released / "result.json").read_text()) == json.loads((teacher_run / "result.json").read_text())


def test_names_resolve_to_released_folders(released):
    assert teachers.resolve("mnist-1200") == teachers.resolve("mnist-1200-s1") == teachers.Path("teachers/mnist-1200-s1")
    assert teachers.resolve("mnist-1200-s2") is None
    assert teachers.resolve("../etc") is None  # a name, never a path


def test_a_released_teacher_loads_and_teaches_by_name(released, teacher_run, data_dir):
    model, payload = teachers.load(released)
    reference, _ = teachers.load_any(teacher_run)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert payload["config"]["hidden"] == [64, 64]
    result = kdcli("distill", "-c", REPO / "experiments/smoke/distill.yaml", "--teacher", "mnist-1200",
                   "--data-dir", data_dir, "--out", "runs/d")
    assert result.exit_code == 0, result.output
    assert json.loads(open("runs/d/result.json").read())["config"]["teacher"] == "mnist-1200"


def test_distill_on_a_fresh_clone_uses_the_released_teacher_and_says_so(released, data_dir):
    # the default experiment names runs/teacher, which a fresh clone does not have
    result = kdcli("distill", "--T", "20", "--epochs", "1", "--hidden", "16", "--data-dir", data_dir, "--out", "runs/d")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "released teacher" in line]
    assert len(notes) == 1 and "mnist-1200-s1" in notes[0]
    assert json.loads(open("runs/d/result.json").read())["config"]["teacher"] == "teachers/mnist-1200-s1"


def test_an_explicit_missing_teacher_is_still_an_error(released):
    assert "not found" in one_line_error(kdcli("distill", "--teacher", "runs/mine", "--out", "runs/d"))


def flip_a_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing", "edited result"])
def test_a_damaged_release_is_refused_in_one_line(released, data_dir, damage):
    target = released / ("result.json" if damage == "edited result" else teachers.WEIGHTS)
    if damage == "flipped byte":
        flip_a_byte(target)
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "missing":
        target.unlink()
    else:
        target.write_text(target.read_text().replace('"n_errors": ', '"n_errors": 1'))
    line = one_line_error(kdcli("distill", "-c", REPO / "experiments/smoke/distill.yaml", "--teacher", "mnist-1200",
                                "--data-dir", data_dir, "--out", "runs/d"))
    assert "teachers/mnist-1200-s1/" + target.name in line and ("sha256" in line or "missing" in line)
    assert not (released.parent.parent / "runs" / "d").exists()  # refused before any work
    line = one_line_error(kdcli("eval", "mnist-1200", "--data-dir", data_dir))
    assert "teachers/mnist-1200-s1/" + target.name in line


def test_kdcli_teachers_lists_test_errors_recipe_checksum_and_command(released, teacher_run):
    result = kdcli("teachers")
    assert result.exit_code == 0, result.output
    expected = json.loads((teacher_run / "result.json").read_text())["test"]["n_errors"]
    assert "mnist-1200-s1" in result.stdout and str(expected) in result.stdout and "ok" in result.stdout
    row = teachers.describe(released)
    assert row["test_errors"] == expected and "784-64-64-10" in row["recipe"] and row["command"].startswith("kdcli")
    flip_a_byte(released / teachers.WEIGHTS)
    assert "sha256" in teachers.describe(released)["checksum"]


def test_a_teacher_resumed_on_its_way_lists_the_command_that_trains_it_anew(teacher_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(teacher_run, resumed)
    result = json.loads((resumed / "result.json").read_text())
    fresh = result["command_line"]
    (resumed / "result.json").write_text(json.dumps({**result, "command_line": fresh + " --resume"}))
    assert kdcli("release-teacher", resumed, "--name", "x-s1", "--into", tmp_path / "teachers").exit_code == 0
    row = teachers.describe(tmp_path / "teachers" / "x-s1")
    assert row["command"] == fresh and row["checksum"] == "ok"


def test_release_refuses_blind_runs_unfinished_runs_and_a_second_release(released, teacher_run, tmp_path):
    line = one_line_error(kdcli("release-teacher", teacher_run, "--name", "mnist-1200-s1"))
    assert "released once" in line
    blind = tmp_path / "blind"
    shutil.copytree(teacher_run, blind)
    result = json.loads((blind / "result.json").read_text())
    (blind / "result.json").write_text(json.dumps({**result, "test_eval": False}))
    assert "blind" in one_line_error(kdcli("release-teacher", blind, "--name", "x-s1"))
    (blind / "result.json").unlink()
    assert "finished" in one_line_error(kdcli("release-teacher", blind, "--name", "x-s1"))
    assert "release name" in one_line_error(kdcli("release-teacher", teacher_run, "--name", "../x"))


def test_teachers_compare_shows_released_and_retrained_errors_seed_by_seed(released, teacher_run):
    shutil.copytree(teacher_run, "runs/teacher")
    expected = json.loads((teacher_run / "result.json").read_text())["test"]["n_errors"]
    assert teachers.compare(teachers.Path("runs"), "mnist-1200") == [
        {"seed": 1, "released": expected, "retrained": expected, "run": "runs/teacher"}]
    result = kdcli("teachers", "--compare", "runs", "--release", "mnist-1200")
    assert result.exit_code == 0 and "+0" in result.stdout, result.output
    assert "no released teachers" in one_line_error(kdcli("teachers", "--compare", "runs", "--release", "other"))


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_paper_smoke_builds_on_released_teachers(teacher_run, tmp_path, data_dir):
    import subprocess
    import sys

    for seed in (1, 2):  # one smoke teacher stands in for each released seed
        assert kdcli("release-teacher", teacher_run, "--name", f"smoke-s{seed}", "--into", tmp_path / "teachers").exit_code == 0
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = ["make", "--no-print-directory", "-j2", "paper", "SEEDS=2", "EXP=experiments/smoke", f"RUNS={runs}",
               f"RESULTS={results}", f"TEACHERS_DIR={tmp_path / 'teachers'}", "RELEASE=smoke",
               f"KDCLI={sys.executable} -m kdcli", f"KDCLI_DATA_DIR={data_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "experiments/smoke/teacher.yaml" not in done.stdout  # no teacher is trained
    assert not (runs / "teacher").exists()
    for run, seed in (("distill", 1), ("distill-s2", 2), ("omit-3-s2", 2), ("only-7-8-s2", 2)):
        config = json.loads((runs / run / "result.json").read_text())["config"]
        assert config["teacher"] == str(tmp_path / "teachers" / f"smoke-s{seed}"), run
    report = (results / "REPORT.md").read_text()
    teacher_row = next(line for line in report.splitlines() if line.startswith("| teacher 784-1200-1200-10"))
    test = json.loads((teacher_run / "result.json").read_text())["test"]
    expected = test["n_errors"] * 10000 / test["n_examples"]
    assert f"| {expected:.1f} [{expected:.0f}–{expected:.0f}] | 2 |" in teacher_row and "| 58 (no max-norm) |" in teacher_row
    distilled = next(line for line in report.splitlines() if line.startswith("| student distilled at T = 20"))
    assert "| unjittered, 1,000 images |" in distilled


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_paper_uses_released_teachers_only_when_every_seed_asked_for_is_released(tmp_path):
    import subprocess

    (tmp_path / "teachers" / "mnist-1200-s1").mkdir(parents=True)
    (tmp_path / "teachers" / "mnist-1200-s1" / teachers.CHECKSUMS).write_text("")  # a partial release: seed 1 alone

    def dry_run(*args):
        return subprocess.run(["make", "-n", "--no-print-directory", "paper", f"TEACHERS_DIR={tmp_path / 'teachers'}",
                               *args], cwd=REPO, capture_output=True, text=True, timeout=60)

    one_seed = dry_run("SEEDS=1")
    assert one_seed.returncode == 0 and "experiments/teacher.yaml" not in one_seed.stdout
    assert f"--teacher {tmp_path / 'teachers' / 'mnist-1200-s1'}" in one_seed.stdout
    three_seeds = dry_run("SEEDS=3")
    assert three_seeds.returncode == 0 and "train-teacher -c experiments/teacher.yaml --out runs/teacher-s3" in three_seeds.stdout
    assert "no released teacher for seed 2" in three_seeds.stdout and "mnist-1200-s1" not in three_seeds.stdout
    forced = dry_run("SEEDS=3", "TEACHERS=released")
    assert forced.returncode != 0 and "no released teacher for seed 2" in forced.stderr


def test_an_installed_wheel_finds_the_teachers_packaged_inside_it(teacher_run, tmp_path, monkeypatch):
    import kdcli as package

    # a wheel maps teachers/ to kdcli/released, a folder without __init__.py beside the package's modules
    installed = tmp_path / "site" / "kdcli"
    assert kdcli("release-teacher", teacher_run, "--name", "mnist-1200-s1", "--into", installed / "released").exit_code == 0
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(installed)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(teachers, "REPO_TEACHERS", tmp_path / "no-checkout-teachers")
    assert teachers.packaged_teachers() == installed / "released"
    assert teachers.resolve("mnist-1200") == installed / "released" / "mnist-1200-s1"
