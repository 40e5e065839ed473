"""The bad-input battery: every mistake a user can fix, through the real CLI.

For each case: exit code 2, exactly one line on stderr naming the problem,
no traceback, and nothing that existed before (a finished run, an
interrupted run, the data, the experiment files) changed or added to.
"""

import hashlib
import os
import pickle
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_idx
from kdcli.cli import app
from kdcli.config import make_config
from kdcli.models import StackedMLP
from kdcli.runs import save_checkpoint
from kdcli.train import Hooks, run_training

runner = CliRunner()
TINY = ["--hidden", "8", "--epochs", "1", "--device", "cpu"]


class RunsCode:
    """Unpickling this would create the file it names: proof that no code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(root):
    """Every path under root with a hash of its bytes (directories too, so additions show)."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            tree[os.path.relpath(os.path.join(folder, d), root)] = "dir"
        for f in files:
            path = os.path.join(folder, f)
            tree[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return tree


def broken_data(ws, name, data, **replace):
    """A copy of the data folder with some IDX files replaced: stem -> tensor or raw bytes."""
    folder = ws / name
    shutil.copytree(data, folder)
    for stem, content in replace.items():
        path = folder / f"{stem}.gz"
        path.unlink()
        if isinstance(content, bytes):
            (folder / stem).write_bytes(content)
        else:
            write_idx(folder / stem, content, compress=False)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory, synthetic_dir):
    ws = tmp_path_factory.mktemp("ws")
    data = ws / "data"
    shutil.copytree(synthetic_dir, data)
    base = dict(data_dir=str(data), hidden=[8], epochs=3, batch_size=100, device="cpu")
    run_training(make_config({**base, "epochs": 1, "out": str(ws / "teacher")}), "train-teacher")

    def stop_in_epoch_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(make_config({**base, "out": str(ws / "cut")}), "train-teacher", Hooks(on_epoch=stop_in_epoch_2))

    raw = (ws / "data" / "train-images-idx3-ubyte.gz").read_bytes()
    broken_data(ws, "bad-magic", data, **{"train-images-idx3-ubyte": b"\x12\x34\x56\x78" + bytes(64)})
    broken_data(ws, "bad-trunc", data, **{"t10k-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(150)})
    broken_data(ws, "bad-count", data, **{"train-labels-idx1-ubyte": torch.zeros(599, dtype=torch.uint8)})
    broken_data(ws, "bad-size", data, **{"t10k-images-idx3-ubyte": torch.zeros(200, 20, 20, dtype=torch.uint8)})
    shutil.copytree(data, ws / "bad-gzip")
    (ws / "bad-gzip" / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])

    ckpt = ws / "ckpt"
    ckpt.mkdir()
    torch.save({"arch": {"hidden": [8]}, "state_dict": {}, "payload": RunsCode(ws / "PWNED")}, ckpt / "code.pt")
    (ckpt / "pickle.pt").write_bytes(pickle.dumps(RunsCode(ws / "PWNED")))
    (ckpt / "random.pt").write_bytes(os.urandom(4096))
    (ckpt / "empty.pt").write_bytes(b"")
    (ckpt / "text.pt").write_text("these are not the weights you are looking for\n")
    good = (ws / "teacher" / "model.pt").read_bytes()
    (ckpt / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save({"weights": torch.zeros(3)}, ckpt / "foreign.pt")
    other = StackedMLP([16])
    payload = {"arch": {**other.arch, "hidden": [32]}, "state_dict": other.state_dict(), "config": {}}
    torch.save(payload, ckpt / "other-arch.pt")
    save_checkpoint(ckpt / "five-classes.pt", StackedMLP([8], n_classes=5), {"dataset": "mnist"})
    (ws / "empty-run").mkdir()

    (ws / "ok.yaml").write_text(f"hidden: [8]\nepochs: 1\ndevice: cpu\ndata_dir: {data}\n")
    yamls = {
        "malformed.yaml": "epochs: [1,\nhidden: 8\n",
        "list.yaml": "- epochs: 1\n- hidden: 8\n",
        "scalar.yaml": "just a sentence\n",
        "near-miss.yaml": "epoch: 3\n",
        "unknown.yaml": "banana: 3\n",
        "wrong-type.yaml": "epochs: three\n",
        "wrong-list.yaml": "hidden: {a: 1}\n",
        "empty-hidden.yaml": "hidden: []\n",
        "negative-batch.yaml": "batch_size: -5\n",
        "precision.yaml": "precision: half\n",
        "dataset.yaml": "dataset: cifar10\n",
        "bool.yaml": "early_stopping: maybe\n",
    }
    for name, text in yamls.items():
        (ws / name).write_text(text)
    (ws / "binary.yaml").write_bytes(b"\xff\xfe\x00epochs: 1\n")
    (ws / "afile").write_text("a file where a folder should be\n")
    return ws


CASES = [
    # (id, args; {ws} is the workspace, expected words in the one line)
    ("malformed yaml", ["train-teacher", "-c", "{ws}/malformed.yaml"], "malformed YAML"),
    ("yaml not a mapping (list)", ["train-teacher", "-c", "{ws}/list.yaml"], "must be a mapping"),
    ("yaml not a mapping (scalar)", ["distill", "-c", "{ws}/scalar.yaml"], "must be a mapping"),
    ("yaml not utf-8", ["train-teacher", "-c", "{ws}/binary.yaml"], "cannot read"),
    ("missing yaml", ["train-ensemble", "-c", "{ws}/nope.yaml"], "not found"),
    ("unknown key, near miss", ["train-teacher", "-c", "{ws}/near-miss.yaml"], "did you mean 'epochs'"),
    ("unknown key, no suggestion", ["train-teacher", "-c", "{ws}/unknown.yaml"], "unknown key 'banana'"),
    ("wrong type in yaml", ["train-teacher", "-c", "{ws}/wrong-type.yaml"], "'epochs' must be an integer"),
    ("wrong list type in yaml", ["train-teacher", "-c", "{ws}/wrong-list.yaml"], "'hidden' must be a list"),
    ("wrong bool in yaml", ["train-teacher", "-c", "{ws}/bool.yaml"], "'early_stopping' must be true or false"),
    ("wrong type flag", ["train-teacher", "--epochs", "three"], "--epochs"),
    ("unknown flag", ["train-teacher", "--epoch", "3"], "No such option"),
    ("unknown command", ["train-student"], "No such command"),
    ("T = 0", ["distill", "--T", "0"], "'temperature' must be > 0"),
    ("T < 0", ["distill", "--temperature", "-2"], "'temperature' must be > 0"),
    ("alpha > 1", ["distill", "--alpha", "1.5"], "'alpha' must be in [0, 1]"),
    ("alpha < 0", ["distill", "--alpha", "-0.1"], "'alpha' must be in [0, 1]"),
    ("unknown match", ["distill", "--match", "mse"], "'match' must be one of soft_targets, logits"),
    ("unknown precision", ["train-teacher", "--precision", "fp16"], "'precision' must be one of fp32, bf16"),
    ("unknown precision in yaml", ["distill", "-c", "{ws}/precision.yaml"], "'precision' must be one of fp32, bf16, got 'half'"),
    ("negative epochs", ["train-teacher", "--epochs", "-3"], "'epochs' must be at least 1"),
    ("zero batch size", ["train-ensemble", "--batch-size", "0"], "'batch_size' must be at least 1"),
    ("negative batch size in yaml", ["train-teacher", "-c", "{ws}/negative-batch.yaml"], "'batch_size' must be at least 1"),
    ("empty hidden flag", ["train-teacher", "--hidden", ","], "'hidden' must list at least one"),
    ("empty hidden yaml", ["train-teacher", "-c", "{ws}/empty-hidden.yaml"], "'hidden' must list at least one"),
    ("zero members", ["train-ensemble", "--members", "0"], "members"),
    ("unknown dataset flag", ["train-teacher", "--dataset", "cifar10"], "'dataset' must be one of"),
    ("unknown dataset yaml", ["train-teacher", "-c", "{ws}/dataset.yaml"], "'dataset' must be one of"),
    ("missing data dir", ["train-teacher", "--data-dir", "{ws}/no-such-folder", *TINY], "mnist not found"),
    ("idx wrong magic", ["train-teacher", "--data-dir", "{ws}/bad-magic", *TINY], "train-images-idx3-ubyte: not an IDX file"),
    ("idx truncated", ["train-teacher", "--data-dir", "{ws}/bad-trunc", *TINY], "t10k-labels-idx1-ubyte: truncated"),
    ("idx corrupt gzip", ["train-teacher", "--data-dir", "{ws}/bad-gzip", *TINY], "train-images-idx3-ubyte.gz: cannot read"),
    ("idx count mismatch", ["train-teacher", "--data-dir", "{ws}/bad-count", *TINY], "599 labels for 600 images"),
    ("idx image size", ["eval", "{ws}/teacher", "--data-dir", "{ws}/bad-size"], "t10k-images-idx3-ubyte: expected 28x28"),
    ("teacher with code", ["distill", "--teacher", "{ws}/ckpt/code.pt", *TINY], "refused to load"),
    ("teacher raw pickle", ["distill", "--teacher", "{ws}/ckpt/pickle.pt", *TINY], "not a readable checkpoint"),
    ("teacher random bytes", ["distill", "--teacher", "{ws}/ckpt/random.pt", *TINY], "not a readable checkpoint"),
    ("teacher truncated", ["distill", "--teacher", "{ws}/ckpt/truncated.pt", *TINY], "not a readable checkpoint"),
    ("teacher not kdcli", ["distill", "--teacher", "{ws}/ckpt/foreign.pt", *TINY], "not a kdcli checkpoint"),
    ("teacher other architecture", ["distill", "--teacher", "{ws}/ckpt/other-arch.pt", *TINY], "do not fit"),
    ("teacher output size", ["distill", "--teacher", "{ws}/ckpt/five-classes.pt", *TINY], "5 outputs"),
    ("teacher run without checkpoint", ["distill", "--teacher", "{ws}/empty-run", *TINY], "no checkpoint"),
    ("teacher unfinished run", ["distill", "--teacher", "{ws}/cut", *TINY], "--resume"),
    ("teacher missing", ["distill", "--teacher", "{ws}/no-such-run", *TINY], "not found"),
    ("eval empty file", ["eval", "{ws}/ckpt/empty.pt"], "not a readable checkpoint"),
    ("eval text file", ["eval", "{ws}/ckpt/text.pt"], "not a readable checkpoint"),
    ("eval code", ["eval", "{ws}/ckpt/code.pt"], "refused to load"),
    ("eval missing run", ["eval", "{ws}/no-such-run"], "no checkpoint"),
    ("finished run, no --force", ["train-teacher", "-c", "{ws}/ok.yaml", "--out", "{ws}/teacher"], "--force"),
    ("interrupted run, no --resume", ["train-teacher", "-c", "{ws}/ok.yaml", "--out", "{ws}/cut"], "--resume"),
    ("resume with nothing to resume", ["train-teacher", "-c", "{ws}/ok.yaml", "--resume"], "nothing to resume"),
    ("resume with other settings", ["train-teacher", "-c", "{ws}/ok.yaml", "--out", "{ws}/cut", "--resume"],
     "saved with epochs = 3"),
    ("output under a file", ["train-teacher", "-c", "{ws}/ok.yaml", "--out", "{ws}/afile/run"], "afile"),
    ("runs of a missing folder", ["runs", "{ws}/no-such-folder"], "no folder of run directories"),
    ("omit-class digit out of range", ["omit-class", "--digit", "12"], "outside 0-9"),
    ("report of a missing folder", ["report", "--runs", "{ws}/no-such-folder", "--out", "{ws}/report"], "no-such-folder"),
]


@pytest.mark.parametrize("args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, args, expected):
    args = [a.replace("{ws}", str(ws)) for a in args]
    if args[0] in ("train-teacher", "distill", "train-ensemble", "omit-class") and "--out" not in args:
        args += ["--out", str(ws / "new")]
    if args[0] in ("train-teacher", "distill", "train-ensemble") and "--data-dir" not in args and "-c" not in args:
        args += ["--data-dir", str(ws / "data")]
    before = snapshot(ws)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(ws) == before
    assert not (ws / "PWNED").exists()


def test_the_battery_is_big_enough():
    assert len(CASES) >= 20
