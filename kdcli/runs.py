"""Run directories: what every command leaves behind.

    runs/<name>/
        config.yaml      the resolved config (defaults < YAML < flags)
        model.pt         the checkpoint: architecture + weights + config
        metrics.jsonl    one line per epoch
        result.json      test errors out of 10,000, per-class errors, timing, ...
        resume.pt        resumable training state, while a run is unfinished
        status.json      command, process id and state (running, interrupted, failed, finished)

    for run in scan_runs("runs"): print(run["path"], run["status"])

Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`, which executes no pickled code. Every file
is written to a temporary name and renamed, so a crash, a Ctrl-C or a full
disk never leaves half a file, and the previous version stays intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shlex
import tempfile
import time
import warnings
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
STATUS = "status.json"

# what `kdcli runs` shows; "incomplete" is a run stopped before its first epoch finished
STATES = ("running", "finished", "interrupted", "failed", "incomplete")


from .errors import Diverged, RunError, WriteError


def fresh_command(command_line: str) -> str:
    """A recorded command line as one runs it anew: without the --force or --resume of the run that recorded it."""
    return shlex.join(w for w in shlex.split(command_line) if w not in ("--force", "--resume"))


def first_line(err: BaseException, limit: int = 120) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage(path: Path, write) -> str:
    """write(file_object) into a temp file beside `path`; returns the temp file's name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or first_line(err)}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(f"cannot write {path}: {err.strerror or first_line(err)}; "
                             f"the previous {path.name} is unchanged") from None
        raise
    return tmp


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temp file beside `path`, then rename it over `path`."""
    atomic_write_all([(Path(path), write)])


def atomic_write_all(items: list[tuple[Path, object]]) -> None:
    """Write every file to a temp name first, then rename them all: a full disk
    while writing the second file leaves the first one's old version too."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in items:
            staged.append((_stage(Path(path), write), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as err:
        raise WriteError(f"cannot write {err.filename or staged[-1][1]}: {err.strerror or first_line(err)}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def json_writer(data: dict):
    return lambda f: f.write((json.dumps(data, indent=2) + "\n").encode())


def checkpoint_writer(model: StackedMLP, config: dict, extra: dict | None = None):
    payload = {"arch": model.arch, "state_dict": model.state_dict(), "config": config, **(extra or {})}
    return lambda f: torch.save(payload, f)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, json_writer(data))


def save_checkpoint(path: Path, model: StackedMLP, config: dict, extra: dict | None = None) -> None:
    atomic_write(path, checkpoint_writer(model, config, extra))


def checkpoint_path(run_or_file: str | Path, name: str = CHECKPOINT) -> Path:
    path = Path(run_or_file)
    if path.is_dir():
        path = path / name
        if not path.is_file():
            state = run_status(path.parent)
            why = {"running": "the run is still training", "interrupted": "the run was interrupted: finish it with --resume",
                   "failed": "the run failed"}.get(state, "is it a finished kdcli run directory?")
            raise RunError(f"no checkpoint at {path}: {why}")
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}: is it a finished kdcli run directory?")
    return path


def read_checkpoint(path: Path) -> dict:
    """torch.load(weights_only=True), with every failure turned into one line."""
    path = Path(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise RunError(f"{path}: cannot read checkpoint: {err.strerror or first_line(err)}") from None
    if not is_zip:  # torch.save writes a zip archive; anything else is foreign, or cut short
        raise RunError(f"{path}: not a readable checkpoint (truncated, corrupt or not a PyTorch file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        why = f"it calls {found.group(1)}" if found else "it holds more than tensors and plain values"
        raise RunError(f"{path}: refused to load: not a plain-weights checkpoint, loading it could run code ({why})") from None
    except Exception as err:  # a damaged archive fails in many ways inside torch
        raise RunError(f"{path}: not a readable checkpoint (truncated or corrupt: {first_line(err)})") from None
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
    except Exception as err:  # arch of the wrong kind, weights of another architecture
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]  # [0] is a header
        why = lines[0][:160] if lines else first_line(err)
        raise RunError(f"{path}: weights do not fit the architecture it records ({why})") from None
    return model, payload


def write_config(cfg, run_dir: Path) -> None:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(Path(run_dir) / CONFIG, lambda f: f.write(text.encode()))


def save_figure(fig, path: Path) -> Path:
    """A matplotlib Figure as an image at `path`, its format taken from the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def append_metrics(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / METRICS
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or first_line(err)}") from None


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl as the resumable state knows it (an epoch logged just
    before an interrupt, but not saved, is not logged twice)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(Path(run_dir) / METRICS, lambda f: f.write(text.encode()))


def read_result(run_dir: Path) -> dict | None:
    return _read_json(Path(run_dir) / RESULT)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --- status: running, interrupted, failed, finished -------------------------

def write_status(run_dir: Path, state: str, **fields) -> None:
    previous = _read_json(Path(run_dir) / STATUS) or {}
    status = {**previous, **fields, "state": state, "pid": os.getpid(),
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(run_dir) / STATUS, status)


def read_status(run_dir: Path) -> dict:
    return _read_json(Path(run_dir) / STATUS) or {}


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def running_pid(run_dir: Path) -> int | None:
    """The id of another live process training into `run_dir`, else None."""
    status = read_status(run_dir)
    pid = status.get("pid")
    if status.get("state") == "running" and pid != os.getpid() and _alive(pid):
        return pid
    return None


def run_status(run_dir: Path) -> str:
    """One of STATES, from status.json and the files present."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    state = status.get("state")
    if state == "running" and not _alive(status.get("pid")):
        state = None  # killed without a chance to say so: judge by the files
    if state in STATES:
        return state
    if (run_dir / RESULT).is_file():
        return "finished"
    if (run_dir / RESUME).is_file():
        return "interrupted"
    return "incomplete"


@contextlib.contextmanager
def recording_status(run_dir: Path, command: str, command_line: str, saved_epoch: int = 0):
    """status.json says running while the block runs, then how it ended and the
    last epoch saved in resume.pt (the block sets progress["saved_epoch"])."""
    owner = running_pid(run_dir)
    if owner is not None:
        raise RunError(f"{run_dir} is being trained by process {owner}: wait for it, or stop it first")
    write_status(run_dir, "running", command=command, command_line=command_line, error=None, saved_epoch=saved_epoch)
    progress = {"saved_epoch": saved_epoch}
    try:
        yield progress
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt):
            state = "interrupted" if (run_dir / RESUME).is_file() else "incomplete"
        else:
            state = "failed"
        error = None if isinstance(err, KeyboardInterrupt) else str(err) if isinstance(err, Diverged) else first_line(err, 200)
        with contextlib.suppress(OSError, RunError):  # a full disk must not hide the first problem
            write_status(run_dir, state, error=error, saved_epoch=progress["saved_epoch"])
        raise
    write_status(run_dir, "finished", saved_epoch=None)


def scan_runs(root: Path) -> list[dict]:
    """One row per run directory under `root` (any depth): what `kdcli runs` shows."""
    root = Path(root)
    dirs = sorted({p.parent for name in (CONFIG, STATUS, RESULT) for p in root.rglob(name)})
    return [describe_run(d, root) for d in dirs]


def describe_run(run_dir: Path, root: Path | None = None) -> dict:
    status = read_status(run_dir)
    state = run_status(run_dir)
    # a forced re-run keeps the previous result.json until it finishes: show the run in progress
    result = (read_result(run_dir) or {}) if state == "finished" or not status else {}
    config = result.get("config")
    if config is None:
        try:
            config = yaml.safe_load((run_dir / CONFIG).read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            config = None
    config = config if isinstance(config, dict) else {}
    history = read_metrics(run_dir)
    epochs = config.get("epochs")
    # epochs done: as saved in resume.pt once stopped, as logged while running
    done = status.get("saved_epoch") if state in ("interrupted", "failed") else None
    if done is None and state in ("running", "interrupted", "failed") and history:
        done = history[-1].get("epoch", len(history))
    state_text = f"{state} {done}/{epochs or '?'}" if done is not None else state
    wall = result.get("wall_seconds")
    if wall is None and history:
        wall = sum(r.get("seconds", 0) for r in history)
    return {
        "path": str(run_dir.relative_to(root)) if root and run_dir != root else str(run_dir),
        "command": result.get("command") or status.get("command") or "",
        "temperature": config.get("temperatures") or (config.get("temperature") if config.get("teacher") else None),
        "alpha": config.get("alpha") if config.get("teacher") else None,
        "hidden": config.get("hidden"),
        "seed": config.get("seed"),
        "status": state,
        "status_text": state_text,
        "error": status.get("error") if state == "failed" else None,
        "test_errors": _test_errors(result, history),
        "blind": config.get("test_eval") is False,  # a search run: validation errors only
        "val_errors": result.get("val_errors") or next((r["val_errors"] for r in reversed(history) if r.get("val_errors")), []),
        "wall_seconds": wall,
    }


def read_metrics(run_dir: Path) -> list[dict]:
    """The epochs logged so far; a line cut short by a crash is skipped."""
    try:
        lines = (run_dir / METRICS).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def _test_errors(result: dict, history: list[dict]) -> list[int]:
    """Test errors of each member (or the one model), finished or as of the last evaluated epoch."""
    if result.get("test_eval") is False:
        return []
    if result.get("members"):
        return [m.get("test_errors") for m in result["members"]]
    if "test" in result:
        return [result["test"].get("n_errors")]
    for record in reversed(history):
        if record.get("test_errors"):
            return list(record["test_errors"])
    return []
