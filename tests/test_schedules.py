"""Schedule options of the one loop: step decay, exponential decay (lr_step 1), a momentum ramp;
and blind runs (test_eval: false), which compute no test errors."""

import json

import pytest
import torch

from conftest import interrupt_after_epoch, kdcli, one_line_error, synthetic_config as config, train_blind, weights
from kdcli.config import ConfigError, make_config
from kdcli.train import momentum_at, run_training


def epoch_lrs(cfg, steps_per_epoch=3):
    """The learning rate each epoch's steps run at, read off the optimiser as the loop drives it."""
    from kdcli.train import make_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs):
        seen = set()
        for _ in range(steps_per_epoch):
            seen.add(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert len(seen) == 1, "the lr changes only between epochs"
        lrs.append(seen.pop())
    return lrs


def test_step_schedule_halves_the_lr_every_lr_step_epochs():
    cfg = make_config(dict(lr=0.01, schedule="step", lr_decay=0.5, lr_step=3, epochs=8))
    # by hand: epochs 1-3 at 0.01, 4-6 at 0.005, 7-8 at 0.0025
    assert epoch_lrs(cfg) == pytest.approx([0.01] * 3 + [0.005] * 3 + [0.0025] * 2)


def test_lr_step_1_is_exponential_decay_per_epoch():
    cfg = make_config(dict(lr=0.1, schedule="step", lr_decay=0.9, lr_step=1, epochs=4))
    assert epoch_lrs(cfg) == pytest.approx([0.1, 0.09, 0.081, 0.0729])


def test_momentum_ramps_linearly_then_stays():
    cfg = make_config(dict(momentum_start=0.5, momentum=0.99, momentum_ramp=4))
    # by hand: 0.5 + 0.49 * epoch / 4, 0-based epochs, capped at 0.99
    assert [momentum_at(cfg, e) for e in range(6)] == pytest.approx([0.5, 0.6225, 0.745, 0.8675, 0.99, 0.99])
    assert momentum_at(make_config({"momentum": 0.9}), 7) == 0.9  # no ramp: constant


def test_the_loop_runs_the_schedule_and_the_ramp_and_records_them(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path, epochs=4, schedule="step", lr_decay=0.5, lr_step=2,
                 momentum_start=0.5, momentum=0.9, momentum_ramp=2)
    run_training(cfg, "train-teacher")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # "lr" is the rate after the epoch's last step (the next epoch's), as for every schedule
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.025, 0.025, 0.0125])
    assert [r["momentum"] for r in records] == pytest.approx([0.5, 0.7, 0.9, 0.9])


def test_a_scheduled_run_resumes_exactly(synthetic_dir, tmp_path):
    kw = dict(epochs=4, schedule="step", lr_decay=0.5, lr_step=1, momentum_ramp=3, momentum_start=0.3,
              dropout_hidden=0.3, jitter=1)
    run_training(config(synthetic_dir, tmp_path / "full", **kw), "train-teacher")
    cut = config(synthetic_dir, tmp_path / "cut", **kw)
    interrupt_after_epoch(cut, 3)
    run_training(cut, "train-teacher", resume=True)
    full, resumed = weights(tmp_path / "full" / "run"), weights(tmp_path / "cut" / "run")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@pytest.mark.parametrize("values, message", [
    (dict(lr_decay=0.0), "'lr_decay' must be in (0, 1]"),
    (dict(lr_decay=1.5), "'lr_decay' must be in (0, 1]"),
    (dict(lr_step=0), "'lr_step' must be at least 1"),
    (dict(momentum_ramp=-1), "'momentum_ramp' must be >= 0"),
    (dict(momentum_start=1.0), "'momentum_start' must be in [0, 1)"),
    (dict(momentum_ramp=10, optimizer="adam"), "needs 'optimizer: sgd'"),
    (dict(schedule="steps"), "'schedule' must be one of"),
    (dict(test_eval=False, expect_max_errors=70), "blind run"),
])
def test_out_of_range_schedule_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_config(values)


def test_a_blind_run_computes_no_test_errors(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path, val_size=200, test_eval=False)
    result = run_training(cfg, "train-teacher")
    figures = {k: v for k, v in result.items() if k not in ("config", "command_line")}
    text = json.dumps(figures) + (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "test" not in text.replace("test_eval", "")  # no test errors, NLL or confusion anywhere
    assert result["test_eval"] is False and len(result["val_errors"]) == 1


def test_a_blind_run_prints_validation_errors_only(synthetic_dir, tmp_path):
    result = train_blind(synthetic_dir, tmp_path, epochs=2)
    assert result.exit_code == 0, result.output
    assert "validation errors" in result.stdout and "test errors" not in result.stdout
    listed = kdcli("runs", tmp_path)
    assert listed.exit_code == 0 and "blind" in listed.stdout, listed.output
    # its test figure comes afterwards, by an explicit eval
    scored = kdcli("eval", tmp_path / "run")
    assert scored.exit_code == 0, scored.output
    assert "test errors" in scored.stdout


def test_every_search_experiment_is_blind():
    from pathlib import Path
    from kdcli.config import load_config, load_sweep, read_yaml

    search = Path(__file__).resolve().parent.parent / "experiments" / "search"
    for path in sorted(search.glob("*.yaml")):
        loader = load_sweep if "grid" in read_yaml(path, allow_grid=True) else lambda p: [load_config(p)]
        assert all(not cfg.test_eval for cfg in loader(path)), f"{path.name} computes test errors"


def test_a_blind_run_never_opens_the_test_files(synthetic_dir, tmp_path, monkeypatch):
    import kdcli.data as data_module

    read = data_module.read_split

    def train_only(paths, split):
        assert split != "test", "a blind run opened the test files"
        return read(paths, split)

    monkeypatch.setattr(data_module, "read_split", train_only)
    run_training(config(synthetic_dir, tmp_path, val_size=200, test_eval=False), "train-teacher")


def test_softness_by_hand():
    from kdcli.evaluate import softness

    uniform = softness(torch.zeros(4, 10), 1.0)
    assert uniform["entropy_nats"] == pytest.approx(2.302585, abs=1e-6)
    assert (uniform["top_probability"], uniform["other_mass"]) == pytest.approx((0.1, 0.9))
    # logits log(9) on one class, 0 on nine: p = 1/2 there, 1/18 each elsewhere; T = 2 halves the logits
    logits = torch.zeros(1, 10)
    logits[0, 3] = torch.log(torch.tensor(9.0))
    assert softness(logits, 1.0)["top_probability"] == pytest.approx(0.5)
    assert softness(logits, 2.0)["top_probability"] == pytest.approx(3 / 12)


def test_kdcli_softness_reads_the_training_images_only(synthetic_dir, tmp_path, monkeypatch):
    run_training(config(synthetic_dir, tmp_path, val_size=200), "train-teacher")
    import kdcli.data as data_module

    read = data_module.read_split
    monkeypatch.setattr(data_module, "read_split", lambda paths, split: read(paths, split) if split == "train"
                        else pytest.fail("softness opened the test files"))
    result = kdcli("softness", tmp_path / "run", "--T", "1", "--T", "20", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["n_images"] == 400 and [s["temperature"] for s in saved["softness"]] == [1.0, 20.0]
    assert saved["softness"][1]["entropy_nats"] > saved["softness"][0]["entropy_nats"]
    assert "must be > 0" in one_line_error(kdcli("softness", tmp_path / "run", "--T", "0"))
