"""kdcli as a package: a wheel installed outside the checkout runs its default experiments."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from conftest import REPO


def run(*args, cwd, env=None):
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_a_wheel_installed_elsewhere_finds_its_recipes_and_trains(tmp_path, data_dir):
    run(sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("kdcli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kdcli/experiments/distill.yaml" in names and "kdcli/experiments/smoke/teacher.yaml" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)

    # a fresh environment: kdcli from the wheel alone; torch and the rest borrowed from this one
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"  # no experiments/ folder, no checkout
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KDCLI_DATA_DIR"}
    where = run(python, "-c", "import kdcli; print(kdcli.__file__)", cwd=elsewhere, env=env).stdout
    assert str(REPO) not in where and str(fresh) in where
    kdcli = fresh / "bin" / "kdcli"
    assert "--T" in run(kdcli, "distill", "--help", cwd=elsewhere, env=env).stdout
    small = ["--data-dir", data_dir, "--set", "train_limit=600", "--set", "test_limit=200", "--epochs", "1"]
    run(kdcli, "train-teacher", *small, "--hidden", "32", "--out", "runs/teacher", cwd=elsewhere, env=env)
    run(kdcli, "distill", "--T", "20", *small, "--hidden", "16", "--out", "runs/distill", cwd=elsewhere, env=env)
    result = json.loads((elsewhere / "runs" / "distill" / "result.json").read_text())
    assert result["config"]["temperature"] == 20 and result["config"]["teacher"] == "runs/teacher"
    assert result["config"]["epochs"] == 1 and result["n_transfer"] == 600

    # the released teachers travel inside the wheel, checksums and all, and the installed kdcli finds them
    released = sorted(sums.parent.name for sums in (REPO / "teachers").glob("*/SHA256SUMS"))
    assert released, "teachers/ holds the released teachers"
    for name in released:
        assert f"kdcli/released/{name}/model.safetensors" in names and f"kdcli/released/{name}/SHA256SUMS" in names
    listing = run(kdcli, "teachers", cwd=elsewhere, env=env).stdout
    assert all(name in listing for name in released)
