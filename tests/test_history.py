"""The project speaks of the project alone: no tracked text file narrates working sessions or names a path
on a developer's machine."""

import re
import subprocess

import pytest

from conftest import REPO

ORDINALS = r"(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\d+(st|nd|rd|th))"
NARRATION = re.compile(rf"\b({ORDINALS}|this|that|the next|the previous|an earlier|a later|last) sessions?\b|\bsession \d+\b",
                       re.IGNORECASE)
MACHINE_PATH = re.compile(r"(?<![\w.])/(work|root|home/\w+|tmp/(?!pytest))/?\S*")
TEXT = (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".json")


def tracked_text_files():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith(TEXT) or n in ("Makefile", "LICENSE") or n.startswith(".ci/")]


def test_no_tracked_file_narrates_working_sessions_or_names_a_machine_path():
    found = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if NARRATION.search(line) or MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


# The examples are assembled from parts, so this file itself narrates nothing and names no machine path.
WORD = "sess" + "ion"


@pytest.mark.parametrize("line, flagged", [
    (f"Teacher recipe (seventh {WORD}): 200 epochs", True),
    (f"as measured this {WORD}", True),
    ("see " + "/".join(["", "work", "scratch", "rule.md"]), True),
    (f"pytest's scope=\"{WORD}\" fixture", False),
    ("the run directory runs/teacher", False),
])
def test_the_patterns_catch_narration_and_paths(line, flagged):
    assert bool(NARRATION.search(line) or MACHINE_PATH.search(line)) == flagged
