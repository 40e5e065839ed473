"""Shared fixtures: real MNIST when ../shared/data is there, else a small generated IDX set."""

import gzip
import os
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
# Tiny test models gain nothing from a second thread, and one thread per test
# process keeps the suite from thrashing a 2-core machine (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
SHARED_DATA = REPO.parent / "shared" / "data"
RUNNER = CliRunner()


def kdcli(*args):
    """Run the real CLI in-process; arguments may be paths or numbers."""
    from kdcli.cli import app

    return RUNNER.invoke(app, [str(a) for a in args])


def synthetic_config(synthetic_dir, tmp_path, **extra):
    """A tiny run on the synthetic set (one hidden layer of 24, 3 epochs), on the CPU unless `device` says otherwise."""
    from kdcli.config import make_config

    values = dict(data_dir=str(synthetic_dir), hidden=[24], epochs=3, batch_size=50, lr=0.05,
                  out=str(tmp_path / "run"), device="cpu")
    values.update(extra)
    return make_config(values)


def train_blind(synthetic_dir, tmp_path, epochs: int):
    """`kdcli train-teacher` on a blind experiment file (test_eval: false) into tmp_path/run; the CLI's result."""
    experiment = tmp_path / "blind.yaml"
    experiment.write_text(f"data_dir: {synthetic_dir}\nhidden: [24]\nepochs: {epochs}\nbatch_size: 50\n"
                          "val_size: 200\ntest_eval: false\ndevice: cpu\nname: blind\n")
    return kdcli("train-teacher", "-c", experiment, "--out", tmp_path / "run")


def weights(run_dir):
    """A finished run's weights, as model.pt holds them."""
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["state_dict"]


def interrupt_after_epoch(cfg, epoch: int) -> None:
    """Start cfg's run and stop it as Ctrl-C would, from the epoch-`epoch` callback: on_epoch runs
    before that epoch's state is saved, so resume.pt holds epoch `epoch` - 1."""
    from kdcli.train import Hooks, run_training

    def stop(record):
        if record["epoch"] == epoch:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, "train-teacher", Hooks(on_epoch=stop))


def one_line_error(result, code=2):
    """Assert a failure the way users must see it: the exit code, one stderr line, no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def write_idx(path: Path, array: torch.Tensor, compress: bool = True) -> Path:
    """Write a uint8 tensor as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    raw = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_synthetic_mnist(folder: Path, n_train: int = 3000, n_test: int = 1000, seed: int = 0) -> Path:
    """Learnable fake digits: class c lights a bar at row 2 + 2c, plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
        for c in range(10):
            images[labels == c, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A folder with MNIST's four IDX files: the real ones when present."""
    if (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        return SHARED_DATA / "mnist"
    return make_synthetic_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, data_dir) -> Path:
    """A finished smoke teacher run, trained once per test run; tests must not change it."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = kdcli("train-teacher", "-c", "experiments/smoke/teacher.yaml", "--data-dir", data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    return make_synthetic_mnist(tmp_path_factory.mktemp("synthetic"), n_train=600, n_test=200)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """No test reads the user's environment or writes into the repo."""
    monkeypatch.delenv("KDCLI_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO)
