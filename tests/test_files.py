"""Safe files: checkpoints that load no code, IDX checks, a full disk, an unwritable folder."""

import errno
import json
import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, write_idx
from kdcli import runs
from kdcli.cli import app
from kdcli.config import make_config
from kdcli.data import DataError, load_dataset, read_idx
from kdcli.models import StackedMLP
from kdcli.runs import RunError, load_model, read_checkpoint, save_checkpoint
from kdcli.train import Hooks, run_training

runner = CliRunner()


def tiny_config(synthetic_dir, out, **extra):
    values = dict(data_dir=str(synthetic_dir), hidden=[8], epochs=2, batch_size=100, device="cpu", out=str(out))
    return make_config({**values, **extra})


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- checkpoints --------------------------------------------------------------

class CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"arch": {}, "state_dict": {}, "x": CreatesFile(marker)}, tmp_path / "zip.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(CreatesFile(marker)))
    with pytest.raises(RunError, match="refused to load.*io.open"):
        read_checkpoint(tmp_path / "zip.pt")
    with pytest.raises(RunError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "raw.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", os.urandom(2000), b"text, not weights\n"], ids=["empty", "random", "text"])
def test_garbage_checkpoints_are_one_clear_error(tmp_path, content):
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(RunError, match="not a readable checkpoint") as caught:
        load_model(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_checkpoints_are_one_clear_error(tmp_path, keep):
    save_checkpoint(tmp_path / "full.pt", StackedMLP([16]), {})
    raw = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(RunError, match="cut.pt: not a readable checkpoint"):
        load_model(tmp_path / "cut.pt")


def test_weights_of_another_architecture_are_named(tmp_path):
    model = StackedMLP([16])
    torch.save({"arch": {**model.arch, "hidden": [12]}, "state_dict": model.state_dict(), "config": {}}, tmp_path / "x.pt")
    with pytest.raises(RunError, match="do not fit the architecture.*size mismatch"):
        load_model(tmp_path / "x.pt")
    torch.save({"arch": ["not", "a", "mapping"], "state_dict": {}}, tmp_path / "y.pt")
    with pytest.raises(RunError, match="do not fit"):
        load_model(tmp_path / "y.pt")


def test_run_directory_without_checkpoint_says_why(tmp_path):
    with pytest.raises(RunError, match="is it a finished kdcli run directory"):
        load_model(tmp_path)
    (tmp_path / "resume.pt").write_bytes(b"")
    with pytest.raises(RunError, match="interrupted: finish it with --resume"):
        load_model(tmp_path)


def test_checkpoints_and_results_are_readable_by_others(tmp_path):
    save_checkpoint(tmp_path / "model.pt", StackedMLP([4]), {})
    runs.write_json(tmp_path / "result.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.pt", "result.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


# --- IDX files --------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    (b"", "bad magic number empty"),
    (b"\x00\x00\x08", "bad magic"),
    (b"\x00\x00\x0d\x03" + bytes(12), "not an IDX file of unsigned bytes"),  # float data
    (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(9), "padded"),
], ids=["empty", "short magic", "float", "short header", "padded"])
def test_broken_idx_files_name_the_file(tmp_path, raw, expected):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=expected) as caught:
        read_idx(path)
    assert str(caught.value).startswith(str(path))


def test_wrong_image_size_names_the_file(tmp_path, synthetic_dir):
    for name in os.listdir(synthetic_dir):
        (tmp_path / name).write_bytes((synthetic_dir / name).read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", torch.zeros(600, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: expected 28x28 images, got shape \(600, 32, 32\)"):
        load_dataset(make_config({"data_dir": str(tmp_path)}), torch.device("cpu"))


# --- a full disk, an unwritable folder ------------------------------------------------

def full_disk_on(monkeypatch, name, after=0):
    """The (after+1)-th write of a file called `name` runs out of space half-way."""
    real_stage, seen = runs._stage, []

    def stage(path, write):
        if path.name == name:
            seen.append(path)
            if len(seen) > after:
                def write_half(f):
                    f.write(b"half a file")
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_stage(path, write_half)
        return real_stage(path, write)

    monkeypatch.setattr(runs, "_stage", stage)


def no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def finished(synthetic_dir, tmp_path):
    cfg = tiny_config(synthetic_dir, tmp_path / "run", epochs=1)
    run_training(cfg, "train-teacher")
    return cfg


@pytest.mark.parametrize("name", ["result.json", "model.pt"])
def test_full_disk_while_saving_keeps_the_previous_result(finished, monkeypatch, name):
    run_dir = finished.run_dir
    before = {k: v for k, v in file_bytes(run_dir).items() if k in ("model.pt", "result.json")}
    full_disk_on(monkeypatch, name)
    result = runner.invoke(app, ["train-teacher", "--data-dir", finished.data_dir, "--hidden", "8", "--epochs", "2",
                                 "--device", "cpu", "--out", str(run_dir), "--force"])
    line = one_line_error(result)
    assert f"cannot write {run_dir / name}: No space left on device" in line
    after = file_bytes(run_dir)
    assert {k: after[k] for k in before} == before
    assert no_temp_files(run_dir)
    assert (run_dir / "resume.pt").is_file()  # the last epoch is still there, for --resume once there is room


def test_full_disk_during_training_keeps_the_last_saved_epoch(synthetic_dir, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic_dir, tmp_path / "run", epochs=3)
    full_disk_on(monkeypatch, "resume.pt", after=1)  # epoch 1 saves, epoch 2 does not
    with pytest.raises(runs.WriteError, match="No space left on device"):
        run_training(cfg, "train-teacher")
    assert torch.load(cfg.run_dir / "resume.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert no_temp_files(cfg.run_dir)
    assert runs.run_status(cfg.run_dir) == "failed"
    monkeypatch.undo()  # space is free again
    result = run_training(cfg, "train-teacher", resume=True)
    assert result["epochs"] == 3 and not (cfg.run_dir / "resume.pt").exists()
    assert runs.run_status(cfg.run_dir) == "finished"


def test_unwritable_run_directory_is_one_line(synthetic_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(runs.tempfile, "mkstemp", refuse)
    result = runner.invoke(app, ["train-teacher", "--data-dir", str(synthetic_dir), "--hidden", "8", "--epochs", "1",
                                 "--device", "cpu", "--out", str(tmp_path / "run")])
    assert "cannot write" in one_line_error(result) and "Permission denied" in result.stderr


def test_eval_json_to_an_unwritable_place_keeps_the_old_file(finished, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_line_error(runner.invoke(app, ["eval", str(finished.run_dir), "--json", str(tmp_path / "afile" / "e.json")]))
    assert "cannot write" in line and "afile" in line


def test_metrics_on_disk_match_the_resumed_history(synthetic_dir, tmp_path):
    cfg = tiny_config(synthetic_dir, tmp_path / "run", epochs=3)

    def stop(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, "train-teacher", Hooks(on_epoch=stop))
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [1, 2]  # epoch 2 was logged, not saved
    run_training(cfg, "train-teacher", resume=True)
    logged = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged] == [1, 2, 3]
