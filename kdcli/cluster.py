"""Training on a Ray cluster: each grid point of a sweep, or one training command, as a Ray task.

    kdcli sweep -c experiments/tsweep.yaml --ray auto --cpus-per-run 2
    kdcli ray-run --ray auto -- distill -c experiments/distill.yaml      # what `make paper RAY=auto` runs

A task runs kdcli's own training (`train.run_training`) on whichever node Ray picks, and its run directory
ends up where a local run leaves it, on the driver's machine:

- A worker that sees the driver's files (the driver leaves a token file beside the run directories; the
  worker finds it) works in the driver's working directory and trains straight into the run directory.
- Any other worker trains into a folder of its own and sends the run back to the `Ledger`, a small actor
  pinned to the driver's node that writes it there: resume.pt and metrics.jsonl after every epoch, the
  whole run at the end. The teacher (and init_from) go the other way, through Ray's object store.

So a task that Ray retries after its node died resumes from the last epoch saved, wherever it lands. Every
failure is retried once; a point that fails twice is reported and the others go on. Ray is an optional
extra (pip install 'kdcli[ray]'), imported only here and only when a command asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import runs, teachers, train
from .config import Config
from .errors import RunError, UsageProblem

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'kdcli[ray]' (in a checkout: .venv/bin/pip install -e '.[ray]')"
RETRIES = 1  # each failure is retried once: a point that fails twice is reported
POLL_SECONDS = 0.5
CANCEL_WAIT_SECONDS = 20
# Fault injection for the test suite: on a node whose environment names a folder here, and while that
# folder holds a file `pause-after` with an epoch number, a run stops once that epoch is saved (and sent
# back), leaves `<name>.paused` in the folder, and waits for its node to be stopped or its task cancelled.
PAUSE_ENV = "KDCLI_RAY_PAUSE_DIR"


def require_ray():
    """The ray module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageProblem(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class Settings:
    """How runs go to the cluster: where it is, what each run asks for, whether runs always come back by Ray."""

    address: str = "auto"  # "auto": the running cluster; "local": one started here; else its HOST:PORT
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    ship_runs: bool = False  # send every run back through Ray even when a worker sees the driver's files

    def __post_init__(self):
        if not self.address:
            raise UsageProblem("--ray needs an address: auto (the running cluster), local (start one here) or HOST:PORT")
        if "://" in self.address:  # Ray Client: the driver would be the head, and the runs would land there
            raise UsageProblem(f"--ray {self.address}: Ray Client addresses are not supported; run kdcli on a machine "
                               "of the cluster, with --ray auto or --ray HOST:PORT")
        if self.cpus_per_run <= 0:
            raise UsageProblem(f"--cpus-per-run must be > 0, got {self.cpus_per_run:g}")
        if self.gpus_per_run < 0:
            raise UsageProblem(f"--gpus-per-run must be >= 0, got {self.gpus_per_run:g}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_run))


@dataclass
class Point:
    """One run for the cluster: its config and command, as train_command would run it locally."""

    cfg: Config
    command: str
    command_line: str
    resume: bool = False  # False: a fresh start (an earlier attempt's resume.pt is dropped first)
    trainer: Callable = train.run_training  # or specialists.run_specialists (on workers that see the driver's files)

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass
class Outcome:
    point: Point
    result: dict | None = None
    error: BaseException | None = None
    where: str = ""  # the node it finished on, and how its files came back


@dataclass
class Tally:
    """The sweep at a glance, for one progress bar."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    epochs_fraction: float = 0.0  # of the running points' epochs
    samples_per_s: float = 0.0

    @property
    def completed(self) -> float:
        return self.done + self.failed + self.epochs_fraction


@dataclass
class Job:
    """What a task gets: the point, where the driver keeps it, and how to reach the driver."""

    cfg: Config
    command: str
    command_line: str
    trainer: Callable
    run_dir: str  # absolute, on the driver's machine
    cwd: str  # the driver's working directory, where relative paths in the config start
    marker: str  # a file only a worker that sees the driver's files can read the token from
    token: str
    ship_runs: bool
    threads: int
    env: dict
    ledger: object  # the Ledger actor's handle
    inputs: dict = field(default_factory=dict)  # teacher/init_from spec -> [(file name, ObjectRef of its bytes)]


# --- the driver ----------------------------------------------------------------

def run_points(points: list[Point], settings: Settings, on_progress: Callable[[Tally], None],
               on_outcome: Callable[[Outcome], None], on_note: Callable[[str], None]) -> list[Outcome]:
    """Run every point as a Ray task and wait for all of them; Ctrl-C cancels the tasks still running
    (finished runs stay as they are; interrupted ones keep their last saved epoch) and is raised again."""
    ray = require_ray()
    connect(ray, settings.address)
    token, markers = secrets.token_hex(8), []
    try:
        ledger = start_ledger(ray)
        markers = leave_markers(points, token)
        pending = submit(ray, points, settings, ledger, token)
        return wait_for(ray, pending, ledger, on_progress, on_outcome, on_note)
    except ray.exceptions.RayError as problem:  # the driver's own node, or the cluster, gave way
        raise RunError(f"the Ray cluster failed: {runs.first_line(problem)}") from None
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)
        ray.shutdown()


def connect(ray, address: str) -> None:
    """ray.init, quietly; an unreachable cluster is one line."""
    check_reachable(address)
    options = {"include_dashboard": False} if address == "local" else {}
    try:
        ray.init(address=address, logging_level=logging.WARNING, **options)
    except (ConnectionError, RuntimeError, ValueError) as problem:
        raise UsageProblem(f"cannot reach a Ray cluster at '{address}': {runs.first_line(problem)}") from None


def check_reachable(address: str) -> None:
    """A HOST:PORT nobody answers on is refused at once: ray.init would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if address in ("auto", "local") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as problem:
        raise UsageProblem(f"cannot reach a Ray cluster at '{address}': {problem.strerror or problem}; "
                           "start one with: ray start --head") from None


def start_ledger(ray):
    """The Ledger on the driver's own node: it writes into the driver's run directories."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Ledger).options(num_cpus=0, scheduling_strategy=here).remote()


def leave_markers(points: list[Point], token: str) -> list[Path]:
    markers = []
    for folder in sorted({p.cfg.run_dir.resolve().parent for p in points}):
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f".kdcli-driver-{token}"
        marker.write_text(token)
        markers.append(marker)
    return markers


def submit(ray, points: list[Point], settings: Settings, ledger, token: str) -> dict:
    """One task per point, spread over the nodes; {its ref: the point}."""
    task = ray.remote(train_point).options(
        num_cpus=settings.cpus_per_run, num_gpus=settings.gpus_per_run, max_retries=RETRIES,
        retry_exceptions=True, scheduling_strategy="SPREAD")
    pending = {}
    for point in points:
        if not point.resume:
            (point.cfg.run_dir / runs.RESUME).unlink(missing_ok=True)  # --force starts over, as locally
        pending[task.remote(make_job(ray, point, settings, ledger, token))] = point
    return pending


def make_job(ray, point: Point, settings: Settings, ledger, token: str) -> Job:
    run_dir = point.cfg.run_dir.resolve()
    env = {k: os.environ[k] for k in ("KDCLI_DATA_DIR",) if k in os.environ}
    return Job(point.cfg, point.command, point.command_line, point.trainer, str(run_dir), os.getcwd(),
               str(run_dir.parent / f".kdcli-driver-{token}"), token, settings.ship_runs, settings.threads, env,
               ledger, inputs=input_files(ray, point.cfg))


def input_files(ray, cfg: Config) -> dict:
    """The teacher's and init_from's files, in the object store: a worker without the driver's files
    fetches them; one with them never does (refs inside an argument are not fetched by themselves)."""
    specs = teachers.specs(cfg.teacher) + ([cfg.init_from] if cfg.init_from else [])
    inputs = {}
    for spec in specs:
        path = teachers.locate(spec)
        if path is None:
            continue  # a worker reports the missing teacher in its own words
        inputs[spec] = [(f.name, ray.put(f.read_bytes())) for f in files_to_load(path)]
    return inputs


def files_to_load(path: Path) -> list[Path]:
    """What loading a teacher from `path` reads: a released folder's checked files, a run's model.pt, or the file."""
    if path.is_file():
        return [path]
    if teachers.is_released(path):
        return [path / teachers.CHECKSUMS, *(path / f for f in teachers.FILES if (path / f).is_file())]
    return [runs.checkpoint_path(path)]


def wait_for(ray, pending: dict, ledger, on_progress, on_outcome, on_note) -> list[Outcome]:
    outcomes, noted, tally = [], {}, Tally(total=len(pending))
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            # a task reports its start before training, and waits for it: a finished one's start is in here
            report = ray.get(ledger.report.remote())
            for note in notes(report, noted, {p.name for p in pending.values()}):
                on_note(note)
            for ref in ready:
                outcome = collect(ray, ref, pending.pop(ref))
                outcomes.append(outcome)
                tally.done += outcome.error is None
                tally.failed += outcome.error is not None
                on_outcome(outcome)
            update_tally(tally, report, {p.name for p in pending.values()})
            on_progress(tally)
    except KeyboardInterrupt:
        cancel(ray, list(pending))
        raise
    return outcomes


def collect(ray, ref, point: Point) -> Outcome:
    """A finished task's outcome: its result, or the error that stopped it twice."""
    try:
        answer = ray.get(ref)
    except ray.exceptions.RayTaskError as failure:  # the training raised: kdcli's own error, as it was
        cause = getattr(failure, "cause", None)
        return Outcome(point, error=cause if isinstance(cause, BaseException) else failure)
    except ray.exceptions.RayError as failure:  # the worker or its node was lost, twice
        return Outcome(point, error=RunError(f"its worker was lost {RETRIES + 1} times "
                                             f"({type(failure).__name__}: {runs.first_line(failure)})"))
    return Outcome(point, result=answer["result"], where=answer["where"])


def notes(report: dict, noted: dict, running: set[str]) -> list[str]:
    """One line when a point resumes a saved epoch or is retried, once per attempt."""
    lines = []
    for name, state in sorted(report.items()):
        attempt, start = state.get("attempt", 0), state.get("start_epoch")
        if name not in running or start is None or noted.get(name, 0) >= attempt:
            continue
        noted[name] = attempt
        retried = f"retried (attempt {attempt}) on {state['node']}" if attempt > 1 else f"started on {state['node']}"
        if start > 0:
            lines.append(f"{name}: {retried}, resumed after epoch {start}")
        elif attempt > 1:
            lines.append(f"{name}: {retried}, from the start")
    return lines


def update_tally(tally: Tally, report: dict, running: set[str]) -> None:
    live = [report[n] for n in running if n in report and report[n].get("epochs")]
    tally.running = len(live)
    tally.epochs_fraction = sum((s.get("epoch") or 0) / s["epochs"] for s in live)
    tally.samples_per_s = sum(s.get("samples_per_s") or 0 for s in live)


def cancel(ray, refs: list) -> None:
    """Ctrl-C: each running task gets a KeyboardInterrupt, so its run stops as a local one does."""
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    with contextlib.suppress(Exception):
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)


# --- the actor on the driver's node -----------------------------------------

class Ledger:
    """Lives on the driver's node (a Ray actor; no CPU of its own): keeps each point's progress, and writes
    what workers without the driver's files send back into the driver's run directories."""

    def __init__(self):
        self.points: dict[str, dict] = {}

    def attempt(self, name: str, node: str) -> int:
        previous = self.points.get(name, {}).get("attempt", 0)
        self.points[name] = {"attempt": previous + 1, "node": node, "start_epoch": None, "epoch": None,
                             "epochs": None, "samples_per_s": None}
        return previous + 1

    def started(self, name: str, start_epoch: int, epochs: int) -> None:
        self.points[name].update(start_epoch=start_epoch, epoch=start_epoch, epochs=epochs)

    def epoch(self, name: str, epoch: int, samples_per_s: float) -> None:
        self.points[name].update(epoch=epoch, samples_per_s=samples_per_s)

    def report(self) -> dict:
        return self.points

    def read(self, run_dir: str, names: list[str]) -> dict[str, bytes]:
        return {name: (Path(run_dir) / name).read_bytes() for name in names if (Path(run_dir) / name).is_file()}

    def write(self, run_dir: str, files: dict[str, bytes], status: dict, finished: bool = False) -> None:
        """All files renamed in together; then status.json, in this process's name (the worker's process id
        means nothing on this machine); a finished run's resume.pt goes."""
        run_dir = Path(run_dir)
        runs.atomic_write_all([(run_dir / name, _writer(data)) for name, data in files.items()])
        fields = {k: v for k, v in status.items() if k not in ("state", "pid", "updated")}
        runs.write_status(run_dir, status.get("state", "running"), **fields)
        if finished:
            (run_dir / runs.RESUME).unlink(missing_ok=True)


def _writer(data: bytes):
    return lambda f: f.write(data)


# --- the task on a worker ----------------------------------------------------

def train_point(job: Job) -> dict:
    """A Ray task: one run, trained where the driver can see it, or trained here and sent back."""
    import ray

    node = ray.util.get_node_ip_address()
    attempt = ray.get(job.ledger.attempt.remote(job.cfg.name, node))
    shared = not job.ship_runs and sees_driver(job)
    with worker_settings(job, shared):
        if shared:
            result = train_in_place(job, attempt)
        else:
            result = train_and_send_back(job, ray)
    return {"result": result, "where": f"on {node}" + ("" if shared else ", sent back")}


def sees_driver(job: Job) -> bool:
    try:
        return Path(job.marker).read_text() == job.token
    except OSError:
        return False


@contextlib.contextmanager
def worker_settings(job: Job, shared: bool):
    """The run's threads and the driver's data folder setting; with the driver's files, its working
    directory too (the config's relative paths start there). Ray reuses worker processes: all restored."""
    threads, cwd, env = torch.get_num_threads(), os.getcwd(), {k: os.environ.get(k) for k in job.env}
    torch.set_num_threads(job.threads)
    os.environ.update(job.env)
    if shared:
        os.chdir(job.cwd)
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def progress_hooks(job: Job, after_save: Callable[[int], None] = lambda epoch: None) -> train.Hooks:
    """Progress to the Ledger: the start waited for (so the driver hears of it before the result), each
    epoch not. After each saved epoch, `after_save`, then the test suite's pause when it asks for one."""
    import ray

    name, ledger = job.cfg.name, job.ledger

    def on_saved(epoch: int) -> None:
        after_save(epoch)
        pause_if_asked(name, epoch)

    return train.Hooks(
        on_start=lambda start_epoch, epochs, steps: ray.get(ledger.started.remote(name, start_epoch, epochs)),
        on_epoch=lambda record: ledger.epoch.remote(name, record["epoch"], record["samples_per_s"]),
        on_saved=on_saved,
    )


def train_in_place(job: Job, attempt: int) -> dict:
    run_dir = job.cfg.run_dir
    if attempt > 1 and runs.read_status(run_dir).get("state") == "running":
        # the attempt Ray saw die may have run on another machine, whose process id this one cannot check
        runs.write_status(run_dir, "interrupted")
    resume = (run_dir / runs.RESUME).is_file()
    return job.trainer(job.cfg, job.command, progress_hooks(job), resume=resume, command_line=job.command_line)


def train_and_send_back(job: Job, ray) -> dict:
    """Train in a folder of this worker's own, from the epoch the driver holds; send the saved state back
    after every epoch, how it ended if it did not finish, and the whole run if it did."""
    if job.trainer is not train.run_training:
        raise RunError(f"{job.command} on Ray needs workers that see the driver's files (its generalist is "
                       "not sent): give the cluster a shared filesystem")
    with tempfile.TemporaryDirectory(prefix="kdcli-ray-") as scratch:
        local = Path(scratch) / "run"
        local.mkdir()
        for name, data in ray.get(job.ledger.read.remote(job.run_dir, [runs.RESUME])).items():
            (local / name).write_bytes(data)  # resume.pt holds the metrics so far too
        loading = dataclasses.replace(job.cfg, **local_inputs(job, ray, Path(scratch) / "inputs"))
        hooks = progress_hooks(job, after_save=lambda epoch: send_epoch(job, ray, local, epoch))
        try:
            result = train.run_training(job.cfg, job.command, hooks, resume=(local / runs.RESUME).is_file(),
                                        command_line=job.command_line, run_dir=local,
                                        recipe=lambda cfg, data, device, command: train.standard_recipe(
                                            loading, data, device, command))
        except BaseException:  # failed or interrupted: the driver's status.json says so too
            with contextlib.suppress(Exception):
                ray.get(job.ledger.write.remote(job.run_dir, {}, runs.read_status(local)))
            raise
        everything = [p.name for p in local.iterdir() if p.is_file() and p.name not in (runs.RESUME, runs.STATUS)]
        ray.get(job.ledger.write.remote(job.run_dir, read_files(local, everything), runs.read_status(local),
                                        finished=True))
    return result


def send_epoch(job: Job, ray, local: Path, epoch: int) -> None:
    """The epoch just saved, to the driver, waited for: a task retried after this resumes from it."""
    files = read_files(local, [runs.RESUME, runs.METRICS, runs.CONFIG])
    ray.get(job.ledger.write.remote(job.run_dir, files, {**runs.read_status(local), "saved_epoch": epoch}))


def local_inputs(job: Job, ray, folder: Path) -> dict:
    """The teacher and init_from as files here: the config's fields that name them, pointing at the copies."""
    local = {}
    for k, (spec, files) in enumerate(job.inputs.items()):
        target = folder / str(k)
        target.mkdir(parents=True)
        for name, ref in files:
            (target / name).write_bytes(ray.get(ref))
        local[spec] = str(target) if teachers.is_released(target) else str(target / files[0][0])
    teacher = ",".join(local.get(spec, spec) for spec in teachers.specs(job.cfg.teacher))
    return {"teacher": teacher or job.cfg.teacher, "init_from": local.get(job.cfg.init_from, job.cfg.init_from)}


def read_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def pause_if_asked(name: str, epoch: int) -> None:
    folder = os.environ.get(PAUSE_ENV)
    if not folder:
        return
    try:
        after = int((Path(folder) / "pause-after").read_text())
    except (OSError, ValueError):
        return
    if epoch != after:
        return
    (Path(folder) / f"{name}.paused").write_text(json.dumps({"pid": os.getpid(), "epoch": epoch}))
    while True:  # until the node is stopped, or a cancel raises KeyboardInterrupt here
        time.sleep(0.2)
