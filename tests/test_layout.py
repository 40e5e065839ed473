"""experiments/ as a user reads it: every experiment file that the Makefile, the READMEs or NOTES name exists,
every experiment file is named by something (a Makefile target, a README, NOTES, kdcli, a test or another file's
`base:`), every smoke file is run by something, and a search's `base:` chain stays inside experiments/search/."""

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from kdcli import rows

EXPERIMENTS = REPO / "experiments"
# a path ends in .yaml; braces {a,b}, optional parts [-x] or [-x|-y] and globs (*) are expanded below
TOKEN = re.compile(r"(?<![\w./-])[\w./{},\[\]|*<>-]*?\.yaml")
SMOKE_RUN = re.compile(r'"make", "--no-print-directory", (?:"-j\d+", )?"([\w-]+)", (?:"[^"]*", )*"EXP=experiments/smoke"')


def expand(pattern: str) -> list[str]:
    """`a-{b,c}[-d|-e].yaml` -> every spelling it stands for: braces are alternatives, brackets optional ones."""
    parts = re.split(r"(\{[^{}]*\}|\[[^\[\]]*\])", pattern)
    choices = []
    for part in parts:
        if part.startswith("{"):
            choices.append(part[1:-1].split(","))
        elif part.startswith("["):
            choices.append([""] + part[1:-1].split("|"))
        else:
            choices.append([part])
    return ["".join(c) for c in itertools.product(*choices)]


def references(text: str, folder: str = "") -> list[tuple[str, list[Path]]]:
    """(as written, the experiment files it names) for each experiment path in `text`. A path counts when it
    contains experiments/, or starts with `folder` (paths relative to experiments/ where the text is written
    there: "" for every .yaml token, "search/" for NOTES). Placeholders (<file>, {name}) are no path; the
    Makefile's $(EXP)/<stem>.yaml comes in through make_plan."""
    found = []
    for token in TOKEN.findall(text):
        if "experiments/" in token:
            relative = token.split("experiments/", 1)[1]
        elif folder is not None and token.startswith(folder):
            relative = token
        else:
            continue
        if re.search(r"<|\$|\{[^},]*\}", relative):
            continue
        paths = []
        for spelling in expand(relative):
            paths += sorted(EXPERIMENTS.glob(spelling)) if "*" in spelling else [EXPERIMENTS / spelling]
        found.append((token, paths))
    return found


def make_plan(exp: str, targets: list[str]) -> str:
    """What `make -n` would run for these targets with EXP=exp: the commands, each naming its experiment file."""
    done = subprocess.run(["make", "-n", "--no-print-directory", *targets, f"EXP={exp}", "TEACHERS=scratch",
                           "SEEDS=1", "RUNS=plan-runs", "RESULTS=plan-results", "KDCLI=kdcli"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_targets() -> list[str]:
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    return [t for t in phony if t not in ("install", "test", "clean", "clean-runs", "gpu-check")]


def smoke_targets() -> set[str]:
    """The Makefile targets a test runs on the smoke experiments (make <target> EXP=experiments/smoke)."""
    return {m for path in (REPO / "tests").glob("*.py") for m in SMOKE_RUN.findall(path.read_text())}


def documents() -> dict[str, list[tuple[str, list[Path]]]]:
    """The texts whose experiment paths must exist: Makefile, README.md, results/NOTES.md, experiments/README.md."""
    return {"Makefile": references((REPO / "Makefile").read_text(), None),
            "README.md": references((REPO / "README.md").read_text(), None),
            "results/NOTES.md": references((REPO / "results" / "NOTES.md").read_text(), "search/"),
            "experiments/README.md": references((EXPERIMENTS / "README.md").read_text(), "")}


def bases() -> dict[Path, Path]:
    found = {}
    for path in EXPERIMENTS.rglob("*.yaml"):
        base = (yaml.safe_load(path.read_text()) or {}).get("base")
        if base:
            found[path.resolve()] = (path.parent / base).resolve()
    return found


def named(paths) -> set[Path]:
    return {p.resolve() for p in paths}


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def test_the_matcher_expands_patterns_and_finds_a_dangling_reference():
    assert expand("search/a-{b,c}[-d|-e].yaml") == [
        "search/a-b.yaml", "search/a-b-d.yaml", "search/a-b-e.yaml",
        "search/a-c.yaml", "search/a-c-d.yaml", "search/a-c-e.yaml"]
    text = ("run `kdcli distill -c experiments/distill.yaml`, `search/vt-e60.yaml` and\n"
            "experiments/search/no-such-search.yaml; not experiments/search/<file>.yaml nor blind.yaml")
    found = dict(references(text, "search/"))
    assert set(found) == {"experiments/distill.yaml", "search/vt-e60.yaml", "experiments/search/no-such-search.yaml"}
    assert [p.is_file() for p in found["experiments/search/no-such-search.yaml"]] == [False]
    assert all(p.is_file() for p in found["experiments/distill.yaml"] + found["search/vt-e60.yaml"])


@needs_make
def test_every_experiment_file_the_makefile_readmes_and_notes_name_exists():
    plans = {"make -n (EXP=experiments)": make_plan("experiments", make_targets())}
    for target in sorted(smoke_targets()):
        plans[f"make -n {target} EXP=experiments/smoke"] = make_plan("experiments/smoke", [target])
    texts = dict(documents())
    texts.update({where: references(plan, None) for where, plan in plans.items()})
    missing = [f"{where}: {token} -> {', '.join(str(p.relative_to(REPO)) for p in paths if not p.is_file()) or 'no file'}"
               for where, found in texts.items() for token, paths in found
               if not paths or not all(p.is_file() for p in paths)]
    assert not missing, "\n".join(missing)


@needs_make
def test_every_experiment_file_is_named_by_something():
    named_by = set()
    for found in documents().values():
        named_by |= named(p for token, paths in found if "*" not in token for p in paths)  # a glob names none
    for plan in [make_plan("experiments", make_targets())] + [make_plan("experiments/smoke", [t])
                                                                for t in smoke_targets()]:
        named_by |= named(p for _, paths in references(plan, None) for p in paths)
    for path in list((REPO / "kdcli").glob("*.py")) + list((REPO / "tests").glob("*.py")):
        if path.name != "test_layout.py":
            named_by |= named(p for _, paths in references(path.read_text(), None) for p in paths)
    named_by |= named(EXPERIMENTS / f"{row.experiment}.yaml" for row in rows.ROWS)
    named_by |= set(bases().values())
    orphans = sorted(str(p.relative_to(REPO)) for p in EXPERIMENTS.rglob("*.yaml") if p.resolve() not in named_by)
    assert not orphans, "no Makefile target, README, NOTES, code, test or base names:\n" + "\n".join(orphans)


@needs_make
def test_every_smoke_file_is_run_by_something():
    run = named(p for _, paths in references(make_plan("experiments", ["smoke"]), None) for p in paths)
    assert smoke_targets(), "no test runs a make target on experiments/smoke"
    for target in smoke_targets():
        run |= named(p for _, paths in references(make_plan("experiments/smoke", [target]), None) for p in paths)
    for path in (REPO / "tests").glob("*.py"):
        if path.name != "test_layout.py":
            run |= named(p for _, paths in references(path.read_text(), None) for p in paths)
    parents = bases()
    for path in list(run):  # a file run is run with its whole base chain
        while path in parents:
            path = parents[path]
            run.add(path)
    idle = sorted(p.name for p in (EXPERIMENTS / "smoke").glob("*.yaml") if p.resolve() not in run)
    assert not idle, f"experiments/smoke files no make target or test runs: {idle}"


def test_every_search_files_base_chain_stays_inside_search():
    search = (EXPERIMENTS / "search").resolve()
    parents = bases()
    for path in sorted(search.glob("*.yaml")):
        chain, current = [path.name], path.resolve()
        while current in parents:
            current = parents[current]
            chain.append(str(current.relative_to(EXPERIMENTS.resolve())))
            assert current.parent == search, f"{' -> '.join(chain)}: a search must not inherit a live recipe"
