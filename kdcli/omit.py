"""Digits missing from the transfer set, and the bias correction that brings them back.

    cfg = load_config("experiments/omit-3.yaml")     # omit_digits: [3], val_size: 10000
    run_training(cfg, "omit-class")                  # the student never sees a 3
    section = correct_run(cfg, user_shifts={3: 3.5})  # -> result.json["bias_correction"], bias.png

Hinton, Vinyals & Dean (2015) §3: a student distilled on a transfer set with
no 3 in it still recognises most test 3s from the teacher's soft targets on
the other digits, but its 3-bias is too low; raising it by 3.5 fixes most of
the rest. With only 7s and 8s in the transfer set, lowering the biases of 7
and 8 by 7.6 does the same. A bias shift adds a constant to chosen classes'
logits, which is exactly a change of those output units' biases.

Four protocols are reported side by side:

    none            the student as trained
    user            a shift given on the command line (--bias-shift 3=+3.5)
    validation      one common shift of the omitted (or kept) digits' biases,
                    fitted on the validation split: the honest protocol
    test_optimised  the same search on the test set: the paper's protocol,
                    labelled as such, since it is not an estimate of test error
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from rich.console import Console
from rich.table import Table

from . import runs
from .config import Config
from .errors import ConfigError
from .data import load_dataset
from .device import pick_device
from .evaluate import combine_logits, predict, shift_biases, summarize

# the 1-D search: a common shift of the omitted digits' biases goes up,
# of the kept digits' biases goes down
GRIDS = {"omit": (-2.0, 15.0), "keep": (-15.0, 2.0)}
GRID_STEP = 0.1
PLOT = "bias.png"
LABELS = {
    "none": "no correction",
    "user": "shift given by the user",
    "validation": "chosen on the validation split (honest)",
    "test_optimised": "paper's protocol: chosen on the test set",
}
EXPERIMENT_FILES = {"omit": "omit-3.yaml", "keep": "only-7-8.yaml"}


# --- command-line values ----------------------------------------------------

def parse_digits(specs: Iterable[str], flag: str) -> list[int]:
    """'3,5' or ['3', '5'] -> [3, 5] (sorted, without repeats)."""
    digits: set[int] = set()
    for spec in specs:
        for item in spec.replace(",", " ").split():
            if not item.isdigit():
                raise ConfigError(f"{flag}: '{item}' is not a digit 0-9")
            if not 0 <= int(item) <= 9:
                raise ConfigError(f"{flag}: digit {int(item)} is outside 0-9")
            digits.add(int(item))
    return sorted(digits)


def digit_overrides(digit: list[str] | None, digits: str | None, keep: str | None) -> dict:
    """The config overrides for --digit/--digits/--keep: {} when none was given.

    A flag replaces the experiment file's choice of digits (so --keep 7,8 with
    an omit experiment file keeps 7 and 8 and omits nothing)."""
    omit_given = digit is not None or digits is not None
    if omit_given and keep is not None:
        raise ConfigError("give the digits to omit (--digit/--digits) or the digits to keep (--keep), not both")
    if keep is not None:
        kept = parse_digits([keep], "--keep")
        if not kept:
            raise ConfigError("--keep names no digit: keep at least one, e.g. --keep 7,8")
        if len(kept) == 10:
            raise ConfigError("--keep names every digit, so nothing is omitted: keep fewer")
        return {"keep_digits": kept, "omit_digits": []}
    if omit_given:
        omitted = parse_digits([*(digit or []), *([digits] if digits is not None else [])], "--digit")
        if not omitted:
            raise ConfigError("--digit/--digits names no digit: omit at least one, e.g. --digit 3")
        if len(omitted) == 10:
            raise ConfigError("omitting every digit leaves nothing to train on: omit fewer")
        return {"omit_digits": omitted, "keep_digits": []}
    return {}


def run_name(overrides: dict) -> str | None:
    """omit-3, omit-3-5, only-7-8: the default run name for digits given as flags."""
    if overrides.get("keep_digits"):
        return "only-" + "-".join(map(str, overrides["keep_digits"]))
    if overrides.get("omit_digits"):
        return "omit-" + "-".join(map(str, overrides["omit_digits"]))
    return None


def experiment_file(overrides: dict) -> str:
    return EXPERIMENT_FILES["keep" if overrides.get("keep_digits") else "omit"]


def parse_bias_shifts(specs: str | Iterable[str]) -> dict[int, float]:
    """'3=+3.5' -> {3: 3.5}; '7=-7.6,8=-7.6' -> {7: -7.6, 8: -7.6}. Several strings may be given."""
    shifts: dict[int, float] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        for item in spec.split(","):
            digit, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not digit or not value:
                raise ConfigError(f"bias shift '{item.strip()}': expected DIGIT=SHIFT, e.g. 3=+3.5 or 7=-7.6,8=-7.6")
            if not digit.isdigit() or not 0 <= int(digit) <= 9:
                raise ConfigError(f"bias shift '{item.strip()}': '{digit}' is not a digit 0-9")
            try:
                delta = float(value)
            except ValueError:
                raise ConfigError(f"bias shift '{item.strip()}': '{value}' is not a number") from None
            if not math.isfinite(delta):
                raise ConfigError(f"bias shift '{item.strip()}': the shift must be a finite number")
            if int(digit) in shifts:
                raise ConfigError(f"bias shift: digit {int(digit)} is given twice")
            shifts[int(digit)] = delta
    return shifts


def check_config(cfg: Config) -> None:
    """What omit-class needs beyond a valid config: digits to omit, and a validation split."""
    if not cfg.omit_digits and not cfg.keep_digits:
        raise ConfigError("omit-class needs digits to omit or keep: pass --digit 3 or --keep 7,8 "
                          "(or set omit_digits / keep_digits in the experiment file)")
    if len(set(cfg.keep_digits)) == 10:
        raise ConfigError("'keep_digits' names every digit, so nothing is omitted: keep fewer")
    if cfg.val_size <= 0:
        raise ConfigError("omit-class fits the bias shift on a validation split: set 'val_size' > 0 "
                          "(the experiments use 10000)")


def mode_and_digits(cfg: Config) -> tuple[str, list[int], list[int]]:
    """('omit' or 'keep', digits whose biases shift, digits absent from the transfer set)."""
    if cfg.keep_digits:
        kept = sorted(set(cfg.keep_digits))
        return "keep", kept, [d for d in range(10) if d not in kept]
    omitted = sorted(set(cfg.omit_digits))
    return "omit", omitted, omitted


# --- the search ---------------------------------------------------------------

def shift_grid(mode: str, step: float = GRID_STEP) -> list[float]:
    """The shifts searched, from GRIDS[mode], on a grid that contains 0 exactly."""
    lo, hi = GRIDS[mode]
    return [round(lo + k * step, 6) for k in range(round((hi - lo) / step) + 1)]


def errors_along(log_probs: torch.Tensor, labels: torch.Tensor, columns: list[int], shifts: list[float],
                 counted: list[int] | None = None, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors when shifts[k] is added to every column in `columns`: (total, on `counted` labels), each (len(shifts),).

    The same float operation as shift_biases, so a point of the curve equals
    the summary of that shift exactly."""
    mask = torch.zeros(log_probs.shape[-1], dtype=log_probs.dtype, device=log_probs.device)
    mask[columns] = 1.0
    on_counted = torch.isin(labels, torch.tensor(counted if counted is not None else columns, device=labels.device))
    totals, counted_errors = [], []
    for i in range(0, len(shifts), chunk):
        s = torch.tensor(shifts[i : i + chunk], dtype=log_probs.dtype, device=log_probs.device)
        wrong = (log_probs + s[:, None, None] * mask).argmax(-1) != labels  # (k, n)
        totals.append(wrong.sum(-1))
        counted_errors.append(wrong[:, on_counted].sum(-1))
    return torch.cat(totals).cpu(), torch.cat(counted_errors).cpu()


def best_shift(shifts: list[float], errors: Iterable[int]) -> float:
    """The shift with the fewest errors; ties go to the smallest |shift| (then the lower one)."""
    return min(zip(errors, shifts), key=lambda es: (int(es[0]), abs(es[1]), es[1]))[1]


def fit_shift(log_probs: torch.Tensor, labels: torch.Tensor, columns: list[int], shifts: list[float]) -> float:
    """One common shift of `columns` that minimises the errors on (log_probs, labels)."""
    return best_shift(shifts, errors_along(log_probs, labels, columns, shifts)[0].tolist())


# --- the protocols --------------------------------------------------------------

def protocol_summary(shifts: dict[int, float], label: str, test: tuple, val: tuple, omitted: list[int]) -> dict:
    """Test errors (total, on the omitted digits, per class) and validation errors under one bias shift."""
    test_lp, test_y = test
    val_lp, val_y = val
    # re-normalised, so the NLL is that of the corrected model; the argmax is unchanged
    s = summarize(shift_biases(test_lp, shifts).log_softmax(-1), test_y)
    omitted_errors = sum(s["per_class_errors"][d] for d in omitted)
    omitted_count = sum(s["per_class_count"][d] for d in omitted)
    values = set(shifts.values())
    return {
        "label": label,
        "shift": values.pop() if len(values) == 1 else None,  # the common shift, when there is one
        "shifts": {str(d): v for d, v in sorted(shifts.items())},
        "n_errors": s["n_errors"],
        "n_examples": s["n_examples"],
        "errors_per_10k": s["errors_per_10k"],
        "accuracy": s["accuracy"],
        "nll": s["nll"],
        "omitted_n_errors": omitted_errors,
        "omitted_n_examples": omitted_count,
        "omitted_share_correct": round(1 - omitted_errors / omitted_count, 6) if omitted_count else None,
        "per_class_errors": s["per_class_errors"],
        "per_class_count": s["per_class_count"],
        "val_n_errors": int((shift_biases(val_lp, shifts).argmax(-1) != val_y).sum()),
        "val_n_examples": len(val_y),
    }


def bias_correction(mode: str, digits: list[int], omitted: list[int], test: tuple, val: tuple,
                    user_shifts: dict[int, float] | None = None, grid: list[float] | None = None) -> dict:
    """The result.json section: every protocol, the chosen shifts and the error curves.

    test, val: (log_probs (n, 10), labels (n,)). `digits` are the columns whose
    common shift is searched; `omitted` the digits absent from the transfer set."""
    grid = grid if grid is not None else shift_grid(mode)
    test_errors, test_omitted = errors_along(*test, digits, grid, counted=omitted)
    val_errors, _ = errors_along(*val, digits, grid, counted=omitted)
    chosen = {"validation": best_shift(grid, val_errors.tolist()), "test_optimised": best_shift(grid, test_errors.tolist())}
    protocols = {"none": protocol_summary({d: 0.0 for d in digits}, LABELS["none"], test, val, omitted)}
    if user_shifts:
        protocols["user"] = protocol_summary(user_shifts, LABELS["user"], test, val, omitted)
    for name, shift in chosen.items():
        protocols[name] = protocol_summary({d: shift for d in digits}, LABELS[name], test, val, omitted)
    return {
        "digits": digits,
        "mode": mode,
        "omitted_digits": omitted,
        "grid": {"start": grid[0], "stop": grid[-1], "step": GRID_STEP if len(grid) < 2 else round(grid[1] - grid[0], 6)},
        "protocols": protocols,
        "curve": {"shifts": grid, "test_n_errors": test_errors.tolist(), "val_n_errors": val_errors.tolist(),
                  "test_omitted_n_errors": test_omitted.tolist()},
    }


def blind_bias_correction(mode: str, digits: list[int], omitted: list[int], val: tuple,
                          user_shifts: dict[int, float] | None = None, grid: list[float] | None = None) -> dict:
    """bias_correction for a blind run (test_eval: false): the validation split alone,
    so no test-optimised protocol and no test figure."""
    grid = grid if grid is not None else shift_grid(mode)
    val_errors, val_omitted = errors_along(*val, digits, grid, counted=omitted)
    val_lp, val_y = val

    def summary(shifts: dict[int, float], name: str) -> dict:
        wrong = shift_biases(val_lp, shifts).argmax(-1) != val_y
        on_omitted = torch.isin(val_y, torch.tensor(omitted, device=val_y.device))
        values = set(shifts.values())
        return {"label": LABELS[name], "shift": values.pop() if len(values) == 1 else None,
                "shifts": {str(d): v for d, v in sorted(shifts.items())},
                "val_n_errors": int(wrong.sum()), "val_n_examples": len(val_y),
                "val_omitted_n_errors": int(wrong[on_omitted].sum()), "val_omitted_n_examples": int(on_omitted.sum())}

    protocols = {"none": summary({d: 0.0 for d in digits}, "none")}
    if user_shifts:
        protocols["user"] = summary(user_shifts, "user")
    protocols["validation"] = summary({d: best_shift(grid, val_errors.tolist()) for d in digits}, "validation")
    return {
        "digits": digits, "mode": mode, "omitted_digits": omitted, "test_eval": False,
        "grid": {"start": grid[0], "stop": grid[-1], "step": GRID_STEP if len(grid) < 2 else round(grid[1] - grid[0], 6)},
        "protocols": protocols,
        "curve": {"shifts": grid, "val_n_errors": val_errors.tolist(), "val_omitted_n_errors": val_omitted.tolist()},
    }


def correct_run(cfg: Config, user_shifts: dict[int, float] | None = None) -> dict:
    """Fit and record the bias correction of a finished omit-class run.

    Adds result.json["bias_correction"] and writes bias.png into the run directory."""
    run_dir = cfg.run_dir
    result = runs.read_result(run_dir)
    if result is None:
        raise runs.RunError(f"{run_dir}: no readable {runs.RESULT}: is the run finished?")
    model, _ = runs.load_model(run_dir)
    device = pick_device(cfg.device)
    data = load_dataset(cfg, device)
    model.to(device)
    mode, digits, omitted = mode_and_digits(cfg)
    val = (combine_logits(predict(model, data.val_x)), data.val_y)  # (n, 10) log-probabilities
    if cfg.test_eval:
        test = (combine_logits(predict(model, data.test_x)), data.test_y)
        section = bias_correction(mode, digits, omitted, test, val, user_shifts)
    else:
        section = blind_bias_correction(mode, digits, omitted, val, user_shifts)
    plot_bias(section, run_dir / PLOT, title=f"{cfg.name}: {describe(section)}")
    section["plot"] = PLOT
    result["bias_correction"] = section
    runs.write_json(run_dir / runs.RESULT, result)
    return section


# --- for people -------------------------------------------------------------------

def describe(section: dict) -> str:
    digits = ", ".join(map(str, section["digits"]))
    if section["mode"] == "keep":
        return f"transfer set of only {digits}"
    return f"{digits} omitted from the transfer set"


def format_shift(protocol: dict) -> str:
    if protocol["shift"] is not None:
        return f"{protocol['shift']:+g}" if protocol["shift"] else "0"
    return ", ".join(f"{d}={v:+g}" for d, v in protocol["shifts"].items())


def print_blind_bias_correction(section: dict, console: Console) -> None:
    protocols = section["protocols"]
    first = protocols["none"]
    omitted = ",".join(map(str, section["omitted_digits"])) if len(section["omitted_digits"]) <= 3 else "omitted"
    table = Table(title=f"bias correction (blind: validation only): {describe(section)}")
    table.add_column("protocol", no_wrap=True)
    table.add_column(f"shift of {','.join(map(str, section['digits']))}", justify="right")
    table.add_column(f"val errors (of {first['val_n_examples']:,})", justify="right")
    table.add_column(f"on {omitted} (of {first['val_omitted_n_examples']:,})", justify="right")
    for name, p in protocols.items():
        table.add_row(name, format_shift(p), str(p["val_n_errors"]), str(p["val_omitted_n_errors"]),
                      style="bold" if name == "validation" else None)
    console.print(table)


def print_bias_correction(section: dict, console: Console) -> None:
    if section.get("test_eval") is False:
        print_blind_bias_correction(section, console)
        return
    protocols = section["protocols"]
    first = protocols["none"]
    omitted = ",".join(map(str, section["omitted_digits"])) if len(section["omitted_digits"]) <= 3 else "omitted"
    moved = ",".join(map(str, section["digits"]))
    caption = "\n".join(f"{name}: {p['label']}" for name, p in protocols.items() if name != "none")
    table = Table(title=f"bias correction: {describe(section)}", caption=caption, caption_justify="left")
    table.add_column("protocol", no_wrap=True, min_width=len("test_optimised"))
    table.add_column(f"shift of {moved}", justify="right")
    table.add_column(f"test errors (of {first['n_examples']:,})", justify="right")
    table.add_column(f"on {omitted} (of {first['omitted_n_examples']:,})", justify="right")
    table.add_column(f"{omitted} correct", justify="right")
    table.add_column(f"val errors (of {first['val_n_examples']:,})", justify="right")
    for name, p in protocols.items():
        share = "" if p["omitted_share_correct"] is None else f"{p['omitted_share_correct']:.1%}"
        table.add_row(name, format_shift(p), str(p["n_errors"]), str(p["omitted_n_errors"]), share,
                      str(p["val_n_errors"]), style="bold" if name == "validation" else None)
    console.print(table)
    per_class = Table(title="per-class test errors")
    per_class.add_column("protocol")
    for c in range(10):
        per_class.add_column(str(c), justify="right")
    for name, p in protocols.items():
        per_class.add_row(name.replace("_", " "), *map(str, p["per_class_errors"]))  # wraps in narrow terminals
    per_class.add_row("of", *map(str, first["per_class_count"]), style="dim")
    console.print(per_class)


def plot_bias(section: dict, path: Path, title: str = "") -> Path:
    """Test and validation errors (per 10,000) against the shift, chosen shifts marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    curve, protocols = section["curve"], section["protocols"]
    if section.get("test_eval") is False:
        return plot_blind_bias(section, path, title)
    per_10k = lambda errors, n: [e * 10000 / n for e in errors]  # noqa: E731
    n_test, n_val = protocols["none"]["n_examples"], protocols["none"]["val_n_examples"]
    omitted = ",".join(map(str, section["omitted_digits"]))
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curve["shifts"], per_10k(curve["test_n_errors"], n_test), label=f"test ({n_test:,} images)", color="C0")
    ax.plot(curve["shifts"], per_10k(curve["val_n_errors"], n_val), label=f"validation ({n_val:,} images)", color="C1")
    ax.plot(curve["shifts"], per_10k(curve["test_omitted_n_errors"], n_test), label=f"test, errors on {omitted}",
            color="C0", linestyle=":")
    marks = {"validation": ("C2", "--"), "test_optimised": ("C3", "-."), "user": ("C4", ":")}
    for name, (color, style) in marks.items():
        p = protocols.get(name)
        if p is None or p["shift"] is None:
            continue
        ax.axvline(p["shift"], color=color, linestyle=style,
                   label=f"{name}: {p['shift']:+g} → {p['n_errors'] * 10000 / n_test:g} test errors / 10k")
    finish_bias_axes(ax, section, title, log=min(curve["test_omitted_n_errors"] + curve["val_n_errors"]) > 0)
    return runs.save_figure(fig, path)


def finish_bias_axes(ax, section: dict, title: str, log: bool) -> None:
    """Zero-shift line, scale, labels, grid and legend of a bias-correction plot."""
    ax.axvline(0.0, color="grey", linewidth=0.8)
    if log:
        ax.set_yscale("log")
    else:  # log-like, and a curve that reaches zero errors still plots
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(bottom=0)
    ax.set_xlabel(f"shift added to the biases of {', '.join(map(str, section['digits']))}")
    ax.set_ylabel("errors per 10,000")
    ax.set_title(title or describe(section))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def plot_blind_bias(section: dict, path: Path, title: str = "") -> Path:
    """A blind run's curve: validation errors (per 10,000) against the shift, the chosen shift marked."""
    from matplotlib.figure import Figure

    curve, chosen = section["curve"], section["protocols"]["validation"]
    n_val = section["protocols"]["none"]["val_n_examples"]
    omitted = ",".join(map(str, section["omitted_digits"]))
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(curve["shifts"], [e * 10000 / n_val for e in curve["val_n_errors"]], label=f"validation ({n_val:,} images)", color="C1")
    ax.plot(curve["shifts"], [e * 10000 / n_val for e in curve["val_omitted_n_errors"]],
            label=f"validation, errors on {omitted}", color="C1", linestyle=":")
    ax.axvline(chosen["shift"], color="C2", linestyle="--", label=f"validation: {chosen['shift']:+g}")
    finish_bias_axes(ax, section, title, log=False)
    return runs.save_figure(fig, path)
