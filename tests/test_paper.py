"""`make paper` on the smoke experiments: the whole pipeline and the report build."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_paper_smoke_builds_the_report(tmp_path, data_dir):
    runs, results = tmp_path / "runs", tmp_path / "results"
    kdcli = f"{sys.executable} -m kdcli"
    command = ["make", "--no-print-directory", "-j2", "paper", "EXP=experiments/smoke", f"RUNS={runs}",
               f"RESULTS={results}", f"KDCLI={kdcli}", f"KDCLI_DATA_DIR={data_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (results / "REPORT.md").read_text()
    assert "| teacher 784-1200-1200-10" in report and "not run" not in report.split("## Temperature")[0]
    assert (results / "tsweep.png").stat().st_size > 1000
    summary = json.loads((results / "summary.json").read_text())
    assert len(summary["tsweep"]) == 2 and all(len(v) == 9 for v in summary["tsweep"].values())

    # a second `make paper` finds every run finished and only rebuilds the report
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "train-teacher" not in again.stdout and "finished, kept" in again.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_jitter_smoke_adds_the_beyond_the_paper_rows(tmp_path, data_dir):
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = ["make", "--no-print-directory", "-j2", "jitter", "EXP=experiments/smoke", f"RUNS={runs}", f"RESULTS={results}",
               f"KDCLI={sys.executable} -m kdcli", f"KDCLI_DATA_DIR={data_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("distill-jitter", "omit-3-jitter", "data3pct-hard-jitter", "data3pct-soft-jitter"):
        config = json.loads((runs / name / "result.json").read_text())["config"]
        assert config["jitter"] == 2, name
    report = (results / "REPORT.md").read_text()
    for label in ("beyond the paper: student distilled at T = 20, jittered transfer set",
                  "beyond the paper: digit 3 omitted, jittered transfer set: bias shift fitted on validation",
                  "beyond the paper: 3%, soft targets, jittered transfer set"):
        row = next(line for line in report.splitlines() if label in line)
        assert "not run" not in row
    assert (results / "omit-3-jitter-bias.png").stat().st_size > 1000


def report_of_one_teacher_run(tmp_path, monkeypatch, command: str) -> str:
    """The report of a runs/ folder holding one teacher run whose recorded command is `command`
    ({run} in it stands for the run's folder)."""
    import io

    from rich.console import Console

    from kdcli.report import build_report

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "teacher"
    run.mkdir(parents=True)
    result = {"command": "train-teacher", "name": "teacher", "command_line": command.format(run=run),
              "wall_seconds": 1.0, "test": {"n_errors": 70, "n_examples": 10000}}
    (run / "result.json").write_text(json.dumps(result))
    return build_report(tmp_path / "runs", tmp_path / "results", Console(file=io.StringIO())).read_text()


def test_report_shows_paths_under_the_working_directory_relative(tmp_path, monkeypatch):
    report = report_of_one_teacher_run(tmp_path, monkeypatch, "kdcli train-teacher -c experiments/teacher.yaml --out {run}")
    assert str(tmp_path) not in report
    assert "from the `result.json` files under `runs/`" in report
    assert "`kdcli train-teacher -c experiments/teacher.yaml --out runs/teacher`" in report


@pytest.mark.parametrize("start", ["--force", "--resume"])
def test_report_shows_each_run_with_the_command_that_makes_it_anew(tmp_path, monkeypatch, start):
    report = report_of_one_teacher_run(tmp_path, monkeypatch,
                                       f"kdcli train-teacher -c experiments/teacher.yaml --out runs/teacher {start}")
    assert start not in report
    assert "`kdcli train-teacher -c experiments/teacher.yaml --out runs/teacher`" in report


def test_report_gives_the_only_7_8_error_to_a_hundredth_of_a_percent():
    from kdcli.report import omit_rows

    def run(accuracy):
        protocol = {"accuracy": accuracy, "shift": -7.0, "errors_per_10k": 10000 * (1 - accuracy)}
        return {"name": "only-7-8", "bias_correction": {"protocols": dict.fromkeys(
            ("none", "validation", "test_optimised"), protocol)}}

    results = {"only-7-8": run(0.8601), "only-7-8-s2": run(0.8718), "only-7-8-s3": run(0.8709)}
    row = next(r for r in omit_rows(results) if "fitted on validation" in r["experiment"])
    assert row["kdcli"].startswith("13.24% error [12.82–13.99]"), row["kdcli"]
