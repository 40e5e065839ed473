"""What a reviewer checks: validation images never train, early stopping keeps exactly the best epoch,
the report's ratios are the arithmetic they claim, and a blind run leaves no test figure behind."""

import gzip
import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import REPO, kdcli, synthetic_config as config, train_blind, weights, write_idx
from kdcli.config import load_config, load_sweep, read_yaml
from kdcli.data import load_dataset
from kdcli.report import gain_kept, gap_closed, gap_closed_row, paper_rows, relative_change, share_spread
from kdcli.train import build_transfer_set, run_training


@pytest.fixture(scope="module")
def numbered_mnist(tmp_path_factory):
    """12,000 training images whose first two pixels spell their index, so any overlap between splits shows."""
    folder = tmp_path_factory.mktemp("numbered")
    n, g = 12000, torch.Generator().manual_seed(0)
    images = (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8)
    images[:, 0, 0], images[:, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    labels = torch.arange(n) % 10
    for split, count in (("train", n), ("t10k", 100)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:count])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[:count])
    return folder


def indices(images: torch.Tensor) -> set[int]:
    pixels = (images[:, 0, :2] * 255).round().long()
    return set((pixels[:, 0] * 256 + pixels[:, 1]).tolist())


def experiments_with_validation():
    """(file, grid point) for every experiment with a validation split; a grid file gives each of its points."""
    for path in sorted((REPO / "experiments").rglob("*.yaml")):
        values = read_yaml(path, allow_grid=True)
        if "grid" in values:
            points = load_sweep(path)
            yield from ((path, k) for k, cfg in enumerate(points) if cfg.val_size)
        elif values.get("val_size"):
            yield path, None


@pytest.mark.parametrize("path, point", list(experiments_with_validation()),
                         ids=lambda v: str(v.relative_to(REPO)) if isinstance(v, Path) else str(v))
def test_training_and_validation_images_are_disjoint(path, point, numbered_mnist):
    overrides, explicit = {"data_dir": str(numbered_mnist), "dataset": "mnist"}, {"teacher": None}
    if point is None:
        cfg = load_config(path, overrides, explicit)
    else:
        cfg = load_sweep(path, overrides, explicit)[point]
    data = load_dataset(cfg, torch.device("cpu"))
    train, val = indices(data.train_x), indices(data.val_x)
    assert train and val and not train & val
    transfer = build_transfer_set(cfg, data, torch.device("cpu"))  # omitted / kept digits, subsets
    assert indices(transfer.images) <= train


def test_early_stopping_restores_exactly_the_best_epochs_weights(synthetic_dir, tmp_path):
    kw = dict(val_size=100, schedule="constant", lr=0.3, epochs=8, dropout_hidden=0.5, jitter=2)
    stopped = run_training(config(synthetic_dir, tmp_path / "es", early_stopping=True, **kw), "train-teacher")
    records = [json.loads(l) for l in (tmp_path / "es" / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_errors"][0] for r in records]
    best = val.index(min(val)) + 1  # ties: the earliest
    assert stopped["best_epoch"] == [best]
    # a constant schedule makes the first `best` epochs of any run the same, so a run of `best` epochs
    # ends with the weights early stopping must have restored
    run_training(config(synthetic_dir, tmp_path / "short", **{**kw, "epochs": best}), "train-teacher")
    restored, reference = weights(tmp_path / "es" / "run"), weights(tmp_path / "short" / "run")
    assert all(torch.equal(restored[k], reference[k]) for k in restored)
    assert stopped["val_errors"] == [min(val)]


def test_ratios_by_hand():
    assert gap_closed(850, 393, 156.4) == pytest.approx((850 - 393) / (850 - 156.4))
    assert gap_closed(150, 140, 160) is None  # no gap to close
    assert gain_kept(161, 150, 160.3) == pytest.approx(0.7 / 11)
    assert gain_kept(150, 151, 140) is None
    assert relative_change(985.7, 996.3) == pytest.approx(-10.6 / 996.3)
    assert share_spread([0.5, 0.7, 0.6]) == "60% [50%–70%]" and share_spread([0.66]) == "66% (1 seed)"


def test_the_gap_closed_row_pairs_seeds():
    def run(name, seed, errors):
        return {"name": name, "seed": seed, "test": {"n_errors": errors, "n_examples": 10000}, "command_line": ""}

    results = {"data3pct-hard": run("h", 1, 800), "data3pct-hard-s2": run("h", 2, 900),
               "data3pct-soft": run("s", 1, 400), "data3pct-soft-s2": run("s", 2, 300),
               "student": run("f", 1, 150), "student-s2": run("f", 2, 160), "student-s3": run("f", 3, 140)}
    row = next(r for r in paper_rows(results) if r["experiment"].startswith("share of the 3%"))
    # seed 1: 400 / 650; seed 2: 600 / 740; seed 3 has no 3% runs and is left out
    assert row["values"] == pytest.approx([400 / 650, 600 / 740]) and row["seeds"] == 2
    assert row["kdcli"] == f"{(400 / 650 + 600 / 740) / 2:.0%} [{400 / 650:.0%}–{600 / 740:.0%}]"


def test_the_ensemble_table_keeps_each_protocols_share_per_seed():
    from kdcli.report import ensemble_rows

    def run(seed, errors):
        return {"seed": seed, "test": {"n_errors": errors, "n_examples": 10000, "nll": 0.1}, "command_line": "",
                "config": {"jitter": 0}}

    results = {"ensemble": run(1, 80), "ensemble-single": run(1, 100), "ensemble-single-s2": run(2, 110),
               "ensemble-distill": run(1, 95), "ensemble-distill-s2": run(2, 100),
               "ensemble-distill-jitter": run(1, 85), "ensemble-distill-jitter-s2": run(2, 80)}
    rows = {r["experiment"]: r for r in ensemble_rows(results)}
    unjittered = rows["MNIST: share of the ensemble's gain kept by distillation, transfer set without jitter"]
    jittered = rows["MNIST: share of the ensemble's gain kept by distillation, jittered transfer set"]
    # seed 1: (100 - 95) / 20 and (100 - 85) / 20; seed 2: (110 - 100) / 30 and (110 - 80) / 30
    assert unjittered["values"] == pytest.approx([5 / 20, 10 / 30]) and unjittered["seeds"] == 2
    assert jittered["values"] == pytest.approx([15 / 20, 30 / 30])
    assert jittered["kdcli"] == f"{(0.75 + 1.0) / 2:.0%} [75%–100%]"
    assert not any(name.startswith("Fashion-MNIST") for name in rows)  # no runs, no rows


def test_a_blind_run_leaves_no_test_figure_anywhere(synthetic_dir, tmp_path):
    result = train_blind(synthetic_dir, tmp_path, epochs=3)
    assert result.exit_code == 0, result.output
    texts = {"output": result.output}
    for path in (tmp_path / "run").iterdir():
        if path.suffix in (".json", ".jsonl"):  # settings and the (pytest's) command line hold no figure
            records = [json.loads(line) for line in path.read_text().splitlines()] if path.suffix == ".jsonl" \
                else [json.loads(path.read_text())]
            texts[path.name] = json.dumps([{k: v for k, v in r.items() if k not in ("command_line", "config")} for r in records])
    import re

    for where, text in texts.items():
        text = re.sub(r"/[^\s\"']+", "", text.replace("test_eval", ""))  # paths (pytest's tmp folders say "test")
        assert "test" not in text.lower(), where


def test_init_from_starts_from_the_runs_weights_and_refuses_another_architecture(synthetic_dir, tmp_path):
    from kdcli.errors import RunError
    from kdcli.models import StackedMLP
    from kdcli.train import start_from

    run_training(config(synthetic_dir, tmp_path / "g"), "train-teacher")
    source = weights(tmp_path / "g" / "run")
    model = StackedMLP(hidden=[24], members=2)
    start_from(model, str(tmp_path / "g" / "run"))
    state = model.state_dict()
    assert all(torch.equal(state[k][m], source[k][0]) for k in source for m in range(2))
    with pytest.raises(RunError, match="hidden is \\[24\\], this run's \\[30\\]"):
        start_from(StackedMLP(hidden=[30]), str(tmp_path / "g" / "run"))


def test_the_specialists_claim_is_measured_against_its_control():
    from kdcli.report import specialist_rows

    def section(generalist, combined):
        test = {"generalist": {"errors_per_10k": generalist, "accuracy": 1 - generalist / 1e4},
                "combined": {"errors_per_10k": combined, "accuracy": 1 - combined / 1e4},
                "relative_accuracy_change": 0.0, "relative_error_change": (combined - generalist) / generalist,
                "by_coverage": []}
        return {"clusters": [[0, 1]], "test": test}

    def control(seed, errors):
        return {"seed": seed, "test": {"n_errors": errors, "n_examples": 10000},
                "command_line": f"kdcli train-teacher -c experiments/specialists-control-fashion.yaml --seed {seed}"}

    results = {"specialists-fashion": {"seed": 1, "specialists": section(1000, 980), "command_line": ""},
               "specialists-fashion-s2": {"seed": 2, "specialists": section(1010, 1000), "command_line": ""},
               "specialists-control-fashion": control(1, 990), "specialists-control-fashion-s2": control(2, 990)}
    rows = {r["experiment"].split(": ", 1)[1]: r for r in specialist_rows(results)}
    control_row = rows["control: the generalist trained further with the specialists' recipe, no clusters"]
    assert control_row["kdcli"] == "990.0 [990–990]"
    assert control_row["command"] == "kdcli train-teacher -c experiments/specialists-control-fashion.yaml --seed 1"
    over = rows["what specialists add over the control: relative change of errors"]
    # by hand: seed 1 (980 - 990) / 990 = -1.01%, seed 2 (1000 - 990) / 990 = +1.01%
    assert over["values"] == pytest.approx([-100 * 10 / 990, 100 * 10 / 990]) and over["seeds"] == 2
    assert over["kdcli"] == "+0.00% [-1.01–+1.01]"
