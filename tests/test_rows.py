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
from kdcli.runs import RunError


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


def test_a_rebuild_carries_the_earlier_ensemble_and_specialist_sections_it_has_no_runs_for(tmp_path):
    # runs for the teacher and MNIST's ensemble table only; the earlier report also had Fashion-MNIST's and the
    # specialists' sections, and a teacher row of its own
    for row in [rows.PAPER[0], *[r for r in rows.ENSEMBLES if not r.stem.endswith("-fashion")]]:
        (tmp_path / "runs" / row.stem).mkdir(parents=True)
        (tmp_path / "runs" / row.stem / "result.json").write_text(json.dumps(fake_result(row)))
    earlier = [
        {"experiment": rows.PAPER[0].label, "paper": "67", "kdcli": "69.0", "seeds": 5, "config": "", "command": "",
         "wall_seconds": 1.0},
        {"experiment": "MNIST: single 300-300 net", "paper": "58.9%", "kdcli": "161.0", "seeds": 3, "config": "",
         "command": "old-mnist", "wall_seconds": 1.0},
        {"experiment": "Fashion-MNIST: single 300-300 net", "paper": "58.9%", "kdcli": "991.0", "seeds": 3,
         "config": "", "command": "old-fashion", "wall_seconds": 600.0},
        {"experiment": "MNIST (analogue of §5 on JFT): generalist alone, test errors", "paper": "25.0%",
         "kdcli": "163.7", "seeds": 3, "config": "", "command": "old-specialists", "wall_seconds": 600.0},
    ]
    (tmp_path / "earlier.json").write_text(json.dumps({"rows": earlier}))
    build_report(tmp_path / "runs", tmp_path / "results", Console(file=io.StringIO()), carry=tmp_path / "earlier.json")
    report = (tmp_path / "results" / "REPORT.md").read_text().splitlines()
    shown = json.loads((tmp_path / "results" / "summary.json").read_text())["rows"]

    carried = [r["experiment"] for r in shown if r.get("carried")]
    assert carried == ["Fashion-MNIST: single 300-300 net",
                       "MNIST (analogue of §5 on JFT): generalist alone, test errors"]
    assert [r["experiment"] for r in shown].count(rows.PAPER[0].label) == 1  # the new teacher row, not the old
    assert not any("old-mnist" in line for line in report)  # MNIST's ensemble section was rebuilt
    assert any(line.startswith("| Fashion-MNIST: single 300-300 net † | 58.9% |") for line in report)
    assert any(line.startswith("† Carried unchanged") for line in report)
    # carried runs are not part of this build's wall time: only the rebuilt runs' 1 s each
    rebuilt = 1 + len([r for r in rows.ENSEMBLES if not r.stem.endswith("-fashion")])
    assert f"(rows marked † excluded): {rebuilt / 60:.1f} min." in "\n".join(report)


def test_an_unreadable_earlier_report_is_one_clear_error(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "earlier.json").write_text("{not json")
    with pytest.raises(RunError, match="earlier.json: cannot read an earlier report's rows"):
        build_report(tmp_path / "runs", tmp_path / "results", Console(file=io.StringIO()), carry=tmp_path / "earlier.json")
