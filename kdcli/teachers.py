"""Released teachers: trained once, long, and shipped with kdcli under `teachers/`.

    teachers/<name>/
        model.safetensors   fp32 weights; the architecture in the header's metadata
        config.yaml         the recipe that trained it
        result.json         its test errors, timing and command line
        metrics.jsonl       its learning curve
        SHA256SUMS          `sha256sum -c` format, one line per file above

    path = resolve("mnist-1200")          # teachers/mnist-1200-s1 (a bare name means seed 1)
    model, payload = load(path)           # checksums checked first; one-line RunError if not

safetensors holds tensors and a JSON header only, so loading a released teacher runs
no pickled code. Every file is checked against SHA256SUMS before it is read: a flipped
byte or a truncated file is refused with one line naming it. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import yaml

from . import runs
from .models import StackedMLP, build_model

WEIGHTS = "model.safetensors"
CHECKSUMS = "SHA256SUMS"
FILES = (WEIGHTS, runs.CONFIG, runs.RESULT, runs.METRICS)
DEFAULT = "mnist-1200"  # what `kdcli distill` falls back to when runs/teacher is absent
DEFAULT_RUN = "runs/teacher"  # the default experiments' own teacher run
REPO_TEACHERS = Path(__file__).resolve().parent.parent / "teachers"
NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def packaged_teachers() -> Path | None:
    """The released teachers inside an installed wheel (package kdcli.released, mapped from teachers/ by
    pyproject.toml once teachers are released), or None in a checkout."""
    # a namespace package (teachers/ holds no __init__.py), so its folder comes from the import spec:
    # importlib.resources.files() gives a MultiplexedPath there, not a filesystem path
    spec = importlib.util.find_spec("kdcli.released")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def roots() -> list[Path]:
    """Where released teachers are looked up: ./teachers, the checkout kdcli runs from, the installed package."""
    found = []
    for root in (Path("teachers"), REPO_TEACHERS, packaged_teachers()):
        if root is None:
            continue
        if root.is_dir() and root.resolve() not in [r.resolve() for r in found]:
            found.append(root)
    return found


def specs(teacher: str | None) -> list[str]:
    """The teachers a config's `teacher` names: several, comma-separated, form one ensemble teacher."""
    return [spec.strip() for spec in (teacher or "").split(",") if spec.strip()]


def is_released(path: Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() or (Path(path) / CHECKSUMS).is_file()


def resolve(name: str) -> Path | None:
    """A released teacher's folder by name (`mnist-1200-s2`; a bare `mnist-1200` is seed 1), or None."""
    if not NAME.match(name):
        return None
    for root in roots():
        for candidate in (root / name, root / f"{name}-s1"):
            if is_released(candidate):
                return candidate
    return None


def released() -> list[Path]:
    """Every released teacher's folder, in name order."""
    found: dict[str, Path] = {}
    for root in roots():
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and is_released(folder):
                found.setdefault(folder.name, folder)
    return [found[k] for k in sorted(found)]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(folder: Path) -> None:
    """Every file SHA256SUMS lists is present and matches; else one-line RunError."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    try:
        lines = sums.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise runs.RunError(f"{sums}: cannot read the released teacher's checksums "
                            f"({getattr(err, 'strerror', None) or runs.first_line(err)})") from None
    expected = {}
    for line in lines:
        digest, _, filename = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not filename:
            raise runs.RunError(f"{sums}: malformed line {line[:60]!r}; expected '<sha256>  <file>'")
        expected[filename] = digest
    if WEIGHTS not in expected:
        raise runs.RunError(f"{sums}: lists no {WEIGHTS}")
    for filename, digest in expected.items():
        path = folder / filename
        if not path.is_file():
            raise runs.RunError(f"{path}: missing from the released teacher (restore it: git checkout -- {path})")
        if sha256(path) != digest:
            raise runs.RunError(f"{path}: sha256 does not match {CHECKSUMS}: the file is corrupt, truncated or "
                                f"modified; refusing it (restore it: git checkout -- {path})")


def load(folder: Path) -> tuple[StackedMLP, dict]:
    """A released teacher, checksums verified: (model, payload with 'arch' and 'config')."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    folder = Path(folder)
    verify(folder)
    path = folder / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        arch = json.loads(metadata["arch"])
        model = build_model(arch)
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise runs.RunError(f"{path}: not a loadable kdcli teacher ({runs.first_line(err)})") from None
    try:
        config = yaml.safe_load((folder / runs.CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    return model, {"arch": arch, "state_dict": model.state_dict(), "config": config, "released": folder.name}


def release(run_dir: Path, name: str, root: Path = Path("teachers"), force: bool = False) -> Path:
    """Copy a finished run into root/<name>: weights as safetensors, its config, result, curve and checksums."""
    from safetensors.torch import save_file

    if not NAME.match(name):
        raise runs.RunError(f"release name {name!r}: use lower-case letters, digits, '.' and '-' (e.g. mnist-1200-s1)")
    run_dir = Path(run_dir)
    model, payload = runs.load_model(run_dir)
    for needed in (runs.RESULT, runs.CONFIG, runs.METRICS):
        if not (run_dir / needed).is_file():
            raise runs.RunError(f"{run_dir}: no {needed}: only a finished run can be released")
    if (runs.read_result(run_dir) or {}).get("test_eval") is False:
        raise runs.RunError(f"{run_dir} is a blind search run (no test errors): release a run trained with test_eval on")
    target = Path(root) / name
    if target.exists() and not force:
        raise runs.RunError(f"{target} exists: a recipe is released once; pass --force to replace it")
    staging = Path(root) / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(staging / WEIGHTS), metadata={"arch": json.dumps(payload["arch"]), "format": "kdcli"})
    (staging / WEIGHTS).chmod(0o644)  # safetensors writes it private; a release is for sharing
    for filename in (runs.CONFIG, runs.RESULT, runs.METRICS):
        shutil.copyfile(run_dir / filename, staging / filename)
    (staging / CHECKSUMS).write_text("".join(f"{sha256(staging / f)}  {f}\n" for f in FILES))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def describe(folder: Path) -> dict:
    """One row of `kdcli teachers`: name, test errors, recipe, the command that trained it, checksum state."""
    folder = Path(folder)
    try:
        verify(folder)
        state = "ok"
    except runs.RunError as err:
        state = str(err)
    result = runs.read_result(folder) or {}
    try:
        config = yaml.safe_load((folder / runs.CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    return {"name": folder.name, "path": str(folder), "checksum": state,
            "test_errors": (result.get("test") or {}).get("n_errors"),
            "recipe": recipe_summary(config), "command": runs.fresh_command(result.get("command_line", "")),
            "train_seconds": result.get("train_seconds"), "device_name": result.get("device_name")}


def recipe_summary(config: dict) -> str:
    if not config:
        return ""
    shape = "-".join(map(str, [784, *config.get("hidden", []), 10]))
    parts = [shape, f"{config.get('optimizer')} lr {config.get('lr')} ({config.get('schedule')})",
             f"{config.get('epochs')} epochs", f"dropout {config.get('dropout_input')} / {config.get('dropout_hidden')}"]
    if config.get("max_norm"):
        parts.append(f"max-norm {config['max_norm']}")
    if config.get("jitter"):
        parts.append(f"±{config['jitter']} px jitter")
    parts.append(f"seed {config.get('seed')}")
    return ", ".join(parts)


def locate(spec: str) -> Path | None:
    """A teacher given on the command line: a path (run directory, checkpoint, released folder) or a released name."""
    path = Path(spec)
    if path.exists():
        return path
    return resolve(spec)


def load_any(spec: str | Path, what: str = "teacher") -> tuple[StackedMLP, dict]:
    """A model from a run directory or checkpoint, or a released teacher by folder or name;
    `what` names it in the error (teacher, run, init_from)."""
    path = locate(str(spec))
    if path is None:
        raise runs.RunError(f"{what} '{spec}' not found: not a run directory, a checkpoint or a released "
                            "teacher (kdcli teachers lists those)")
    if path.is_dir() and is_released(path):
        return load(path)
    return runs.load_model(path)


def compare(runs_dir: Path, release: str = DEFAULT) -> list[dict]:
    """Each released seed of `release` beside the teacher retrained from its recipe under runs_dir
    (runs/teacher for seed 1, runs/teacher-sN for seed N): their test errors."""
    released_folders = [f for f in released() if re.fullmatch(re.escape(release) + r"-s\d+", f.name)]
    if not released_folders:
        raise runs.RunError(f"no released teachers named {release}-sN (kdcli teachers lists them)")
    rows = []
    for folder in sorted(released_folders, key=lambda f: int(f.name.rsplit("-s", 1)[1])):
        seed = int(folder.name.rsplit("-s", 1)[1])
        run = Path(runs_dir) / ("teacher" if seed == 1 else f"teacher-s{seed}")
        mine = runs.read_result(run) if run.is_dir() else None
        rows.append({"seed": seed, "released": describe(folder)["test_errors"], "run": str(run),
                     "retrained": ((mine or {}).get("test") or {}).get("n_errors")})
    return rows
