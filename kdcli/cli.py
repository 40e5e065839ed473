"""The kdcli command line: thin commands over the shared core.

Each command collects options, merges them over its YAML experiment file
(defaults < YAML < flags) and calls one core function. A mistake the user can
fix prints one line and exits with code 2; an interrupt keeps the last
finished epoch and exits with 130.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import runs
from .config import Config, ConfigError, load_config
from .data import DataError
from .train import Diverged, Hooks

app = typer.Typer(
    name="kdcli",
    help="Knowledge-distillation experiments: reproduce Hinton, Vinyals & Dean (2015) on MNIST.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
log = logging.getLogger("kdcli")

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


class UsageProblem(Exception):
    """A user-fixable problem found by the CLI itself (exit 2)."""


# --- options shared by the training commands (declared once) -----------------

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML experiment file.", show_default=False)]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "--T", "-T", help="Distillation temperature T.")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Weight of the soft-target term, in [0, 1].")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Mini-batch size.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (init, data order, dropout, jitter).")]
TeacherOpt = Annotated[Optional[str], typer.Option("--teacher", help="Teacher run directory or checkpoint.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Folder with the IDX files (else $KDCLI_DATA_DIR, else the cache).")]
OutOpt = Annotated[Optional[str], typer.Option("--out", help="Run directory (default runs/<name>).")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Experiment name (default run directory runs/<name>).")]
HiddenOpt = Annotated[Optional[str], typer.Option("--hidden", help="Hidden layer sizes, e.g. 800,800.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="mnist or fashion-mnist.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its run directory.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite a finished run directory.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Diagnostic logging.")]


def default_experiment(filename: str) -> Path:
    local = Path("experiments") / filename
    return local if local.is_file() else EXPERIMENTS / filename


def flag_overrides(**flags) -> dict:
    """Flags the user actually gave (None means 'not given')."""
    values = {k: v for k, v in flags.items() if v is not None}
    if "hidden" in values:
        values["hidden"] = [s for s in values["hidden"].replace(",", " ").split()]
    return values


@contextlib.contextmanager
def user_errors():
    """Turn every user-fixable failure into one line on stderr and an exit code."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    except (ConfigError, DataError, runs.RunError, UsageProblem) as problem:
        err.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    except Diverged as problem:
        err.print(f"[bold red]error:[/] {problem}; the last good epoch is kept in the run directory. "
                  "Try a lower --lr, or a lower temperature.", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    except OSError as problem:  # unwritable directory, full disk: finished files are renamed in atomically
        err.print(f"[bold red]error:[/] {problem.strerror or problem}: {problem.filename or ''}".rstrip(": "),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


def resolve(config_path: Optional[Path], default_file: str, **flags) -> Config:
    path = config_path or default_experiment(default_file)
    return load_config(path, flag_overrides(**flags))


def check_run_dir(cfg: Config, resume: bool, force: bool) -> None:
    run_dir = cfg.run_dir
    if resume:
        if not (run_dir / runs.RESUME).is_file():
            raise UsageProblem(f"nothing to resume in {run_dir}: no {runs.RESUME} there")
        return
    if (run_dir / runs.RESULT).is_file() and not force:
        raise UsageProblem(f"{run_dir} already holds a finished run; pass --force to overwrite it or --out to write elsewhere")
    if (run_dir / runs.RESUME).is_file() and not force:
        raise UsageProblem(f"{run_dir} holds an interrupted run; pass --resume to continue it or --force to start over")


def check_teacher(cfg: Config, needed: bool) -> None:
    if needed and not cfg.teacher:
        raise UsageProblem("no teacher given: set 'teacher' in the experiment file or pass --teacher")
    if cfg.teacher and not Path(cfg.teacher).exists():
        raise UsageProblem(f"teacher run '{cfg.teacher}' not found: train it first (kdcli train-teacher) or pass --teacher")


def train_command(command: str, cfg: Config, resume: bool, force: bool, dry_run: bool, verbose: bool) -> None:
    """What every training command does once its config is resolved."""
    from .report import print_result
    from .train import run_training

    setup_logging(verbose)
    if dry_run:
        out.print(f"[bold]{command}[/] would train into [cyan]{cfg.run_dir}[/] with:")
        out.print_json(json.dumps(cfg.to_dict()))
        return
    check_run_dir(cfg, resume, force)
    command_line = shlex.join(["kdcli", *sys.argv[1:]])
    try:
        with training_progress(cfg) as hooks:
            result = run_training(cfg, command, hooks, resume=resume, command_line=command_line)
    except KeyboardInterrupt:
        err.print(f"interrupted: the last finished epoch is saved in {cfg.run_dir}; "
                  f"continue with: {command_line} --resume", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    print_result(result, out)
    out.print(f"run directory: [cyan]{cfg.run_dir}[/]")
    check_expectation(cfg, result)


def check_expectation(cfg: Config, result: dict) -> None:
    if cfg.expect_max_errors is None:
        return
    errors = [m["test_errors"] for m in result["members"]] if "test" not in result else [result["test"]["n_errors"]]
    if max(errors) > cfg.expect_max_errors:
        err.print(f"[bold red]regression:[/] {max(errors)} test errors, expected at most {cfg.expect_max_errors}")
        raise typer.Exit(code=1)


@contextlib.contextmanager
def training_progress(cfg: Config):
    """A rich progress bar (off when stderr is not a terminal) fed by the loop's hooks."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=not err.is_terminal, transient=False) as progress:
        task = progress.add_task(cfg.name, total=None, status="")
        hooks = Hooks()

        def on_start(start_epoch: int, epochs: int, steps: int) -> None:
            progress.update(task, total=epochs * steps, completed=start_epoch * steps)

        def on_epoch(record: dict) -> None:
            status = epoch_status(record, cfg.epochs)
            progress.update(task, status=status)
            if not err.is_terminal:
                log.info(status)

        hooks.on_start = on_start
        hooks.on_step = lambda: progress.advance(task)
        hooks.on_epoch = on_epoch
        yield hooks


def epoch_status(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    for split in ("val", "test"):
        errors = record.get(f"{split}_errors")
        if errors:
            parts.append(f"{split} errors {errors[0]}" if len(errors) == 1 else
                         f"{split} errors mean {sum(errors) / len(errors):.1f}")
        if f"{split}_ensemble_errors" in record:
            parts.append(f"ensemble {record[f'{split}_ensemble_errors']}")
    parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    return " · ".join(parts)


# --- commands -----------------------------------------------------------------

@app.command("train-teacher")
def train_teacher(
    config: ConfigOpt = None, epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None,
    name: NameOpt = None, hidden: HiddenOpt = None, dataset: DatasetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train a model on hard labels: the paper's regularised teacher by default.

    Example: [bold]kdcli train-teacher -c experiments/teacher.yaml --epochs 60[/]
    (the unregularised baseline: [bold]kdcli train-teacher -c experiments/student.yaml[/])
    """
    with user_errors():
        cfg = resolve(config, "teacher.yaml", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      data_dir=data_dir, out=out_dir, name=name, hidden=hidden, dataset=dataset)
        if cfg.teacher:
            raise UsageProblem("train-teacher trains on hard labels; use kdcli distill for an experiment with a teacher")
        train_command("train-teacher", cfg, resume, force, dry_run, verbose)


@app.command("distill")
def distill(
    config: ConfigOpt = None, temperature: TemperatureOpt = None, alpha: AlphaOpt = None, epochs: EpochsOpt = None,
    batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None, teacher: TeacherOpt = None,
    device: DeviceOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None, name: NameOpt = None,
    hidden: HiddenOpt = None, combine: Annotated[Optional[str], typer.Option("--combine", help="Ensemble teacher: mean_probs or mean_logits.")] = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train a student on a teacher's temperature-softened outputs.

    Example: [bold]kdcli distill --T 20[/] (default experiment, teacher runs/teacher)
    """
    with user_errors():
        cfg = resolve(config, "distill.yaml", temperature=temperature, alpha=alpha, epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, teacher=teacher, device=device, data_dir=data_dir,
                      out=out_dir, name=name, hidden=hidden, combine=combine)
        check_teacher(cfg, needed=True)
        train_command("distill", cfg, resume, force, dry_run, verbose)


@app.command("train-ensemble")
def train_ensemble(
    config: ConfigOpt = None,
    members: Annotated[Optional[int], typer.Option("--members", help="Number of ensemble members K.")] = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None, name: NameOpt = None,
    hidden: HiddenOpt = None, dataset: DatasetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train K models together (stacked, one batched forward/backward).

    Example: [bold]kdcli train-ensemble -c experiments/ensemble.yaml --members 10[/]
    """
    with user_errors():
        if members is not None and members < 1:
            raise UsageProblem(f"--members must be at least 1, got {members}")
        cfg = resolve(config, "ensemble.yaml", members=members, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed, device=device, data_dir=data_dir, out=out_dir, name=name, hidden=hidden,
                      dataset=dataset)
        train_command("train-ensemble", cfg, resume, force, dry_run, verbose)


@app.command("eval")
def evaluate_run(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.", show_default=False)],
    data_dir: DataDirOpt = None, device: DeviceOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    combine: Annotated[str, typer.Option("--combine", help="Ensembles: mean_probs or mean_logits.")] = "mean_probs",
    verbose: VerboseOpt = False,
):
    """Evaluate a checkpoint on the test set: errors, accuracy, per-class errors.

    Example: [bold]kdcli eval runs/teacher --json teacher-eval.json[/]
    """
    from .report import evaluate_checkpoint, print_eval

    setup_logging(verbose)
    with user_errors():
        if combine not in ("mean_probs", "mean_logits"):
            raise UsageProblem(f"--combine must be mean_probs or mean_logits, got '{combine}'")
        result = evaluate_checkpoint(run, data_dir=data_dir, device=device, combine=combine)
        print_eval(result, out)
        if json_out:
            runs.write_json(json_out, result)
            out.print(f"wrote [cyan]{json_out}[/]")


@app.command("bench")
def bench(
    data_dir: DataDirOpt = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds to time each configuration.")] = 6.0,
    ensemble: Annotated[bool, typer.Option("--ensemble/--no-ensemble", help="Also time K=10 stacked vs sequential.")] = True,
):
    """Measure training throughput (samples/s) and achieved GFLOP/s on this machine.

    Example: [bold]kdcli bench --seconds 10[/]
    """
    from .bench import run_bench

    with user_errors():
        run_bench(data_dir=data_dir, seconds=seconds, ensemble=ensemble, console=out)


def main() -> None:
    app()
