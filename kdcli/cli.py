"""The kdcli command line: thin commands over the shared core.

Each command collects options, merges them over its YAML experiment file
(defaults < YAML < flags) and calls one core function. A mistake the user can
fix prints one line and exits with code 2; Ctrl-C or SIGTERM keeps the last
finished epoch, says how to resume and exits with 130; a run whose loss
diverges keeps its last good epoch and exits with 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shlex
import signal
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import cluster, omit, report, runs, specialists, teachers, train
from .bench import run_bench
from .config import Config, check_key, check_type, load_config, load_sweep, packaged_experiment, validate
from .errors import ConfigError, DataError, Diverged, RunError, UsageProblem
from .omit import parse_bias_shifts
from .report import build_report, curve_series, evaluate_checkpoint, plot_curves, print_eval, runs_table, softness_of_run
from .train import Hooks



class OneLineUsageErrors(TyperGroup):
    """Typer's own usage errors (an unknown flag, `--epochs abc`) as one line on
    stderr and exit code 2, like every other mistake a user can fix."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            # commands return None; an int here is the code of a typer.Exit
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            Console(stderr=True).print("aborted", highlight=False)
            sys.exit(1)
        except Exception as problem:
            usage = getattr(problem, "ctx", None)
            if not (hasattr(problem, "format_message") and hasattr(problem, "exit_code")):
                raise
            if type(problem).__name__ == "NoArgsIsHelpError":  # the help is already printed
                sys.exit(problem.exit_code)
            where = f" (see: {usage.command_path} --help)" if usage is not None else ""
            Console(stderr=True).print(f"[bold red]error:[/] {problem.format_message()}{where}",
                                       highlight=False, soft_wrap=True)
            sys.exit(problem.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="kdcli",
    help="Knowledge-distillation experiments: reproduce Hinton, Vinyals & Dean (2015) on MNIST.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,
)


def stdout_console() -> Console:
    """Rich fits its output to a terminal; written to a pipe or a file it would squeeze every table into 80
    columns, so there (unless COLUMNS says otherwise) each line is as long as its content."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = 10_000
    return console


out = stdout_console()
err = Console(stderr=True)  # log lines fill the console's width, so stderr keeps Rich's default
log = logging.getLogger("kdcli")





# --- options shared by the training commands (declared once) -----------------

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML experiment file.", show_default=False)]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", "--T", "-T", help="Distillation temperature T.")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="Weight of the soft-target term, in [0, 1].")]
MatchOpt = Annotated[Optional[str], typer.Option(
    "--match", help="What the student matches: soft_targets (KL at T) or logits (squared error, the T -> infinity limit).")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Mini-batch size.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (init, data order, dropout, jitter).")]
TeacherOpt = Annotated[Optional[str], typer.Option("--teacher", help="Teacher run directory or checkpoint.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="fp32, or bf16: training matmuls in bfloat16 (faster on CPUs with AMX/AVX512-BF16 and on CUDA).")]
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
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Any config field, typed as in YAML: --set key=value (repeatable), e.g. --set jitter=2 "
    "--set test_eval=false --set hidden=[1200,1200].", show_default=False)]
BiasShiftOpt = Annotated[Optional[list[str]], typer.Option(
    "--bias-shift", help="Add to output biases, e.g. 3=+3.5 or 7=-7.6,8=-7.6 (repeatable).", show_default=False)]
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", help="Run on a Ray cluster: auto (the running one), local (start one here), or HOST:PORT. "
    "Needs the ray extra: pip install 'kdcli\\[ray]'.", show_default=False)]
CpusOpt = Annotated[Optional[float], typer.Option("--cpus-per-run", help="With --ray: CPU cores each run asks for (and its torch threads); default 1.", show_default=False)]
GpusOpt = Annotated[Optional[float], typer.Option("--gpus-per-run", help="With --ray: GPUs each run asks for (a fraction shares one); default 0.", show_default=False)]
ShipOpt = Annotated[bool, typer.Option(
    "--ship-runs", help="With --ray: send every run directory back through Ray, even from workers that see this machine's files.")]


def default_experiment(filename: str) -> Path:
    """A command's default experiment file: ./experiments/<filename> when there, else the one kdcli ships."""
    local = Path("experiments") / filename
    return local if local.is_file() else packaged_experiment(filename)


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
    except (ConfigError, DataError, RunError, UsageProblem) as problem:
        err.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    except OSError as problem:  # unwritable directory, full disk: finished files are renamed in atomically
        where = f"{problem.filename}: " if problem.filename else ""
        err.print(f"[bold red]error:[/] {where}{problem.strerror or problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    except KeyboardInterrupt:  # training commands say more (train_command); here nothing was kept half-done
        err.print("interrupted", highlight=False)
        raise typer.Exit(code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def setup_logging(verbose: bool) -> None:
    """Warnings only by default; --verbose adds kdcli's own diagnostics (not every library's)."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def parse_sets(items: list[str] | None) -> dict:
    """--set key=value pairs: each key a Config field (with YAML's "did you mean"), each value read as YAML
    and checked against the field's type."""
    values = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        check_key(key, "--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot read '{raw}' as a value") from None
        if key in values and values[key] != value:
            raise ConfigError(f"--set {key} is given twice, with different values")
        values[key] = check_type(key, value, "--set")
    return values


def resolve(config_path: Optional[Path], default_file: str, sets: list[str] | None = None, **flags) -> Config:
    """defaults < the experiment file < flags and --set (a field given by both must agree)."""
    path = config_path or default_experiment(default_file)
    overrides, explicit = flag_overrides(**flags), parse_sets(sets)
    for key, value in explicit.items():
        if key in overrides and overrides[key] != value:
            raise UsageProblem(f"'{key}' is given both as --{key.replace('_', '-')} and with --set")
    return load_config(path, overrides, explicit)


def check_run_dir(cfg: Config, resume: bool, force: bool) -> None:
    """Refuse, in one line, to start over a run directory that holds something (unless --force)."""
    run_dir = cfg.run_dir
    owner = runs.running_pid(run_dir)
    if owner is not None:
        raise UsageProblem(f"{run_dir} is being trained by process {owner}: wait for it, or stop it first")
    if resume:
        if not (run_dir / runs.RESUME).is_file():
            raise UsageProblem(f"nothing to resume in {run_dir}: no {runs.RESUME} there")
        return
    if force or not run_dir.exists():
        return
    state = runs.run_status(run_dir)
    unfinished = (run_dir / runs.RESUME).is_file()
    if unfinished and state in ("interrupted", "failed"):
        raise UsageProblem(f"{run_dir} holds {'a failed' if state == 'failed' else 'an interrupted'} run; "
                           "pass --resume to continue it or --force to start over")
    if (run_dir / runs.RESULT).is_file():
        raise UsageProblem(f"{run_dir} already holds a finished run; pass --force to overwrite it or --out to write elsewhere")
    if unfinished:
        raise UsageProblem(f"{run_dir} holds an interrupted run; pass --resume to continue it or --force to start over")


def resume_hint(command_line: str) -> str:
    """The command that continues this run: the same one with --resume (without --force)."""
    words = shlex.split(runs.fresh_command(command_line))
    callbacks = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}
    command = next((w for w in words[1:] if w in callbacks and w != "ray-run"), None)
    if command and "resume" in inspect.signature(callbacks[command]).parameters:
        words.append("--resume")
    return shlex.join(words)


def describe_plan(cfg: Config, command: str, resume: bool, force: bool) -> str:
    """One line: what a training command would do (--dry-run)."""
    try:
        check_run_dir(cfg, resume, force)
    except UsageProblem as problem:
        return f"[bold]{command}[/] would stop: {problem}"
    if resume:
        where = f"resume the interrupted run in [cyan]{cfg.run_dir}[/]"
    elif (cfg.run_dir / runs.RESULT).is_file() or (cfg.run_dir / runs.RESUME).is_file():
        where = f"replace the run in [cyan]{cfg.run_dir}[/] (--force)"
    else:
        where = f"train into [cyan]{cfg.run_dir}[/]"
    shape = "-".join(map(str, [784, *cfg.hidden, 10]))
    models = f"{cfg.members} × {shape}" if cfg.members > 1 else shape
    if command == "train-specialists":  # their shape comes from the generalist, their number from the clusters
        clusters = cfg.clusters if cfg.clusters is not None else f"K = {cfg.n_clusters} by k-means"
        models = f"specialists ({clusters}) of the generalist {cfg.generalist}"
    teacher = ""
    if cfg.teacher:
        temperature = ",".join(f"{t:g}" for t in cfg.temperatures) if cfg.temperatures else f"{cfg.temperature:g}"
        what = "soft targets" if cfg.match == "soft_targets" else "logits"
        teacher = f", {what} of {cfg.teacher} at T={temperature}, α={cfg.alpha:g}"
    return (f"[bold]{command}[/] would {where}: {models} for {cfg.epochs} epochs on {cfg.dataset}{teacher}, "
            f"seed {cfg.seed}, device {cfg.device}; resolved config:")


def check_teacher(cfg: Config, needed: bool) -> Config:
    """Every teacher given exists (a run, a checkpoint or a released name), before any work. The default
    experiments' runs/teacher, when absent, is replaced by the released teacher, in one line."""
    if needed and not cfg.teacher:
        raise UsageProblem("no teacher given: set 'teacher' in the experiment file or pass --teacher")
    specs = teachers.specs(cfg.teacher)
    for i, spec in enumerate(specs):
        found = teachers.locate(spec)
        if found is None and spec == teachers.DEFAULT_RUN:
            found = teachers.resolve(teachers.DEFAULT)
            if found is not None:
                err.print(f"no {spec}: using the released teacher {found.name} ({found}; kdcli teachers lists them)",
                          highlight=False, soft_wrap=True)
                specs[i] = str(found)
        if found is None:
            raise UsageProblem(f"teacher '{spec}' not found: train it first (kdcli train-teacher), pass --teacher, "
                               "or name a released teacher (kdcli teachers)")
        if teachers.is_released(found):
            teachers.verify(found)  # a corrupt release is refused here, before any work
        else:
            runs.checkpoint_path(found)  # a directory without a model fails here, before any work
    return dataclasses.replace(cfg, teacher=",".join(specs)) if cfg.teacher else cfg


def train_command(command: str, cfg: Config, resume: bool, force: bool, dry_run: bool, verbose: bool,
                  trainer=None, printer=None) -> dict | None:
    """What every training command does once its config is resolved; the result, or None on a dry run.
    trainer and printer default to train.run_training and report.print_result."""
    setup_logging(verbose)
    if dry_run:
        out.print(describe_plan(cfg, command, resume, force), highlight=False)
        out.print_json(json.dumps(cfg.to_dict()))
        return None
    check_run_dir(cfg, resume, force)
    command_line = shlex.join(["kdcli", *sys.argv[1:]])
    on_ray = ON_RAY.get()
    try:
        if on_ray is not None:
            result = train_on_ray(cluster.Point(cfg, command, command_line, resume, trainer or train.run_training), on_ray)
        else:
            with training_progress(cfg) as hooks:
                result = (trainer or train.run_training)(cfg, command, hooks, resume=resume, command_line=command_line)
    except KeyboardInterrupt:
        if (cfg.run_dir / runs.RESUME).is_file():
            err.print(f"interrupted: the last finished epoch is saved in {cfg.run_dir / runs.RESUME}; "
                      f"continue with: {resume_hint(command_line)}", highlight=False, soft_wrap=True)
        else:
            err.print(f"interrupted before the first epoch finished: nothing to resume yet in {cfg.run_dir}",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    except Diverged as problem:
        hint = f"try a lower --lr (it was {cfg.lr:g})"
        if cfg.teacher:
            hint += f" or a lower --T (it was {cfg.temperatures or f'{cfg.temperature:g}'})"
        kept = (f"epoch {problem.epoch - 1} is kept in {cfg.run_dir / runs.RESUME}" if problem.epoch > 1
                else "no epoch had finished, so nothing was kept")
        err.print(f"[bold red]error:[/] {problem}: {hint}; {kept}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    (printer or report.print_result)(result, out)
    out.print(f"run directory: [cyan]{cfg.run_dir}[/]")
    check_expectation(cfg, result)
    return result


def check_expectation(cfg: Config, result: dict) -> None:
    problem = regression(cfg, result)
    if problem:
        err.print(f"[bold red]regression:[/] {problem}")
        raise typer.Exit(code=1)


def regression(cfg: Config, result: dict) -> str | None:
    """'N test errors, expected at most M' when a run misses its experiment's expect_max_errors, else None."""
    if cfg.expect_max_errors is None:
        return None
    errors = [m["test_errors"] for m in result["members"]] if "test" not in result else [result["test"]["n_errors"]]
    if max(errors) > cfg.expect_max_errors:
        return f"{max(errors)} test errors, expected at most {cfg.expect_max_errors}"
    return None


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


# --- runs on a Ray cluster (kdcli/cluster.py) --------------------------------------

# set by `kdcli ray-run` around the command it runs: train_command then trains there
ON_RAY: ContextVar[cluster.Settings | None] = ContextVar("on_ray", default=None)
RAY_RUN_COMMANDS = ("train-teacher", "distill", "train-ensemble", "omit-class", "train-specialists")


def ray_settings(address: str | None, cpus_per_run: float | None, gpus_per_run: float | None,
                 ship_runs: bool) -> cluster.Settings | None:
    """--ray and its companions as one setting; None when --ray is not given (then neither may they be)."""
    if address is None:
        if cpus_per_run is not None or gpus_per_run is not None or ship_runs:
            raise UsageProblem("--cpus-per-run, --gpus-per-run and --ship-runs go with --ray")
        return None
    return cluster.Settings(address, 1.0 if cpus_per_run is None else cpus_per_run,
                            0.0 if gpus_per_run is None else gpus_per_run, ship_runs)


def run_on_ray(points: list[cluster.Point], settings: cluster.Settings, on_outcome) -> list[cluster.Outcome]:
    """Every point as a Ray task, under one progress bar (off when stderr is not a terminal)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, disable=not err.is_terminal, transient=False) as progress:
        what = points[0].name if len(points) == 1 else f"{len(points)} runs"
        task = progress.add_task(f"{what} on Ray", total=len(points), status="")

        def show(tally: cluster.Tally) -> None:
            progress.update(task, completed=tally.completed, status=(
                f"{tally.done}/{tally.total} done · {tally.running} running · {tally.failed} failed · "
                f"{tally.samples_per_s:,.0f} samples/s"))

        return cluster.run_points(points, settings, on_progress=show, on_outcome=on_outcome,
                                  on_note=lambda note: out.print(note, highlight=False, soft_wrap=True))


def train_on_ray(point: cluster.Point, settings: cluster.Settings) -> dict:
    """train_command's training as one Ray task; its error, if it failed twice, raised here as a local one is."""
    (outcome,) = run_on_ray([point], settings, on_outcome=lambda outcome: None)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def ray_sweep(configs: list[Config], settings: cluster.Settings, force: bool, verbose: bool) -> None:
    """`kdcli sweep --ray`: the points a local sweep would train, all at once on the cluster."""
    setup_logging(verbose)
    command_line = shlex.join(["kdcli", *sys.argv[1:]])
    points = []
    for cfg, command, resume in points_to_train(configs, force):
        check_run_dir(cfg, resume, force)
        points.append(cluster.Point(cfg, command, command_line, resume))
    if not points:
        return
    try:
        outcomes = run_on_ray(points, settings, on_outcome=print_outcome)
    except KeyboardInterrupt:
        err.print("interrupted: finished runs are kept, the others keep their last saved epoch; "
                  "the same command continues them", highlight=False, soft_wrap=True)
        raise typer.Exit(code=130)
    failed = [o for o in outcomes if o.error is not None or regression(o.point.cfg, o.result)]
    out.print(f"sweep on Ray: {len(outcomes) - len(failed)} of {len(outcomes)} runs finished"
              + (f", {len(failed)} failed: {', '.join(o.point.name for o in failed)}" if failed else ""), highlight=False)
    if failed:
        raise typer.Exit(code=1)


def print_outcome(outcome: cluster.Outcome) -> None:
    """One line per finished point of a sweep on Ray: where it is and its errors, or why it failed."""
    name, run_dir = outcome.point.name, outcome.point.cfg.run_dir
    if outcome.error is not None:
        err.print(f"[bold red]failed:[/] {name}: {runs.first_line(outcome.error, 200)}", highlight=False, soft_wrap=True)
        return
    result = outcome.result
    if result.get("test_eval") is False:
        errors, what = result.get("val_errors") or [], "validation errors"
    else:
        errors, what = [m["test_errors"] for m in result["members"]], "test errors"
    out.print(f"[cyan]{run_dir}[/]: {what} {', '.join(map(str, errors))}, {result['samples_per_s']:,.0f} samples/s "
              f"({outcome.where})", highlight=False, soft_wrap=True)
    problem = regression(outcome.point.cfg, result)
    if problem:
        err.print(f"[bold red]regression:[/] {name}: {problem}", highlight=False)


# --- commands -----------------------------------------------------------------

@app.command("train-teacher")
def train_teacher(
    config: ConfigOpt = None, epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None,
    out_dir: OutOpt = None, sets: SetOpt = None,
    name: NameOpt = None, hidden: HiddenOpt = None, dataset: DatasetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train a model on hard labels: the paper's regularised teacher by default.

    Example: [bold]kdcli train-teacher -c experiments/teacher.yaml --epochs 60[/]
    (the unregularised baseline: [bold]kdcli train-teacher -c experiments/student.yaml[/])
    """
    with user_errors():
        cfg = resolve(config, "teacher.yaml", sets, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      precision=precision, data_dir=data_dir, out=out_dir, name=name, hidden=hidden, dataset=dataset)
        if cfg.teacher:
            raise UsageProblem("train-teacher trains on hard labels; use kdcli distill for an experiment with a teacher")
        train_command("train-teacher", cfg, resume, force, dry_run, verbose)


@app.command("distill")
def distill(
    config: ConfigOpt = None, temperature: TemperatureOpt = None, alpha: AlphaOpt = None, epochs: EpochsOpt = None,
    batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None, teacher: TeacherOpt = None,
    device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None,
    name: NameOpt = None,
    hidden: HiddenOpt = None, combine: Annotated[Optional[str], typer.Option("--combine", help="Ensemble teacher: mean_probs or mean_logits.")] = None,
    match: MatchOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train a student on a teacher's temperature-softened outputs.

    Example: [bold]kdcli distill --T 20[/] (default experiment, teacher runs/teacher)
    """
    with user_errors():
        cfg = resolve(config, "distill.yaml", sets, temperature=temperature, alpha=alpha, epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, teacher=teacher, device=device, data_dir=data_dir,
                      out=out_dir, name=name, hidden=hidden, combine=combine, match=match, precision=precision)
        if not dry_run:
            cfg = check_teacher(cfg, needed=True)
        train_command("distill", cfg, resume, force, dry_run, verbose)


@app.command("train-ensemble")
def train_ensemble(
    config: ConfigOpt = None,
    members: Annotated[Optional[int], typer.Option("--members", help="Number of ensemble members K.")] = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None,
    name: NameOpt = None,
    hidden: HiddenOpt = None, dataset: DatasetOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train K models together (stacked, one batched forward/backward).

    Example: [bold]kdcli train-ensemble -c experiments/ensemble.yaml --members 10[/]
    """
    with user_errors():
        if members is not None and members < 1:
            raise UsageProblem(f"--members must be at least 1, got {members}")
        cfg = resolve(config, "ensemble.yaml", sets, members=members, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed, device=device, data_dir=data_dir, out=out_dir, name=name, hidden=hidden,
                      dataset=dataset, precision=precision)
        train_command("train-ensemble", cfg, resume, force, dry_run, verbose)


@app.command("train-specialists")
def train_specialists(
    config: ConfigOpt = None,
    generalist: Annotated[Optional[str], typer.Option(
        "--generalist", help="Run directory of the generalist (a kdcli train-teacher run on the same dataset).")] = None,
    n_clusters: Annotated[Optional[int], typer.Option(
        "--clusters", "--n-clusters", help="K: group the classes by k-means into K specialists' clusters "
        "(instead of clusters listed in the experiment file).")] = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None,
    name: NameOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Train specialists on the classes a generalist confuses; combine them with it by the paper's KL rule (§5).

    Example: [bold]kdcli train-specialists -c experiments/specialists-fashion.yaml --generalist runs/generalist-fashion[/]
    """
    with user_errors():
        cfg = resolve(config, "specialists-fashion.yaml", sets, generalist=generalist, epochs=epochs, batch_size=batch_size,
                      lr=lr, seed=seed, device=device, precision=precision, data_dir=data_dir, out=out_dir, name=name)
        if n_clusters is not None:  # the flag wins over clusters listed in the file
            cfg = dataclasses.replace(cfg, n_clusters=n_clusters, clusters=None)
            validate(cfg)
        specialists.check_config(cfg)
        if not dry_run:
            check_run_dir(cfg, resume, force)
            setup_logging(verbose)
            cfg = specialists.resolve_clusters(cfg)
            specialists.print_clusters(cfg, out)
        train_command("train-specialists", cfg, resume, force, dry_run, verbose,
                      trainer=specialists.run_specialists, printer=specialists.print_result)


@app.command("sweep")
def sweep(
    config: ConfigOpt = None, teacher: TeacherOpt = None, epochs: EpochsOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Folder for the sweep's runs (default runs).")] = None,
    sets: SetOpt = None,
    ray: RayOpt = None, cpus_per_run: CpusOpt = None, gpus_per_run: GpusOpt = None, ship_runs: ShipOpt = False,
    force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Run every point of a grid experiment; finished points are kept, interrupted ones resumed.

    Example: [bold]kdcli sweep -c experiments/tsweep.yaml[/] (students of 800, 300 and 30 units, T from 1 to 20);
    on a Ray cluster, every point a task: [bold]kdcli sweep -c experiments/tsweep.yaml --ray auto[/]
    """
    with user_errors():
        on_ray = ray_settings(ray, cpus_per_run, gpus_per_run, ship_runs)
        if on_ray is not None:
            cluster.require_ray()
        path = config or default_experiment("tsweep.yaml")
        overrides = flag_overrides(teacher=teacher, epochs=epochs, seed=seed, device=device, precision=precision,
                                   data_dir=data_dir)
        configs = load_sweep(path, overrides, parse_sets(sets))
        if out_dir:
            configs = [dataclasses.replace(c, out=str(Path(out_dir) / c.name)) for c in configs]
        if on_ray is not None and not dry_run:
            ray_sweep(configs, on_ray, force, verbose)
            return
        for cfg, command, resume in points_to_train(configs, force, dry_run):
            train_command(command, cfg, resume=resume, force=force, dry_run=dry_run, verbose=verbose)


def points_to_train(configs: list[Config], force: bool, dry_run: bool = False):
    """A sweep's points as (config, command, resume), teachers checked; finished ones are kept and said so."""
    for cfg in configs:
        command = "distill" if cfg.teacher else "train-teacher"
        if not dry_run:
            cfg = check_teacher(cfg, needed=False)
        if (cfg.run_dir / runs.RESULT).is_file() and not force and not dry_run:
            out.print(f"{cfg.run_dir}: finished, kept")
            continue
        yield cfg, command, (cfg.run_dir / runs.RESUME).is_file() and not force


@app.command("ray-run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ray_run(
    ctx: typer.Context,
    ray: RayOpt = "auto", cpus_per_run: CpusOpt = None, gpus_per_run: GpusOpt = None, ship_runs: ShipOpt = False,
):
    """Run one training command as a Ray task; its run directory lands here, as a local run's would.

    Example: [bold]kdcli ray-run --ray auto -- distill -c experiments/distill.yaml[/]
    (what [bold]make paper RAY=auto[/] runs for each row; a sweep has its own: [bold]kdcli sweep --ray auto[/])
    """
    with user_errors():
        words = list(ctx.args)
        if not words or words[0] not in RAY_RUN_COMMANDS:
            raise UsageProblem(f"ray-run runs one of {', '.join(RAY_RUN_COMMANDS)}, e.g. kdcli ray-run --ray auto -- "
                               f"distill -c experiments/distill.yaml (got: {' '.join(words) or 'nothing'})")
        settings = ray_settings(ray, cpus_per_run, gpus_per_run, ship_runs)
        cluster.require_ray()
    token = ON_RAY.set(settings)
    try:
        code = typer.main.get_command(app).main(words, prog_name="kdcli", standalone_mode=False)
    finally:
        ON_RAY.reset(token)
    if isinstance(code, int) and code:
        raise typer.Exit(code=code)


@app.command("report")
def report_command(
    runs_dir: Annotated[Path, typer.Option("--runs", help="Folder of run directories.")] = Path("runs"),
    results_dir: Annotated[Path, typer.Option("--out", help="Where REPORT.md, summary.json and plots go.")] = Path("results"),
    released: Annotated[Optional[str], typer.Option(
        "--teachers", help="Read the teacher row from released teachers, e.g. teachers/mnist-1200 (its -s1, -s2, ...).",
        show_default=False)] = None,
    carry: Annotated[Optional[Path], typer.Option(
        "--carry", help="An earlier summary.json: keep its ensemble and specialist rows that --runs has no runs for, "
        "marked as carried.", show_default=False)] = None,
):
    """Build the paper-vs-kdcli table from the runs' result.json files.

    Example: [bold]kdcli report[/] (writes results/REPORT.md and results/tsweep.png)
    """
    with user_errors():
        if not runs_dir.is_dir():
            raise UsageProblem(f"no run directory folder at {runs_dir}")
        path = build_report(runs_dir, results_dir, out, released, carry)
        out.print(f"wrote [cyan]{path}[/]")


CURVE_FORMATS = (".png", ".pdf", ".svg")


@app.command("curves")
def curves(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Run directories (finished or not).", metavar="RUN", show_default=False)],
    out_path: Annotated[Path, typer.Option("--out", help="Image to write (.png, .pdf or .svg).")] = Path("curves.png"),
):
    """Plot learning curves: training loss, validation and test errors against epoch, for one or more runs.

    Example: [bold]kdcli curves runs/teacher runs/distill --out curves.png[/]
    (a stacked run, such as an ensemble or a temperature sweep, draws one thin line per member)
    """
    with user_errors():
        if out_path.suffix.lower() not in CURVE_FORMATS:
            raise UsageProblem(f"--out must end in {', '.join(CURVE_FORMATS)}, got '{out_path}'")
        series_by_run = {}
        for run_dir in run_dirs:
            if not run_dir.is_dir():
                raise UsageProblem(f"no run directory at {run_dir}")
            series = curve_series(runs.read_metrics(run_dir))
            if not series:
                raise UsageProblem(f"{run_dir} has no epoch logged yet ({runs.METRICS} is missing, empty or unreadable)")
            series_by_run[str(run_dir)] = series
        plot_curves(series_by_run, out_path)
        out.print(f"wrote [cyan]{out_path}[/]")


@app.command("omit-class")
def omit_class(
    digit: Annotated[Optional[list[str]], typer.Option(
        "--digit", help="A digit removed from the transfer set (repeatable).", show_default=False)] = None,
    digits: Annotated[Optional[str], typer.Option("--digits", help="Digits removed from the transfer set, e.g. 3,5.")] = None,
    keep: Annotated[Optional[str], typer.Option("--keep", help="The only digits kept in the transfer set, e.g. 7,8.")] = None,
    bias_shift: BiasShiftOpt = None,
    config: ConfigOpt = None, temperature: TemperatureOpt = None, alpha: AlphaOpt = None, epochs: EpochsOpt = None,
    batch_size: BatchOpt = None, lr: LrOpt = None, seed: SeedOpt = None, teacher: TeacherOpt = None,
    device: DeviceOpt = None, precision: PrecisionOpt = None, data_dir: DataDirOpt = None, out_dir: OutOpt = None,
    name: NameOpt = None,
    hidden: HiddenOpt = None, match: MatchOpt = None,
    sets: SetOpt = None,
    resume: ResumeOpt = False, force: ForceOpt = False, dry_run: DryRunOpt = False, verbose: VerboseOpt = False,
):
    """Distil with digits missing from the transfer set, then correct the student's output biases.

    Example: [bold]kdcli omit-class --digit 3 --bias-shift 3=+3.5[/] or [bold]kdcli omit-class --keep 7,8[/]
    """
    with user_errors():
        user_shifts = omit.parse_bias_shifts(bias_shift) if bias_shift else None
        selection = omit.digit_overrides(digit, digits, keep)
        cfg = resolve(config, omit.experiment_file(selection), sets, **selection, temperature=temperature, alpha=alpha,
                      epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, teacher=teacher, device=device,
                      data_dir=data_dir, out=out_dir, name=name or omit.run_name(selection), hidden=hidden,
                      match=match, precision=precision)
        omit.check_config(cfg)
        if not dry_run:
            cfg = check_teacher(cfg, needed=True)
        if train_command("omit-class", cfg, resume, force, dry_run, verbose) is not None:
            omit.print_bias_correction(omit.correct_run(cfg, user_shifts), out)
            out.print(f"bias correction and plot: [cyan]{cfg.run_dir / runs.RESULT}[/], [cyan]{cfg.run_dir / omit.PLOT}[/]")


@app.command("runs")
def list_runs(
    folder: Annotated[Path, typer.Argument(help="Folder of run directories.")] = Path("runs"),
):
    """A table of the run directories under a folder: settings, status, test errors, wall time.

    Example: [bold]kdcli runs[/] (or [bold]kdcli runs results/old-runs[/])
    """
    with user_errors():
        if not folder.is_dir():
            raise UsageProblem(f"no folder of run directories at {folder}")
        found = runs.scan_runs(folder)
        if not found:
            out.print(f"no run directories under {folder}")
            return
        out.print(runs_table(found, title=f"runs under {folder}"))


@app.command("teachers")
def list_teachers(
    compare: Annotated[Optional[Path], typer.Option(
        "--compare", help="A folder with teachers retrained here (teacher, teacher-s2, ...): their test errors beside the released ones.",
        show_default=False)] = None,
    release: Annotated[str, typer.Option("--release", help="With --compare: the released recipe's name.")] = teachers.DEFAULT,
):
    """The teachers released with kdcli: name, test errors, recipe, checksum state and the command that trained them.

    Use one by name: [bold]kdcli distill --teacher mnist-1200-s2[/] ([bold]mnist-1200[/] is seed 1).
    """
    from rich.table import Table

    with user_errors():
        if compare is not None:
            out.print(teachers_comparison(compare, release))
            return
        found = teachers.released()
        if not found:
            out.print("no released teachers (kdcli looks in ./teachers and in the checkout it runs from)")
            return
        table = Table(title="released teachers")
        for column in ("name", "test errors", "recipe", "sha256", "trained with"):
            table.add_column(column, justify="right" if column == "test errors" else "left")
        for row in map(teachers.describe, found):
            table.add_row(row["name"], "" if row["test_errors"] is None else str(row["test_errors"]), row["recipe"],
                          "ok" if row["checksum"] == "ok" else f"[red]{row['checksum']}[/]", row["command"])
        out.print(table)


def teachers_comparison(runs_dir: Path, release: str):
    """`kdcli teachers --compare runs`: released and retrained test errors, seed by seed."""
    from rich.table import Table

    rows = teachers.compare(runs_dir, release)
    table = Table(title=f"released {release} vs retrained under {runs_dir} (test errors of 10,000)")
    for column in ("seed", "released", "retrained here", "difference", "retrained run"):
        table.add_column(column, justify="right")
    for r in rows:
        diff = "" if None in (r["released"], r["retrained"]) else f"{r['retrained'] - r['released']:+d}"
        table.add_row(str(r["seed"]), str(r["released"] if r["released"] is not None else "–"),
                      str(r["retrained"] if r["retrained"] is not None else "not run"), diff, r["run"])
    return table


@app.command("release-teacher")
def release_teacher(
    run: Annotated[Path, typer.Argument(help="Finished teacher run directory.", show_default=False)],
    name: Annotated[str, typer.Option("--name", help="Release name, e.g. mnist-1200-s1.", show_default=False)],
    into: Annotated[Path, typer.Option("--into", help="Folder of released teachers.")] = Path("teachers"),
    force: ForceOpt = False,
):
    """Release a finished run as a teacher: fp32 safetensors weights, config, result, curve and SHA256SUMS.

    Example: [bold]kdcli release-teacher runs/teacher --name mnist-1200-s1[/]
    """
    with user_errors():
        target = teachers.release(run, name, into, force=force)
        out.print(f"released [cyan]{target}[/] ({teachers.describe(target)['test_errors']} test errors)")


@app.command("eval")
def evaluate_run(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.", show_default=False)],
    data_dir: DataDirOpt = None, device: DeviceOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
    combine: Annotated[str, typer.Option("--combine", help="Ensembles: mean_probs or mean_logits.")] = "mean_probs",
    bias_shift: BiasShiftOpt = None,
    against: Annotated[Optional[Path], typer.Option(
        "--against", help="Another run (e.g. the teacher): also report top-1 agreement and KL with it, "
        "on the training and test images.", show_default=False)] = None,
    verbose: VerboseOpt = False,
):
    """Evaluate a checkpoint on the test set: errors, accuracy, per-class errors.

    Example: [bold]kdcli eval runs/teacher --json teacher-eval.json[/]
    (with a bias correction: [bold]kdcli eval runs/omit-3 --bias-shift 3=+3.5[/];
    how closely a student copies its teacher: [bold]kdcli eval runs/distill --against runs/teacher[/])
    """
    setup_logging(verbose)
    with user_errors():
        if combine not in ("mean_probs", "mean_logits"):
            raise UsageProblem(f"--combine must be mean_probs or mean_logits, got '{combine}'")
        shifts = parse_bias_shifts(bias_shift) if bias_shift else None
        if specialists.is_specialists_run(run):  # generalist alone vs generalist + specialists
            if shifts or against:
                raise UsageProblem("--bias-shift and --against do not apply to a specialists run")
            result = specialists.evaluate_run(run, data_dir=data_dir, device=device)
            specialists.print_eval(result, out)
        else:
            result = evaluate_checkpoint(run, data_dir=data_dir, device=device, combine=combine, bias_shifts=shifts,
                                         against=against)
            print_eval(result, out)
        if shifts:
            out.print("bias shifts: " + ", ".join(f"{d}={v:+g}" for d, v in shifts.items()))
        if json_out:
            runs.write_json(json_out, result)
            out.print(f"wrote [cyan]{json_out}[/]")


@app.command("softness")
def softness_command(
    run: Annotated[Path, typer.Argument(help="Run directory, checkpoint or released teacher.", show_default=False)],
    temperature: Annotated[Optional[list[float]], typer.Option(
        "--T", "-T", help="Temperatures (repeatable).", show_default=False)] = None,
    data_dir: DataDirOpt = None, device: DeviceOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON here.")] = None,
):
    """How soft a teacher's outputs are on its training images: mean entropy, top probability and the mass
    on the other classes, at each T. Reads no test image.

    Example: [bold]kdcli softness runs/teacher --T 1 --T 20[/]
    """
    from rich.table import Table

    with user_errors():
        temps = temperature or [1.0, 20.0]
        if any(t <= 0 for t in temps):
            raise UsageProblem(f"--T must be > 0, got {', '.join(f'{t:g}' for t in temps)}")
        result = softness_of_run(run, temps, data_dir=data_dir, device=device)
        table = Table(title=f"softness of {run} on its {result['n_images']:,} training images")
        for column in ("T", "entropy (nats)", "top probability", "mass on the other classes"):
            table.add_column(column, justify="right")
        for s in result["softness"]:
            table.add_row(f"{s['temperature']:g}", f"{s['entropy_nats']:.4f}", f"{s['top_probability']:.4f}",
                          f"{s['other_mass']:.4f}")
        out.print(table)
        if json_out:
            runs.write_json(json_out, result)
            out.print(f"wrote [cyan]{json_out}[/]")


@app.command("bench")
def bench(
    data_dir: DataDirOpt = None,
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds to time each configuration.")] = 6.0,
    ensemble: Annotated[bool, typer.Option("--ensemble/--no-ensemble", help="Also time K=10 stacked vs sequential.")] = True,
    precision: PrecisionOpt = None,
):
    """Measure training throughput (samples/s) and achieved GFLOP/s on this machine.

    Example: [bold]kdcli bench --seconds 10[/] (bfloat16 matmuls: [bold]kdcli bench --precision bf16[/])
    """
    with user_errors():
        run_bench(data_dir=data_dir, seconds=seconds, ensemble=ensemble, console=out, precision=precision)


def main() -> None:
    app()
