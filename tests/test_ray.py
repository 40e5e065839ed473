"""kdcli on a real Ray cluster: a head and one worker node on this machine, started once for the module.

A sweep through --ray leaves exactly the figures of the local sweep of the same grid (same threads per run),
whether workers train into the driver's files or send their runs back; a sweep stopped with Ctrl-C keeps
its finished runs and continues the others; a worker node killed mid-run costs only that run's unfinished
epochs. Without Ray installed, --ray is one line saying how to install it (that test always runs).
"""

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, kdcli, one_line_error

GRID = {"name": "g", "temperature": 4, "epochs": 3, "batch_size": 50, "device": "cpu",
        "grid": {"hidden": [[16], [12]]}}
POINTS = ("g-16", "g-12")
TIMINGS = {"seconds", "samples_per_s", "train_seconds", "wall_seconds", "command_line"}
# the real CLI with Python's own SIGINT handler: a suite started in the background inherits SIGINT ignored
DRIVER = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from kdcli.cli import main; main()"
WAIT_SECONDS = 150


# --- a two-node cluster on 127.0.0.1 ------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in a session of its own, so that the node (raylet, agents, workers) can be
    stopped as one, by session, without touching any other process; returns once the node is up."""
    ray = Path(sys.executable).parent / "ray"
    command = [str(ray), "start", *args, "--num-cpus", "1", "--object-store-memory", "100000000",
               "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", "--block"]
    node = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 90
    while "block forever" not in log.read_text():
        if node.poll() is not None or time.time() > deadline:
            stop_node(node)
            pytest.fail(f"ray start {args[0]} did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return node


def stop_node(node: subprocess.Popen) -> None:
    """SIGKILL to every process of the node's session (the node dies as a machine would), then reap it."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == node.pid:
                    os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    node.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    folder = tmp_path_factory.mktemp("cluster")
    (folder / "pause").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        # for nodes and drivers alike: no usage reports, no token even where a user's ~/.ray holds one
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.delenv("KDCLI_DATA_DIR", raising=False)
        with two_nodes(folder) as running:
            yield running


@contextlib.contextmanager
def two_nodes(folder: Path):
    """A head and a worker node, each with a temp dir of its own; both stopped however the module ends."""
    temp_dirs = [tempfile.mkdtemp(prefix="kdray") for _ in range(2)]  # short: Ray's socket paths must fit
    port, nodes = free_port(), []
    # the workers' scratch folders too, which a worker killed with its node leaves behind
    env = dict(os.environ, TMPDIR=str(folder / "scratch"))
    (folder / "scratch").mkdir()
    try:
        nodes.append(start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                                 "--temp-dir", temp_dirs[0]], folder / "head.log", env))
        # only the worker node pauses runs, when a test arms it (kdcli.cluster.PAUSE_ENV)
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--temp-dir", temp_dirs[1]], folder / "worker.log",
                                dict(env, KDCLI_RAY_PAUSE_DIR=str(folder / "pause"))))
        yield SimpleNamespace(address=f"127.0.0.1:{port}", pause=folder / "pause", worker=nodes[1], folder=folder)
    finally:
        for node in reversed(nodes):
            if node.poll() is None:
                stop_node(node)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def grid(cluster, synthetic_dir):
    """A teacher, a two-point distillation grid on it, and the grid's local sweep (one thread per run)."""
    folder = cluster.folder
    teacher = folder / "teacher"
    made = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "24", "--epochs", "2", "--set",
                 "batch_size=50", "--device", "cpu", "--out", teacher)
    assert made.exit_code == 0, made.output
    path = folder / "grid.yaml"
    path.write_text(json.dumps({**GRID, "data_dir": str(synthetic_dir), "teacher": str(teacher)}))  # JSON is YAML
    local = kdcli("sweep", "-c", path, "--out", folder / "local")
    assert local.exit_code == 0, local.output
    return SimpleNamespace(path=path, local=folder / "local", teacher=teacher, data=synthetic_dir)


def driver(*args, cwd) -> subprocess.Popen:
    """`kdcli ARGS` in a process of its own, as a user runs it (the cluster fixture set its environment)."""
    return subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Its exit code and output, each run of whitespace one space (rich wraps lines at 80 columns)."""
    output, _ = process.communicate(timeout=WAIT_SECONDS)
    return process.returncode, " ".join(output.split())


def wait_until(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + WAIT_SECONDS
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before {what}: {process.stdout.read()[-3000:]}")
        assert time.time() < deadline, f"no {what} within {WAIT_SECONDS} s"
        time.sleep(0.2)


def paused(cluster) -> list[str]:
    return [p.name.removesuffix(".paused") for p in cluster.pause.glob("*.paused")]


@pytest.fixture
def armed(cluster):
    """Runs on the worker node pause once epoch 1 is saved (and sent back), until the node is stopped."""
    (cluster.pause / "pause-after").write_text("1")
    yield
    for path in cluster.pause.iterdir():
        path.unlink()


# --- the run directories against the local sweep's ------------------------------------

def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS and k != "out"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def assert_same_figures(run_dir: Path, local_dir: Path) -> None:
    """Same files, same result, metrics, config and weights as the local run (timings and --out aside)."""
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in local_dir.iterdir())
    for name in ("result.json",):
        mine, theirs = (json.loads((d / name).read_text()) for d in (run_dir, local_dir))
        assert without_timings(mine) == without_timings(theirs), run_dir
    mine, theirs = ([without_timings(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
                    for d in (run_dir, local_dir))
    assert mine == theirs and len(mine) == GRID["epochs"], run_dir
    mine, theirs = (torch.load(d / "model.pt", weights_only=True) for d in (run_dir, local_dir))
    assert without_timings(mine["config"]) == without_timings(theirs["config"])
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(mine["state_dict"][k], theirs["state_dict"][k]) for k in mine["state_dict"]), run_dir


def saved_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "resume.pt", weights_only=True)["train_state"]["epoch"]


# --- the tests ---------------------------------------------------------------------

def test_a_sweep_on_ray_leaves_the_local_sweeps_figures(cluster, grid, tmp_path):
    code, output = finish(driver("sweep", "-c", grid.path, "--out", "runs", "--ray", cluster.address, cwd=tmp_path))
    assert code == 0, output
    assert "sweep on Ray: 2 of 2 runs finished" in output and "sent back" not in output
    for name in POINTS:
        assert_same_figures(tmp_path / "runs" / name, grid.local / name)
    assert not list((tmp_path / "runs").glob(".kdcli-driver-*"))  # the driver's token file goes


def test_ray_run_trains_one_command_there_and_brings_it_back(cluster, grid, tmp_path):
    """What `make paper RAY=...` runs for a row: one training command as a Ray task, its run sent back."""
    code, output = finish(driver("ray-run", "--ray", cluster.address, "--ship-runs", "--", "train-teacher",
                                 "--data-dir", grid.data, "--hidden", "24", "--epochs", "2", "--set", "batch_size=50",
                                 "--device", "cpu", "--out", "teacher", cwd=tmp_path))
    assert code == 0, output
    assert "run directory: teacher" in output
    run, local = tmp_path / "teacher", grid.teacher
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in local.iterdir())
    mine, theirs = (json.loads((d / "result.json").read_text()) for d in (run, local))
    assert without_timings(mine) == without_timings(theirs)
    assert mine["command_line"].startswith("kdcli ray-run --ray")


def test_runs_sent_back_survive_ctrl_c_and_the_rerun_continues_them(cluster, grid, armed, tmp_path):
    """--ship-runs: every run trains in a worker's own folder and comes back through Ray, as it does from a
    node without this machine's files. Ctrl-C with one run finished and one paused after epoch 1: the
    finished one is kept, the other keeps epoch 1; the same command then finishes it from there."""
    out = tmp_path / "runs"
    command = ("sweep", "-c", grid.path, "--out", "runs", "--ray", cluster.address, "--ship-runs")
    sweep = driver(*command, cwd=tmp_path)
    wait_until(lambda: paused(cluster), sweep, "a run pausing on the worker node")
    (stopped,) = paused(cluster)
    (other,) = set(POINTS) - {stopped}
    wait_until(lambda: (out / other / "result.json").is_file(), sweep, f"{other} finishing on the head")
    sweep.send_signal(signal.SIGINT)
    code, output = finish(sweep)
    assert code == 130, output
    assert "interrupted: finished runs are kept" in output
    assert saved_epoch(out / stopped) == 1 and not (out / stopped / "model.pt").exists()
    assert_same_figures(out / other, grid.local / other)

    (cluster.pause / "pause-after").unlink()
    code, output = finish(driver(*command, cwd=tmp_path))
    assert code == 0, output
    assert f"runs/{other}: finished, kept" in output
    assert f"{stopped}: started on" in output and "resumed after epoch 1" in output
    for name in POINTS:
        assert_same_figures(out / name, grid.local / name)


def test_a_worker_node_killed_mid_run_costs_only_its_unfinished_epochs(cluster, grid, armed, tmp_path):
    """The worker node dies with a run paused after epoch 1 (whose resume.pt has reached the driver): Ray
    retries the task on the head, it resumes from epoch 1, and the run ends as an uninterrupted one would.
    (Last in this module: the worker node stays down.)"""
    out = tmp_path / "runs"
    sweep = driver("sweep", "-c", grid.path, "--out", "runs", "--ray", cluster.address, "--ship-runs", cwd=tmp_path)
    wait_until(lambda: paused(cluster), sweep, "a run pausing on the worker node")
    (stopped,) = paused(cluster)
    assert saved_epoch(out / stopped) == 1  # sent back after its epoch, before the pause
    stop_node(cluster.worker)
    code, output = finish(sweep)
    assert code == 0, output
    assert f"{stopped}: retried (attempt 2)" in output and "resumed after epoch 1" in output
    assert "sweep on Ray: 2 of 2 runs finished" in output
    for name in POINTS:
        assert_same_figures(out / name, grid.local / name)


# --- without a cluster -------------------------------------------------------------

def test_without_ray_installed_the_flag_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    for args in (("sweep", "-c", "experiments/smoke/tsweep.yaml", "--ray", "local"),
                 ("ray-run", "--ray", "auto", "--", "train-teacher", "-c", "experiments/smoke/teacher.yaml")):
        line = one_line_error(kdcli(*args))
        assert "pip install 'kdcli[ray]'" in line, line


def test_ray_settings_need_ray_and_ray_run_needs_a_training_command():
    line = one_line_error(kdcli("sweep", "-c", "experiments/smoke/tsweep.yaml", "--cpus-per-run", "2"))
    assert "go with --ray" in line
    line = one_line_error(kdcli("ray-run", "--", "report"))
    assert "ray-run runs one of train-teacher" in line
    line = one_line_error(kdcli("sweep", "-c", "experiments/smoke/tsweep.yaml", "--ray", "auto", "--cpus-per-run", "0"))
    assert "--cpus-per-run must be > 0" in line


def test_kdclis_errors_come_back_from_a_worker_as_they_were_raised():
    from kdcli.errors import Diverged, RunError

    for error in (Diverged(3, 7, "the network died"), RunError("teacher 'x' not found")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
    assert pickle.loads(pickle.dumps(Diverged(3, 7))).epoch == 3


def test_a_released_teacher_travels_to_a_worker_whole(synthetic_dir, tmp_path):
    """What a worker without the driver's files gets of a released teacher: every checked file, so the copy
    passes its checksums and loads the same weights."""
    from kdcli import cluster, teachers

    made = kdcli("train-teacher", "--data-dir", synthetic_dir, "--hidden", "12", "--epochs", "1", "--device", "cpu",
                 "--out", tmp_path / "run")
    assert made.exit_code == 0, made.output
    released = teachers.release(tmp_path / "run", "tiny-s1", tmp_path / "teachers")
    sent = {str(released): [(f.name, f.read_bytes()) for f in cluster.files_to_load(released)]}
    job = SimpleNamespace(inputs=sent, cfg=SimpleNamespace(teacher=str(released), init_from=None))
    fetched = cluster.local_inputs(job, SimpleNamespace(get=lambda data: data), tmp_path / "worker")
    assert fetched["teacher"] != str(released) and fetched["init_from"] is None
    copy, _ = teachers.load_any(fetched["teacher"])  # checksums checked first
    original, _ = teachers.load_any(released)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), original.state_dict().values()))


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_paper_with_ray_sends_every_run_there_in_the_makefiles_order():
    def plan(*extra):
        done = subprocess.run(["make", "-n", "--no-print-directory", "paper", "TEACHERS=scratch", "SEEDS=1",
                               "RUNS=plan-runs", "RESULTS=plan-results", "KDCLI=kdcli", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("kdcli ")]

    local, on_ray = plan(), plan("RAY=auto", "RAY_FLAGS=--cpus-per-run 2")
    assert len(local) == len(on_ray) and not any("ray" in line for line in local)
    ray = ["--ray", "auto", "--cpus-per-run", "2"]
    for before, after in zip(local, on_ray):  # same commands, same order: each one a Ray task
        words = before.split()
        expected = {"sweep": words + ray, "report": words}.get(words[1], [words[0], "ray-run", *ray, "--", *words[1:]])
        assert after.split() == expected
