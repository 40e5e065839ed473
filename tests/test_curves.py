"""`kdcli curves`: learning curves from the runs' metrics.jsonl."""

import json

from conftest import kdcli, one_line_error
from kdcli.report import curve_series


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


STACKED = [  # two stacked members, test errors every second epoch, the ensemble logged with them
    {"epoch": 1, "loss": 2.0, "test_errors": [900, 800], "test_ensemble_errors": 700},
    {"epoch": 2, "loss": 1.0},
    {"epoch": 3, "loss": 0.5, "test_errors": [300, 200], "test_ensemble_errors": 150},
]


def test_curve_series_keeps_each_member_and_skips_epochs_without_the_quantity():
    series = curve_series(STACKED)
    assert series["loss"] == [(1, [2.0]), (2, [1.0]), (3, [0.5])]
    assert series["test_errors"] == [(1, [900, 800]), (3, [300, 200])]
    assert series["test_ensemble_errors"] == [(1, [700]), (3, [150])]
    assert "val_errors" not in series


def test_curve_series_passes_over_values_that_are_not_numbers():
    odd = [{"epoch": 1, "loss": "low"}, {"epoch": "2", "loss": 1.0}, {"epoch": 3, "test_errors": [5, None]},
           {"epoch": 4, "loss": True}, {"epoch": 5, "test_errors": []}, {"epoch": 6, "loss": 0.5}]
    assert curve_series(odd) == {"loss": [(6, [0.5])]}


def test_curves_plots_several_runs(teacher_run, tmp_path):
    stacked = write_metrics(tmp_path / "stacked", STACKED)
    out = tmp_path / "plots" / "curves.png"
    result = kdcli("curves", teacher_run, stacked, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_skips_a_line_cut_short_by_a_crash(tmp_path):
    run = write_metrics(tmp_path / "run", STACKED)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "lo')
    result = kdcli("curves", run, "--out", tmp_path / "c.svg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_curves_bad_input_is_one_line(tmp_path):
    run = write_metrics(tmp_path / "run", STACKED)
    (tmp_path / "empty").mkdir()
    write_metrics(tmp_path / "garbled", [{"epoch": "one", "loss": "high"}])
    assert "no run directory at" in one_line_error(kdcli("curves", tmp_path / "missing"))
    assert "no epoch logged yet" in one_line_error(kdcli("curves", tmp_path / "empty"))
    assert "no epoch logged yet" in one_line_error(kdcli("curves", tmp_path / "garbled"))
    assert "--out must end in" in one_line_error(kdcli("curves", run, "--out", tmp_path / "c.txt"))
    assert not (tmp_path / "c.txt").exists()
