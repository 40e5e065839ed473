"""Run directories: what every command leaves behind.

    runs/<name>/
        config.yaml      the resolved config (defaults < YAML < flags)
        model.pt         the checkpoint: architecture + weights + config
        metrics.jsonl    one line per epoch
        result.json      test errors out of 10,000, per-class errors, timing, ...
        resume.pt        resumable training state, while a run is unfinished

Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`, which executes no pickled code. Every file
is written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml

from .models import StackedMLP, build_model

CHECKPOINT = "model.pt"
RESUME = "resume.pt"
RESULT = "result.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


class RunError(RuntimeError):
    """A missing, broken or mismatched run directory or checkpoint (one line)."""


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def save_checkpoint(path: Path, model: StackedMLP, config: dict, extra: dict | None = None) -> None:
    payload = {"arch": model.arch, "state_dict": model.state_dict(), "config": config, **(extra or {})}
    atomic_write(path, lambda f: torch.save(payload, f))


def checkpoint_path(run_or_file: str | Path, name: str = CHECKPOINT) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: is it a finished kdcli run directory?")
    return path


def read_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True), with every failure turned into one line."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise RunError(f"{path}: refused to load: not a plain-weights checkpoint ({first[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt: {str(err).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or "arch" not in payload or "state_dict" not in payload:
        raise RunError(f"{path}: not a kdcli checkpoint (no architecture or weights)")
    return payload


def load_model(run_or_file: str | Path) -> tuple[StackedMLP, dict]:
    """Rebuild a model from its checkpoint alone; returns (model, checkpoint payload)."""
    path = checkpoint_path(run_or_file)
    payload = read_checkpoint(path)
    try:
        model = build_model(payload["arch"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError, KeyError) as err:
        raise RunError(f"{path}: weights do not fit the architecture it records ({str(err).splitlines()[0][:120]})") from None
    return model, payload


def write_config(cfg, run_dir: Path) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(Path(run_dir) / CONFIG, lambda f: f.write(text.encode()))


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
