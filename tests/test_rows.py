"""The registry of the paper's rows (kdcli/rows.py) is the one description: the Makefile runs what it
says, the report shows what it says, and the README's table names its targets."""

import io
import json
import re
import shutil
import subprocess

import pytest
from rich.console import Console

from conftest import REPO
from kdcli import rows
from kdcli.report import build_report


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """`make -n` of every row target: the commands the Makefile would run, per target."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    out = tmp_path_factory.mktemp("plan")
    plans = {}
    for target in sorted({r.target for r in rows.ROWS}):
        done = subprocess.run(["make", "-n", "--no-print-directory", target, "TEACHERS=scratch", "SEEDS=1",
                               f"RUNS={out}/runs", f"RESULTS={out}/results", "KDCLI=kdcli"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        plans[target] = done.stdout.splitlines()
    return out, plans


@pytest.mark.parametrize("row", rows.ROWS, ids=lambda r: f"{r.target}:{r.stem}")
def test_each_rows_make_target_runs_its_command_on_its_experiment(planned, row):
    out, plans = planned
    if row.command == "sweep":
        expected = f"kdcli sweep -c experiments/{row.experiment}.yaml --out {out}/runs"
    else:
        expected = f"kdcli {row.command} -c experiments/{row.experiment}.yaml --out {out}/runs/{row.stem} "
    assert any(line.startswith(expected) for line in plans[row.target]), "\n".join(plans[row.target])


def test_every_row_target_is_phony_and_every_experiment_exists():
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    for row in rows.ROWS:
        assert row.target in phony, row.target
        assert (REPO / "experiments" / f"{row.experiment}.yaml").is_file(), row.experiment


def fake_result(row):
    result = {"command": row.command, "name": row.stem, "wall_seconds": 1.0,
              "command_line": f"kdcli {row.command} -c experiments/{row.experiment}.yaml --out runs/{row.stem}",
              "test": {"n_errors": 70, "n_examples": 10000, "nll": 0.1}, "config": {"teacher": None}}
    if row.protocols:
        protocol = {"errors_per_10k": 100.0, "omitted_n_errors": 10, "accuracy": 0.99, "shift": 1.0}
        result["bias_correction"] = {"protocols": dict.fromkeys(row.protocols, protocol)}
    return result


def test_the_report_shows_each_rows_label_paper_and_public_figures(tmp_path):
    described = rows.PAPER + rows.BEYOND + rows.OMITTED + rows.ENSEMBLES
    for row in described:
        (tmp_path / "runs" / row.stem).mkdir(parents=True)
        (tmp_path / "runs" / row.stem / "result.json").write_text(json.dumps(fake_result(row)))
    report = build_report(tmp_path / "runs", tmp_path / "results", Console(file=io.StringIO())).read_text()
    for row in rows.PAPER + rows.BEYOND:
        line = next(l for l in report.splitlines() if l.startswith(f"| {row.label} |"))
        assert line.startswith(f"| {row.label} | {row.paper} | {row.public} |"), line
        assert f"`experiments/{row.experiment}.yaml`" in line
    for row in rows.ENSEMBLES:
        assert any(l.startswith(f"| {row.label} | {row.paper} |") for l in report.splitlines()), row.label
    assert rows.ENSEMBLE_ANALOGUE in report
    for row in rows.OMITTED:
        for protocol, paper in row.protocols.items():
            label = f"{row.label}: {rows.PROTOCOLS[protocol]}"
            line = next(l for l in report.splitlines() if l.startswith(f"| {label} |"))
            assert line.startswith(f"| {label} | {paper} | {row.public_protocols.get(protocol, '—')} |"), line


def test_the_readme_table_names_registry_targets():
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| experiment | paper |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    named = {m for line in table for m in re.findall(r"`make ([a-z0-9-]+)`", line)}
    assert named and named <= {r.target for r in rows.ROWS}, named - {r.target for r in rows.ROWS}
