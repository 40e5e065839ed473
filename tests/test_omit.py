"""omit-class: the filtered transfer set, bias shifts, the 1-D fit, parsing, and the command end to end."""

import json

import pytest
import torch

import kdcli.train as train_module
from conftest import one_line_error, kdcli, REPO
from kdcli.config import ConfigError
from kdcli.evaluate import predict, shift_biases, summarize
from kdcli.models import StackedMLP
from kdcli.omit import (best_shift, bias_correction, digit_overrides, errors_along, fit_shift, parse_bias_shifts,
                        shift_grid)

# --- bias shifts -----------------------------------------------------------------

def test_a_bias_shift_changes_exactly_that_output():
    logits = torch.randn(2, 50, 10)  # (members, n, classes)
    before = logits.clone()
    diff = shift_biases(logits, {3: 3.5}) - logits
    assert torch.equal(logits, before)  # the input is left alone
    assert torch.allclose(diff[..., 3], torch.full((2, 50), 3.5))
    assert torch.equal(diff[..., [c for c in range(10) if c != 3]], torch.zeros(2, 50, 9))


def test_shifting_logits_is_shifting_the_output_units_bias():
    model = StackedMLP(hidden=[16], seeds=[0])
    images = torch.rand(40, 28, 28)
    expected = shift_biases(predict(model, images), {7: -7.6, 8: -7.6})
    with torch.no_grad():
        model.biases[-1][..., [7, 8]] -= 7.6  # the last layer's bias: (members, 1, classes)
    assert torch.allclose(predict(model, images), expected, atol=1e-5)


def test_error_curve_agrees_with_summarize_at_every_shift():
    log_probs = torch.randn(300, 10).log_softmax(-1)
    labels = torch.randint(0, 10, (300,))
    grid = shift_grid("omit")
    total, on_digits = errors_along(log_probs, labels, [3, 5], grid)
    for k in range(0, len(grid), 17):
        s = summarize(shift_biases(log_probs, {3: grid[k], 5: grid[k]}), labels)
        assert total[k] == s["n_errors"]
        assert on_digits[k] == s["per_class_errors"][3] + s["per_class_errors"][5]


# --- the 1-D fit on synthetic logits with a known optimum -------------------------

def synthetic_omit(margins_3, margin_others):
    """Label-3 examples lose to class 0 by `margins_3`: right once the 3-bias rises past the
    margin. Label-0 examples beat class 3 by `margin_others`: wrong once it rises past that."""
    rows, labels = [], []
    for m in margins_3:
        rows.append([0.0] + [-10.0] * 2 + [-m] + [-10.0] * 6)
        labels.append(3)
    for _ in range(5):
        rows.append([0.0] + [-10.0] * 2 + [-margin_others] + [-10.0] * 6)
        labels.append(0)
    return torch.tensor(rows), torch.tensor(labels)


def test_fit_finds_the_known_optimum_of_an_omitted_digit():
    log_probs, labels = synthetic_omit([0.55, 1.25, 2.45], 3.05)  # no errors for shifts in (2.45, 3.05)
    assert fit_shift(log_probs, labels, [3], shift_grid("omit")) == 2.5  # the smallest shift of the plateau


def test_fit_finds_the_known_optimum_of_kept_digits():
    # label 1 loses to 7 by 7.55 (right once the 7/8 biases drop below -7.55);
    # label 8 beats 1 by 9.05 (wrong once they drop below -9.05)
    rows = [[-10.0, 0.0] + [-10.0] * 5 + [7.55, -10.0, -10.0]] * 4 + [[-10.0, -9.05] + [-10.0] * 6 + [0.0, -10.0]] * 3
    labels = torch.tensor([1] * 4 + [8] * 3)
    assert fit_shift(torch.tensor(rows), labels, [7, 8], shift_grid("keep")) == -7.6


def test_ties_go_to_the_smallest_shift():
    assert best_shift([-0.3, -0.1, 0.1, 0.3], [0, 0, 0, 0]) == -0.1
    assert best_shift([-1.0, 0.0, 1.0, 2.0], [3, 4, 3, 3]) == -1.0
    assert best_shift([-1.0, 0.0, 1.0], [5, 5, 2]) == 1.0


def test_validation_and_test_protocols_are_fitted_separately():
    val = synthetic_omit([0.55, 1.25, 2.45], 3.05)  # optimum 2.5 on validation
    test = synthetic_omit([4.45, 4.45, 4.45], 5.05)  # optimum 4.5 on test
    section = bias_correction("omit", [3], [3], test, val, user_shifts={3: 3.5})
    p = section["protocols"]
    assert list(p) == ["none", "user", "validation", "test_optimised"]
    assert (p["validation"]["shift"], p["test_optimised"]["shift"]) == (2.5, 4.5)
    assert "test set" in p["test_optimised"]["label"]
    assert p["none"]["n_errors"] == p["none"]["omitted_n_errors"] == 3 and p["none"]["omitted_share_correct"] == 0
    assert p["validation"]["n_errors"] == 3 and p["validation"]["val_n_errors"] == 0
    assert p["test_optimised"]["n_errors"] == 0 and p["test_optimised"]["omitted_share_correct"] == 1
    assert p["user"]["shifts"] == {"3": 3.5} and p["user"]["n_errors"] == 3
    assert p["none"]["per_class_errors"] == [0, 0, 0, 3, 0, 0, 0, 0, 0, 0]
    assert len(section["curve"]["shifts"]) == len(section["curve"]["test_n_errors"]) == 171
    assert section["curve"]["test_n_errors"][section["curve"]["shifts"].index(0.0)] == p["none"]["n_errors"]


# --- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("specs, expected", [
    ("3=+3.5", {3: 3.5}),
    ("7=-7.6,8=-7.6", {7: -7.6, 8: -7.6}),
    (["7=-7.6", "8=-7.6"], {7: -7.6, 8: -7.6}),
    (" 3 = 2 ", {3: 2.0}),
])
def test_bias_shift_strings(specs, expected):
    assert parse_bias_shifts(specs) == expected


@pytest.mark.parametrize("spec, message", [
    ("3=abc", "'abc' is not a number"),
    ("x=1", "'x' is not a digit"),
    ("3", "expected DIGIT=SHIFT"),
    ("", "expected DIGIT=SHIFT"),
    ("3=", "expected DIGIT=SHIFT"),
    ("12=1", "'12' is not a digit 0-9"),
    ("-1=2", "not a digit"),
    ("3=1,3=2", "given twice"),
    ("3=inf", "finite"),
])
def test_malformed_bias_shift_strings(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_bias_shifts(spec)


def test_digit_flags_become_config_overrides():
    assert digit_overrides(["3"], None, None) == {"omit_digits": [3], "keep_digits": []}
    assert digit_overrides(["5", "3"], "3,1", None)["omit_digits"] == [1, 3, 5]
    assert digit_overrides(None, None, "8, 7") == {"keep_digits": [7, 8], "omit_digits": []}
    assert digit_overrides(None, None, None) == {}


# --- the command end to end on the smoke experiments -----------------------------------

@pytest.fixture
def transfer_spy(monkeypatch):
    """What run_training really trains on: (transfer set labels, training labels before filtering)."""
    seen = {}
    build = train_module.build_transfer_set

    def spy(cfg, data, device):
        transfer = build(cfg, data, device)
        seen.update(labels=transfer.labels.cpu(), train_y=data.train_y.cpu())
        return transfer

    monkeypatch.setattr(train_module, "build_transfer_set", spy)
    return seen


def test_omit_class_end_to_end(teacher_run, data_dir, tmp_path, transfer_spy):
    out = tmp_path / "omit"
    result = kdcli("omit-class", "-c", "experiments/smoke/omit-3.yaml", "--teacher", teacher_run,
                   "--data-dir", data_dir, "--out", out, "--bias-shift", "3=+3.5")
    assert result.exit_code == 0, result.output
    # the transfer set: no 3 at all, and every example of the other digits
    labels, train_y = transfer_spy["labels"], transfer_spy["train_y"]
    assert not (labels == 3).any()
    assert torch.equal(torch.bincount(labels, minlength=10)[[0, 1, 2, 4, 5, 6, 7, 8, 9]],
                       torch.bincount(train_y, minlength=10)[[0, 1, 2, 4, 5, 6, 7, 8, 9]])
    saved = json.loads((out / "result.json").read_text())
    section = saved["bias_correction"]
    assert (section["digits"], section["mode"], section["omitted_digits"]) == ([3], "omit", [3])
    assert set(section["protocols"]) == {"none", "user", "validation", "test_optimised"}
    assert section["protocols"]["none"]["n_errors"] == saved["test"]["n_errors"]
    assert section["protocols"]["user"]["shift"] == 3.5
    curve = section["curve"]
    assert section["protocols"]["validation"]["shift"] == best_shift(curve["shifts"], curve["val_n_errors"])
    assert section["protocols"]["test_optimised"]["n_errors"] == min(curve["test_n_errors"])
    assert saved["n_transfer"] == len(labels) and saved["config"]["omit_digits"] == [3]
    assert (out / "bias.png").stat().st_size > 1000
    assert "test_optimised" in result.stdout and "chosen on the test set" in result.stdout


def test_keep_trains_on_only_the_named_digits(teacher_run, data_dir, tmp_path, transfer_spy):
    out = tmp_path / "keep"
    result = kdcli("omit-class", "-c", "experiments/smoke/only-7-8.yaml", "--teacher", teacher_run,
                   "--data-dir", data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    labels, train_y = transfer_spy["labels"], transfer_spy["train_y"]
    assert set(labels.tolist()) == {7, 8}
    assert len(labels) == int(((train_y == 7) | (train_y == 8)).sum())
    section = json.loads((out / "result.json").read_text())["bias_correction"]
    assert (section["digits"], section["mode"]) == ([7, 8], "keep")
    assert section["omitted_digits"] == [0, 1, 2, 3, 4, 5, 6, 9]
    assert "user" not in section["protocols"] and section["protocols"]["validation"]["shift"] <= 2.0
    assert section["curve"]["shifts"][0] == -15.0


def test_digit_flags_replace_the_experiment_files_choice(tmp_path):
    result = kdcli("omit-class", "--digit", "5", "--digits", "3", "--dry-run")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout[result.stdout.index("{"):])
    assert (cfg["omit_digits"], cfg["keep_digits"], cfg["name"], cfg["val_size"]) == ([3, 5], [], "omit-3-5", 10000)
    result = kdcli("omit-class", "-c", "experiments/omit-3.yaml", "--keep", "7,8", "--dry-run")
    cfg = json.loads(result.stdout[result.stdout.index("{"):])
    assert (cfg["omit_digits"], cfg["keep_digits"], cfg["name"]) == ([], [7, 8], "only-7-8")


def test_eval_with_a_bias_shift(teacher_run, data_dir, tmp_path):
    plain = kdcli("eval", teacher_run, "--data-dir", data_dir, "--json", tmp_path / "plain.json")
    shifted = kdcli("eval", teacher_run, "--data-dir", data_dir, "--json", tmp_path / "shifted.json",
                    "--bias-shift", "3=+100")
    assert plain.exit_code == 0 and shifted.exit_code == 0, shifted.output
    before = json.loads((tmp_path / "plain.json").read_text())["test"]
    after = json.loads((tmp_path / "shifted.json").read_text())
    assert after["bias_shifts"] == {"3": 100.0}
    # a huge 3-bias: everything is called a 3, so exactly the non-3s are wrong
    assert after["test"]["n_errors"] == after["test"]["n_examples"] - after["test"]["per_class_count"][3]
    assert before["n_errors"] != after["test"]["n_errors"]


@pytest.mark.parametrize("args, expected", [
    (["--digit", "12"], "outside 0-9"),
    (["--digit", "three"], "not a digit"),
    (["--digits", "0,1,2,3,4,5,6,7,8,9"], "every digit"),
    (["--keep", ""], "names no digit"),
    (["--keep", "0,1,2,3,4,5,6,7,8,9"], "nothing is omitted"),
    (["--digit", "3", "--keep", "7,8"], "not both"),
    (["--digits", "3", "--keep", "7"], "not both"),
    (["--digit", "3", "--bias-shift", "3=abc"], "not a number"),
    (["--digit", "3", "--bias-shift", "x=1"], "not a digit"),
    (["--bias-shift", "3"], "DIGIT=SHIFT"),
    (["-c", "experiments/distill.yaml"], "needs digits to omit or keep"),
    (["--T", "0"], "temperature"),
])
def test_bad_input_is_one_line_exit_2_before_training(args, expected, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "run_training", lambda *a, **k: pytest.fail("trained despite bad input"))
    line = one_line_error(kdcli("omit-class", *args, "--out", tmp_path / "o"))
    assert expected in line
    assert not (tmp_path / "o").exists()


def test_no_validation_split_is_refused(tmp_path):
    experiment = tmp_path / "omit.yaml"
    experiment.write_text(f"base: {REPO / 'experiments' / 'omit-3.yaml'}\nval_size: 0\n")
    assert "validation split" in one_line_error(kdcli("omit-class", "-c", experiment, "--out", tmp_path / "o"))


@pytest.mark.parametrize("shift, expected", [("3=abc", "not a number"), ("x=1", "not a digit"), ("3", "DIGIT=SHIFT")])
def test_eval_rejects_a_malformed_bias_shift(shift, expected):
    assert expected in one_line_error(kdcli("eval", "runs/does-not-exist", "--bias-shift", shift))


def test_a_blind_omit_class_run_fits_its_shift_on_validation_and_scores_no_test_image(teacher_run, data_dir, tmp_path):
    experiment = tmp_path / "omit-3-blind.yaml"
    experiment.write_text(f"base: {REPO / 'experiments/smoke/omit-3.yaml'}\ntest_eval: false\n")
    out = tmp_path / "omit"
    result = kdcli("omit-class", "-c", experiment, "--teacher", teacher_run, "--data-dir", data_dir, "--out", out,
                   "--bias-shift", "3=+3.5")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "result.json").read_text())
    section = saved["bias_correction"]
    assert set(section["protocols"]) == {"none", "user", "validation"}  # no test-optimised protocol
    curve = section["curve"]
    assert set(curve) == {"shifts", "val_n_errors", "val_omitted_n_errors"}
    assert section["protocols"]["validation"]["val_n_errors"] == min(curve["val_n_errors"])
    assert "test" not in saved and (out / "bias.png").stat().st_size > 1000
    assert "blind" in result.stdout and "test errors" not in result.stdout
