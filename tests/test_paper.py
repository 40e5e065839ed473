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
    command = ["make", "--no-print-directory", "paper", "EXP=experiments/smoke", f"RUNS={runs}",
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
