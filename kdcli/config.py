"""Experiment configuration: one frozen dataclass per run.

Values are merged once, in this order (later wins):

    defaults (the dataclass)  <  YAML experiment file  <  command-line flags

    cfg = load_config("experiments/distill.yaml", {"temperature": 8.0})

One name everywhere: a dataclass field is also the YAML key and the long
flag (`batch_size` <-> `--batch-size`). Unknown keys, wrong types and values
out of range raise `ConfigError`, whose message is one line a user can act on.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import itertools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DATASETS = ("mnist", "fashion-mnist")
N_CLASSES = 10
CHOICES = {
    "dataset": DATASETS,
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("onecycle", "cosine", "constant", "step"),
    "combine": ("mean_probs", "mean_logits"),
    "match": ("soft_targets", "logits"),
    "precision": ("fp32", "bf16"),
}


from .errors import ConfigError


@dataclass(frozen=True)
class Config:
    name: str = "run"  # default run directory is runs/<name>

    # data
    dataset: str = "mnist"
    data_dir: str | None = None  # else $KDCLI_DATA_DIR, else the user cache
    val_size: int = 0  # last N training images held out for choosing things
    train_subset: int | None = None  # N training examples, stratified by class
    subset_seed: int = 0  # fixes the subset independently of the run's seed
    train_limit: int | None = None  # first N training examples (smoke tests)
    test_limit: int | None = None  # first N test examples (smoke tests)
    omit_digits: list[int] = field(default_factory=list)  # removed from the transfer set
    keep_digits: list[int] = field(default_factory=list)  # the only digits kept
    jitter: int = 0  # random shift of up to this many pixels in each direction

    # model
    hidden: list[int] = field(default_factory=lambda: [800, 800])
    dropout_input: float = 0.0
    dropout_hidden: float = 0.0
    max_norm: float | None = None  # bound on each unit's incoming weight vector
    members: int = 1  # models trained together, stacked (ensembles, sweeps)
    init_from: str | None = None  # start from this run's weights (same architecture) instead of a fresh init

    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # SGD's (Nesterov) momentum; the final value when momentum_ramp > 0
    momentum_start: float = 0.5  # momentum_ramp: momentum at the first epoch
    momentum_ramp: int = 0  # epochs over which momentum rises linearly from momentum_start to momentum (0: constant)
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.25  # fraction of steps spent warming up (onecycle)
    lr_decay: float = 0.5  # schedule step: lr is multiplied by this every lr_step epochs
    lr_step: int = 100  # schedule step: epochs between decays (1: exponential decay per epoch)
    epochs: int = 10
    batch_size: int = 128
    precision: str = "fp32"  # or "bf16": training matmuls in bfloat16 (autocast); weights, optimiser, loss and evaluation stay fp32
    early_stopping: bool = False  # keep the epoch with the fewest validation errors

    # distillation
    teacher: str | None = None  # run directory or checkpoint of the teacher
    temperature: float = 1.0
    temperatures: list[float] | None = None  # one per member: a temperature sweep
    alpha: float = 1.0  # weight of the soft term; 1 = soft targets only
    match: str = "soft_targets"  # or "logits": squared error of zero-meaned logits, the T -> infinity limit (paper §2.1)
    combine: str = "mean_probs"  # how an ensemble teacher's members are combined
    # jittered transfer set: score every shift of every image once, before training, instead of
    # every batch (same targets up to float rounding; memory: images x (2 jitter + 1)^2 x classes)
    cache_teacher: bool = False

    # specialists (train-specialists; Hinton, Vinyals & Dean 2015 §5)
    generalist: str | None = None  # run directory of the generalist the specialists start from
    clusters: list[list[int]] | None = None  # each specialist's classes, by hand; else k-means (n_clusters)
    n_clusters: int | None = None  # K clusters by k-means on the generalist's validation covariance
    cluster_overlap: float | None = None  # a class also joins clusters it correlates with >= this on average
    top_k: int = 1  # inference: specialists whose cluster meets the generalist's top_k classes speak (paper: 1)
    combine_steps: int = 200  # inference: gradient steps on the combined distribution's logits

    # run
    seed: int = 1
    device: str = "auto"
    out: str | None = None
    expect_max_errors: int | None = None  # fail loudly when a result regresses
    eval_every: int = 1
    test_eval: bool = True  # false: a blind run (searches) computes, records and prints no test errors

    @property
    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def packaged_experiment(filename: str) -> Path:
    """An experiment file as shipped with kdcli: the package's kdcli/experiments in an installed wheel
    (the repository's experiments/ folder, mapped there by pyproject.toml), else, in a source checkout or an
    editable install, that experiments/ folder itself."""
    try:
        return Path(str(importlib.resources.files("kdcli.experiments").joinpath(filename)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "experiments" / filename
_HINTS = typing.get_type_hints(Config)


def load_config(path: str | Path | None, overrides: dict | None = None, explicit: dict | None = None) -> Config:
    """Merge defaults < YAML file < overrides, check every value, return the config.
    In `overrides` (flags) None means "not given"; `explicit` values (--set) apply as they are, null included."""
    values = read_yaml(Path(path)) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.update(explicit or {})
    return make_config(values, source=str(path) if path else "flags")


def load_sweep(path: str | Path, overrides: dict | None = None, explicit: dict | None = None) -> list[Config]:
    """An experiment file with a `grid:` mapping (key -> list of values) gives
    one config per combination, named <name>-<value>[-<value>...]."""
    values = read_yaml(Path(path), allow_grid=True)
    grid = values.pop("grid", None)
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: a sweep needs 'grid:' mapping keys to non-empty lists of values")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.update(explicit or {})
    configs = []
    for combination in itertools.product(*grid.values()):
        point = dict(values, **dict(zip(grid, combination)))
        suffix = "-".join(_label(v) for v in combination)
        point["name"] = f"{values.get('name', 'sweep')}-{suffix}"
        configs.append(make_config(point, source=str(path)))
    return configs


def _label(value) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value)) if len(set(value)) > 1 else str(value[0])
    return f"{value:g}" if isinstance(value, float) else str(value)


def make_config(values: dict, source: str = "config") -> Config:
    for key, value in values.items():
        check_key(key, source)
        values[key] = check_type(key, value, source)
    cfg = Config(**values)
    if cfg.temperatures and cfg.members == 1:
        cfg = dataclasses.replace(cfg, members=len(cfg.temperatures))
    validate(cfg)
    return cfg


def read_yaml(path: Path, _seen: tuple = (), allow_grid: bool = False) -> dict:
    """Read an experiment file; `base: other.yaml` inherits from another file."""
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read experiment file: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys to values, got {type(data).__name__}")
    if "grid" in data and not allow_grid:
        raise ConfigError(f"{path}: 'grid' describes a sweep: run it with kdcli sweep -c {path}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    merged = read_yaml(base_path, _seen + (base_path,), allow_grid)
    merged.update(data)
    return merged


def check_key(key: str, source: str) -> None:
    if key in FIELDS:
        return
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"{source}: unknown key '{key}'{hint}")


def check_type(key: str, value, source: str):
    """Return `value` coerced to the field's type, or raise ConfigError."""
    hint = _HINTS[key]
    ok, coerced = _coerce(hint, value)
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {_describe(hint)}, got {value!r}")
    return coerced


def _coerce(hint, value):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return True, None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(inner[0], value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `hidden: 30` means [30]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_coerce(item, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                return False, value
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is list:
        item = _describe(typing.get_args(hint)[0])
        if item.startswith("a list of "):  # clusters: [[0, 2, 4, 6], [5, 7, 9]]
            return "a list of lists of " + item[len("a list of "):]
        return f"a list of {item.split(' ', 1)[-1]}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        need(value in allowed, f"'{key}' must be one of {', '.join(allowed)}, got '{value}'")
    need(cfg.temperature > 0, f"'temperature' must be > 0, got {cfg.temperature}")
    need(all(t > 0 for t in cfg.temperatures or []), f"every entry of 'temperatures' must be > 0, got {cfg.temperatures}")
    need(cfg.temperatures is None or len(cfg.temperatures) > 0, "'temperatures' must not be empty")
    need(0.0 <= cfg.alpha <= 1.0, f"'alpha' must be in [0, 1], got {cfg.alpha}")
    need(len(cfg.hidden) > 0, "'hidden' must list at least one hidden layer size")
    need(all(h >= 1 for h in cfg.hidden), f"every hidden layer needs at least one unit, got {cfg.hidden}")
    need(0.0 <= cfg.dropout_input < 1.0, f"'dropout_input' must be in [0, 1), got {cfg.dropout_input}")
    need(0.0 <= cfg.dropout_hidden < 1.0, f"'dropout_hidden' must be in [0, 1), got {cfg.dropout_hidden}")
    need(cfg.max_norm is None or cfg.max_norm > 0, f"'max_norm' must be > 0 or null, got {cfg.max_norm}")
    need(cfg.members >= 1, f"'members' must be at least 1, got {cfg.members}")
    need(cfg.lr > 0, f"'lr' must be > 0, got {cfg.lr}")
    need(0.0 <= cfg.momentum < 1.0, f"'momentum' must be in [0, 1), got {cfg.momentum}")
    need(0.0 <= cfg.momentum_start < 1.0, f"'momentum_start' must be in [0, 1), got {cfg.momentum_start}")
    need(cfg.momentum_ramp >= 0, f"'momentum_ramp' must be >= 0 epochs, got {cfg.momentum_ramp}")
    need(cfg.momentum_ramp == 0 or cfg.optimizer == "sgd", "'momentum_ramp' ramps SGD's momentum: it needs 'optimizer: sgd'")
    need(0.0 < cfg.lr_decay <= 1.0, f"'lr_decay' must be in (0, 1], got {cfg.lr_decay}")
    need(cfg.lr_step >= 1, f"'lr_step' must be at least 1 epoch, got {cfg.lr_step}")
    need(cfg.weight_decay >= 0, f"'weight_decay' must be >= 0, got {cfg.weight_decay}")
    need(0.0 < cfg.warmup < 1.0, f"'warmup' must be in (0, 1), got {cfg.warmup}")
    need(cfg.epochs >= 1, f"'epochs' must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"'batch_size' must be at least 1, got {cfg.batch_size}")
    need(cfg.eval_every >= 1, f"'eval_every' must be at least 1, got {cfg.eval_every}")
    need(0 <= cfg.jitter <= 13, f"'jitter' must be between 0 and 13 pixels, got {cfg.jitter}")
    need(not cfg.cache_teacher or cfg.jitter > 0,
         "'cache_teacher' caches the teacher's outputs for every shift of a jittered transfer set: it needs 'jitter' > 0")
    need(0 <= cfg.val_size < 60000, f"'val_size' must be in [0, 60000), got {cfg.val_size}")
    need(cfg.train_subset is None or cfg.train_subset >= 10, f"'train_subset' must be at least 10 (one per class), got {cfg.train_subset}")
    need(cfg.train_limit is None or cfg.train_limit >= 1, f"'train_limit' must be at least 1, got {cfg.train_limit}")
    need(cfg.test_limit is None or cfg.test_limit >= 1, f"'test_limit' must be at least 1, got {cfg.test_limit}")
    need(not cfg.early_stopping or cfg.val_size > 0, "'early_stopping' needs a validation split: set 'val_size' > 0")
    need(cfg.expect_max_errors is None or cfg.test_eval,
         "'expect_max_errors' checks test errors, which a blind run (test_eval: false) does not compute")
    need(cfg.expect_max_errors is None or cfg.expect_max_errors >= 0, f"'expect_max_errors' must be >= 0, got {cfg.expect_max_errors}")
    digits = list(cfg.omit_digits) + list(cfg.keep_digits)
    need(all(0 <= d <= 9 for d in digits), f"digits must be between 0 and 9, got {digits}")
    need(not (cfg.omit_digits and cfg.keep_digits), "give either 'omit_digits' or 'keep_digits', not both")
    need(len(set(cfg.omit_digits)) < 10, "omitting every digit leaves nothing to train on")
    need(cfg.temperatures is None or cfg.members in (1, len(cfg.temperatures)),
         f"'members' ({cfg.members}) must equal the number of 'temperatures' ({len(cfg.temperatures or [])})")
    need(_valid_device(cfg.device), f"'device' must be auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'")
    problems += cluster_problems(cfg)
    need(cfg.cluster_overlap is None or -1 <= cfg.cluster_overlap <= 1,
         f"'cluster_overlap' is a correlation: it must be in [-1, 1] or null, got {cfg.cluster_overlap}")
    need(1 <= cfg.top_k <= N_CLASSES, f"'top_k' must be between 1 and {N_CLASSES}, got {cfg.top_k}")
    need(cfg.combine_steps >= 1, f"'combine_steps' must be at least 1, got {cfg.combine_steps}")
    if problems:
        raise ConfigError(problems[0])


def cluster_problems(cfg: Config) -> list[str]:
    """Specialists' clusters: classes in range, no empty cluster, K no larger than the number of classes.
    Overlapping clusters, and classes in no cluster, are allowed (paper §5)."""
    k = cfg.n_clusters
    if k is not None and not 1 <= k <= N_CLASSES:
        why = f"is larger than the number of classes ({N_CLASSES})" if k > N_CLASSES else "must be at least 1"
        return [f"'n_clusters' (K = {k}) {why}"]
    if cfg.clusters is None:
        return []
    if not cfg.clusters:
        return ["'clusters' must list at least one cluster of classes, e.g. [[0, 2, 4, 6], [5, 7, 9]]"]
    for i, cluster in enumerate(cfg.clusters):
        if not cluster:
            return [f"'clusters': cluster {i} is empty; every cluster needs at least one class"]
        bad = [c for c in cluster if not 0 <= c < N_CLASSES]
        if bad:
            return [f"'clusters': class {bad[0]} in cluster {i} is out of range 0-{N_CLASSES - 1}"]
        if len(set(cluster)) < len(cluster):
            twice = next(c for c in cluster if cluster.count(c) > 1)
            return [f"'clusters': class {twice} appears twice in cluster {i}"]
    if len(cfg.clusters) > N_CLASSES:
        return [f"'clusters' lists {len(cfg.clusters)} clusters, more than the number of classes ({N_CLASSES})"]
    if k is not None and k != len(cfg.clusters):
        return [f"'n_clusters' ({k}) differs from the number of 'clusters' given ({len(cfg.clusters)}): give one or the other"]
    return []


def _valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda", "mps"):
        return True
    return name.startswith("cuda:") and name[5:].isdigit()


def member_temperatures(cfg: Config) -> list[float]:
    """The distillation temperature of each member (a sweep gives one per member)."""
    return list(cfg.temperatures) if cfg.temperatures else [cfg.temperature] * cfg.members

