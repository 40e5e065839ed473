"""--set key=value: every Config field reachable from the command line, typed as in YAML, checked as in YAML."""

import dataclasses
import json

import pytest

from conftest import kdcli, one_line_error
from kdcli.config import Config

# one value per field that differs from distill.yaml's and passes validation (with the extra fields some need)
SAMPLES = {
    "name": ("x", {}), "dataset": ("fashion-mnist", {}), "data_dir": ("/data/idx", {}), "val_size": (5000, {}),
    "train_subset": (1800, {}), "subset_seed": (4, {}), "train_limit": (1000, {}), "test_limit": (500, {}),
    "omit_digits": ([3], {}), "keep_digits": ([7, 8], {}), "jitter": (2, {}), "hidden": ([30, 30], {}),
    "dropout_input": (0.2, {}), "dropout_hidden": (0.5, {}), "max_norm": (3.5, {}), "members": (3, {}),
    "optimizer": ("adam", {}), "lr": (0.01, {}), "momentum": (0.99, {}), "momentum_start": (0.6, {}),
    "momentum_ramp": (50, {}), "weight_decay": (0.0001, {}), "schedule": ("step", {}), "warmup": (0.1, {}),
    "lr_decay": (0.25, {}), "lr_step": (7, {}), "epochs": (3, {}), "batch_size": (64, {}),
    "precision": ("bf16", {}), "early_stopping": (True, {"val_size": 5000}), "teacher": ("runs/mine", {}),
    "temperature": (8.0, {}), "temperatures": ([2.0, 4.0], {}), "alpha": (0.7, {}), "match": ("logits", {}),
    "combine": ("mean_logits", {}), "cache_teacher": (True, {"jitter": 2}), "generalist": ("runs/g", {}), "clusters": ([[3, 5], [4, 9]], {}),
    "n_clusters": (3, {}), "cluster_overlap": (0.5, {}), "top_k": (2, {}), "combine_steps": (50, {}),
    "init_from": ("runs/generalist", {}), "seed": (9, {}), "device": ("cpu", {}), "out": ("elsewhere/run", {}), "expect_max_errors": (80, {}),
    "eval_every": (5, {}), "test_eval": (False, {}),
}


def dry_run(*sets):
    result = kdcli("distill", *[a for s in sets for a in ("--set", s)], "--dry-run")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_the_samples_cover_every_config_field():
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_every_field_is_settable_from_the_command_line(field):
    value, needs = SAMPLES[field]
    sets = [f"{k}={json.dumps(v)}" for k, v in needs.items()] + [f"{field}={json.dumps(value)}"]
    assert dry_run(*sets)[field] == value


def test_dashes_and_null_and_lists_read_as_in_yaml():
    resolved = dry_run("max-norm=null", "hidden=[12, 34]", "temperature=4")
    assert resolved["max_norm"] is None and resolved["hidden"] == [12, 34] and resolved["temperature"] == 4.0


@pytest.mark.parametrize("args, expected", [
    (["--set", "temprature=4"], "unknown key 'temprature' (did you mean 'temperature'?)"),
    (["--set", "jitter=two"], "'jitter' must be an integer"),
    (["--set", "jitter=20"], "'jitter' must be between 0 and 13"),
    (["--set", "jitter"], "--set expects key=value"),
    (["--set", "hidden=[1,"], "cannot read"),
    (["--set", "epochs=3", "--epochs", "4"], "given both as --epochs and with --set"),
])
def test_bad_sets_are_one_line(args, expected):
    assert expected in one_line_error(kdcli("distill", *args, "--dry-run"))


def test_a_flag_and_an_equal_set_agree():
    assert dry_run("epochs=4")["epochs"] == 4
    result = kdcli("distill", "--epochs", "4", "--set", "epochs=4", "--dry-run")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["train-teacher", "distill", "train-ensemble", "train-specialists", "omit-class", "sweep"])
def test_every_training_command_takes_set(command):
    result = kdcli(command, "--help")
    assert "--set" in result.stdout
