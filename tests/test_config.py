"""Config precedence (defaults < YAML < flags) and every invalid value."""

import pytest

from kdcli.config import Config, ConfigError, load_config, make_config


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write(tmp_path, "epochs: 7\nlr: 0.2\n")
    cfg = load_config(path, {"lr": 0.01, "seed": None})
    assert cfg.epochs == 7  # from YAML
    assert cfg.lr == 0.01  # flag beats YAML
    assert cfg.seed == Config().seed  # None means "flag not given"
    assert cfg.batch_size == Config().batch_size  # default


def test_base_file_is_inherited_and_overridden(tmp_path):
    write(tmp_path, "hidden: [30, 30]\nepochs: 3\n", "base.yaml")
    cfg = load_config(write(tmp_path, "base: base.yaml\nepochs: 5\n"))
    assert cfg.hidden == [30, 30] and cfg.epochs == 5


def test_shipped_experiments_all_load():
    from pathlib import Path

    from kdcli.config import load_sweep, read_yaml
    for path in sorted(Path("experiments").rglob("*.yaml")):
        if "grid" in read_yaml(path, allow_grid=True):  # a grid is inherited through base: too
            assert len(load_sweep(path)) >= 2
        else:
            load_config(path)


def test_unknown_key_suggests_the_near_miss(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'temprature'.*did you mean 'temperature'"):
        load_config(write(tmp_path, "temprature: 20\n"))


@pytest.mark.parametrize("text, message", [
    ("epochs: [1, 2\n", "malformed YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("epochs: ten\n", "'epochs' must be an integer"),
    ("lr: fast\n", "'lr' must be a number"),
    ("early_stopping: 3\n", "'early_stopping' must be true or false"),
    ("hidden: [a, b]\n", "'hidden' must be a list of integers"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("values, message", [
    ({"temperature": 0}, "temperature"),
    ({"temperature": -2.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"hidden": []}, "hidden"),
    ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"dataset": "cifar"}, "dataset"),
    ({"omit_digits": [3], "keep_digits": [7]}, "not both"),
    ({"omit_digits": [11]}, "between 0 and 9"),
    ({"omit_digits": list(range(10))}, "every digit"),
    ({"dropout_hidden": 1.0}, "dropout_hidden"),
    ({"device": "tpu"}, "device"),
    ({"members": 0}, "members"),
    ({"early_stopping": True}, "val_size"),
    ({"cache_teacher": True}, "'cache_teacher' .* needs 'jitter' > 0"),
])
def test_invalid_values(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(dict(values))


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_temperature_sweep_sets_members():
    cfg = make_config({"temperatures": [1, 2, 4]})
    assert cfg.members == 3 and cfg.temperatures == [1.0, 2.0, 4.0]
