"""Tables for people: rich in the terminal, markdown and JSON in results/.

    print_result(result, console)     # after a training command
    evaluate_checkpoint("runs/teacher")  # what `kdcli eval` computes
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import rows as registry
from . import runs, teachers
from .config import make_config
from .data import load_dataset
from .device import pick_device
from .evaluate import agreement, combine_logits, predict, shift_biases, softness, summarize


def evaluate_checkpoint(run: str | Path, data_dir: str | None = None, device: str | None = None,
                        combine: str = "mean_probs", bias_shifts: dict[int, float] | None = None,
                        against: str | Path | None = None) -> dict:
    """Rebuild a model from its checkpoint alone and count its test errors; with
    `against` (another run, e.g. the teacher), also how closely it agrees with it."""
    model, payload = teachers.load_any(run, what="run")  # a run, a checkpoint, or a released teacher by name
    saved = dict(payload.get("config") or {})
    if against is not None:
        reference, reference_payload = teachers.load_any(against)
        reference_dataset = (reference_payload.get("config") or {}).get("dataset", "mnist")
        if reference_dataset != saved.get("dataset", "mnist"):
            raise runs.RunError(f"{against} was trained on {reference_dataset}, {run} on {saved.get('dataset', 'mnist')}")
    cfg = make_config({
        "dataset": saved.get("dataset", "mnist"),
        "data_dir": data_dir if data_dir is not None else saved.get("data_dir"),
        "test_limit": saved.get("test_limit"),
        "device": device or "auto",
    }, source=f"{run}")
    torch_device = pick_device(cfg.device)
    data = load_dataset(cfg, torch_device)
    model.to(torch_device)

    def corrected(log_probs):
        # re-normalised so the NLL is the corrected model's; the argmax is the same
        return shift_biases(log_probs, bias_shifts).log_softmax(-1) if bias_shifts else log_probs

    member_logits = predict(model, data.test_x)
    log_probs = corrected(combine_logits(member_logits, combine))
    result = {"run": str(run), "dataset": cfg.dataset, "members": model.members, "combine": combine,
              "bias_shifts": {str(k): v for k, v in (bias_shifts or {}).items()},
              "test": summarize(log_probs, data.test_y)}
    if against is not None:
        reference.to(torch_device)
        # the training images are the (unjittered) transfer set of a distilled run: agreement there is
        # how well the student copied the teacher, agreement on test how well that copy generalises
        result["agreement"] = {
            "reference": str(against),
            "test": agreement(log_probs, combine_logits(predict(reference, data.test_x), combine)),
            "train": agreement(corrected(combine_logits(predict(model, data.train_x), combine)),
                               combine_logits(predict(reference, data.train_x), combine)),
        }
    if model.members > 1:
        result["member_test_errors"] = [int(summarize(combine_logits(member_logits[k:k + 1]), data.test_y)["n_errors"])
                                        for k in range(model.members)]
    return result


def softness_of_run(run: str | Path, temperatures: list[float], data_dir: str | None = None,
                    device: str | None = None) -> dict:
    """How soft a model's outputs are on its own training images (a teacher's transfer set), at each
    temperature. Reads no test image, so it may be run on a blind search's teachers before a decision."""
    model, payload = teachers.load_any(run, what="run")
    saved = dict(payload.get("config") or {})
    keep = ("dataset", "val_size", "train_limit", "train_subset", "subset_seed")
    cfg = make_config({**{k: saved[k] for k in keep if saved.get(k) is not None},
                       "data_dir": data_dir if data_dir is not None else saved.get("data_dir"),
                       "device": device or "auto", "test_eval": False}, source=f"{run}")
    torch_device = pick_device(cfg.device)
    data = load_dataset(cfg, torch_device)
    model.to(torch_device)
    if model.members > 1:
        raise runs.RunError(f"{run} is a stack of {model.members} models: softness is measured for one model")
    logits = predict(model, data.train_x)[0]
    return {"run": str(run), "dataset": cfg.dataset, "n_images": len(data.train_x),
            "softness": [softness(logits, t) for t in temperatures]}


def per_class_table(per_class_errors: list[int], per_class_count: list[int] | None = None) -> Table:
    table = Table(title="per-class test errors", show_header=True)
    table.add_column("class")
    for c in range(len(per_class_errors)):
        table.add_column(str(c), justify="right")
    table.add_row("errors", *[str(e) for e in per_class_errors])
    if per_class_count:
        table.add_row("of", *[str(n) for n in per_class_count])
    return table


def print_result(result: dict, console: Console) -> None:
    if result.get("test_eval") is False:
        print_blind_result(result, console)
        return
    table = Table(title=f"{result['command']}: {result['name']}")
    for column in ("member", "seed", "T", "test errors", "NLL"):
        table.add_column(column, justify="right")
    for m in result["members"]:
        t = "" if m["temperature"] is None else f"{m['temperature']:g}"
        table.add_row(str(m["member"]), str(m["seed"]), t, str(m["test_errors"]), f"{m['test_nll']:.4f}")
    for rule, s in result.get("ensemble", {}).items():
        table.add_row(f"ensemble ({rule})", "", "", str(s["n_errors"]), f"{s['nll']:.4f}", style="bold")
    console.print(table)
    if "test" in result and len(result["members"]) == 1:
        console.print(per_class_table(result["test"]["per_class_errors"], result["test"]["per_class_count"]))
    console.print(f"{result['epochs']} epochs in {result['train_seconds']:.1f} s "
                  f"({result['samples_per_s']:,.0f} samples/s on {result['device']}), wall {result['wall_seconds']:.1f} s")


def print_blind_result(result: dict, console: Console) -> None:
    """A run with test_eval: false: its validation errors, and how to score it on test once a decision is made."""
    val = result.get("val_errors") or []
    table = Table(title=f"{result['command']}: {result['name']} (blind: validation only)")
    for column in ("member", "seed", "T", "validation errors"):
        table.add_column(column, justify="right")
    for m in result["members"]:
        t = "" if m["temperature"] is None else f"{m['temperature']:g}"
        table.add_row(str(m["member"]), str(m["seed"]), t, str(val[m["member"]]) if m["member"] < len(val) else "–")
    if "val_ensemble_errors" in result:
        table.add_row("ensemble (mean_probs)", "", "", str(result["val_ensemble_errors"]), style="bold")
    console.print(table)
    console.print(f"{result['epochs']} epochs in {result['train_seconds']:.1f} s "
                  f"({result['samples_per_s']:,.0f} samples/s on {result['device']}), wall {result['wall_seconds']:.1f} s")


def print_eval(result: dict, console: Console) -> None:
    test = result["test"]
    table = Table(title=f"eval: {result['run']}")
    for column in ("test errors", "of", "accuracy", "NLL"):
        table.add_column(column, justify="right")
    table.add_row(str(test["n_errors"]), str(test["n_examples"]), f"{test['accuracy']:.4%}", f"{test['nll']:.4f}")
    console.print(table)
    console.print(per_class_table(test["per_class_errors"], test["per_class_count"]))
    if "member_test_errors" in result:
        console.print(f"members' test errors: {result['member_test_errors']} (ensemble rule: {result['combine']})")
    if "agreement" in result:
        table = Table(title=f"agreement with {result['agreement']['reference']}")
        for column in ("images", "count", "top-1 disagreements", "agreement", "KL(reference ‖ this)"):
            table.add_column(column, justify="right")
        for split in ("train", "test"):
            a = result["agreement"][split]
            table.add_row(split, str(a["n_examples"]), str(a["n_disagree"]), f"{a['agreement']:.2%}",
                          f"{a['kl_from_reference']:.4f}")
        console.print(table)



STATUS_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "incomplete": "dim"}


def runs_table(rows: list[dict], title: str = "runs") -> Table:
    """`kdcli runs`: one row per run directory (rows from runs.scan_runs)."""
    table = Table(title=title)
    for column in ("run", "command", "T", "α", "width", "seed", "status", "test errors", "wall"):
        table.add_column(column, justify="left" if column in ("run", "command", "status") else "right",
                         no_wrap=column in ("run", "status"))
    for r in rows:
        t = r["temperature"]
        temperature = "" if t is None else ",".join(f"{x:g}" for x in t) if isinstance(t, list) else f"{t:g}"
        errors = r["test_errors"]
        if r.get("blind"):
            val = r.get("val_errors") or []
            shown = "blind" + (f" (val {', '.join(map(str, val[:3]))}{', …' if len(val) > 3 else ''})" if val else "")
        elif len(errors) > 3:
            shown = f"{min(errors)}–{max(errors)} ({len(errors)} members)"
        else:
            shown = ", ".join(str(e) for e in errors)
        wall = r["wall_seconds"]
        table.add_row(
            r["path"], r["command"], temperature, "" if r["alpha"] is None else f"{r['alpha']:g}",
            "-".join(map(str, r["hidden"] or [])), "" if r["seed"] is None else str(r["seed"]),
            f"[{STATUS_STYLE.get(r['status'], '')}]{r['status_text']}[/]", shown,
            "" if wall is None else f"{wall / 60:.1f} min" if wall >= 60 else f"{wall:.1f} s",
        )
    return table

# --- the paper-vs-kdcli report (`kdcli report`) ------------------------------

PAPER_ROWS = [(r.stem, r.label, r.paper, "errors") for r in registry.PAPER + [registry.FULL_DATA]]
TSWEEP_PAPER = registry.TSWEEP.paper


def collect_results(runs_dir: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(Path(runs_dir).glob(f"*/{runs.RESULT}")):
        result = read_shown_result(path.parent)
        if result is not None:
            found[path.parent.name] = result
    return found


def read_shown_result(run_dir: Path) -> dict | None:
    """A run's result with its command as a reader reruns it: paths relative, and without the
    --force or --resume that depended on what the run folder held when it was made."""
    result = runs.read_result(run_dir)
    if result is not None:
        result["command_line"] = runs.fresh_command(relative_to_cwd(result.get("command_line", "")))
    return result


def relative_to_cwd(text: str) -> str:
    """Paths under the working directory written relative to it: runs made with
    `make RUNS=$PWD/runs` then show the same commands as any user's checkout."""
    return text.replace(f"{Path.cwd()}/", "")


def seed_runs(results: dict[str, dict], stem: str) -> list[dict]:
    """The run named `stem` and its extra seeds `stem-s2`, `stem-s3`, ..."""
    import re

    return [r for name, r in sorted(results.items()) if name == stem or re.fullmatch(re.escape(stem) + r"-s\d+", name)]


def test_errors(result: dict) -> float:
    return result["test"]["n_errors"] * 10000 / result["test"]["n_examples"]


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / baseline: -0.05 is 5% fewer errors than the baseline."""
    return (value - baseline) / baseline


def mean_and_range(values: list[float], mean: str, bound: str, single: str, unit: str = "", one_seed: str = "") -> str:
    """Values over seeds as mean [min–max] in the given formats; one value in `single`, followed by `one_seed`."""
    if not values:
        return "not run"
    average = sum(values) / len(values)
    if len(values) == 1:
        return f"{average:{single}}{unit}{one_seed}"
    return f"{average:{mean}}{unit} [{min(values):{bound}}–{max(values):{bound}}]"


def percent_spread(values: list[float]) -> str:
    """Signed percentages as mean [min–max] over seeds, or one value with "1 seed"."""
    return mean_and_range(values, "+.2f", "+.2f", "+.2f", unit="%", one_seed=" (1 seed)")


def spread(values: list[float]) -> str:
    return mean_and_range(values, ".1f", ".0f", ".0f")


def config_of(result: dict) -> str:
    import shlex

    words = shlex.split(result.get("command_line", ""))
    for flag in ("-c", "--config"):
        if flag in words and words.index(flag) + 1 < len(words):
            return words[words.index(flag) + 1]
    return ""


def paper_rows(results: dict[str, dict]) -> list[dict]:
    rows = []
    for stem, label, paper, _ in PAPER_ROWS:
        rows.append(seeds_row(seed_runs(results, stem), label, paper))
    rows.append(gap_closed_row(rows))
    return rows + extra_rows(results)


def transfer_protocol(result: dict | None) -> str:
    """What a row's student learned from: hard labels, or a teacher on an unjittered or jittered transfer set."""
    if not result:
        return ""
    config = result.get("config") or {}
    jitter = config.get("jitter") or 0
    size = f", {result['n_transfer']:,} images" if result.get("n_transfer") else ""
    if config.get("teacher") or config.get("generalist"):
        return (f"jittered ±{jitter} px" if jitter else "unjittered") + size
    return (f"hard labels, ±{jitter} px jitter" if jitter else "hard labels") + size


PUBLIC_SOURCE = registry.PUBLIC_SOURCE
PUBLIC = registry.public_figures()


def provenance(found: list[dict]) -> dict:
    """Where a row comes from: the transfer set, experiment file and command of its first run (no runs: blank)."""
    first = found[0] if found else None
    return {"transfer": transfer_protocol(first), "config": config_of(first) if first else "",
            "command": first.get("command_line", "") if first else ""}


def wall_of(found: list[dict]) -> float:
    """The training time of a row's runs, summed (the report's closing line adds the rows up)."""
    return round(sum(r.get("wall_seconds", 0) for r in found), 1)


def seeds_row(found: list[dict], label: str, paper: str) -> dict:
    """One report row: test errors of a row's seed runs (none: "not run")."""
    values = [test_errors(r) for r in found]
    return {"experiment": label, "paper": paper, "kdcli": spread(values), "values": values, "seeds": len(found),
            "by_seed": {r.get("seed"): test_errors(r) for r in found},
            **provenance(found),
            "wall_seconds": wall_of(found)}


def share_spread(values: list[float]) -> str:
    """Shares (0.66 = 66%) as mean [min–max] over seeds, or one value with "1 seed"."""
    return mean_and_range(values, ".0%", ".0%", ".0%", one_seed=" (1 seed)")


def gap_closed(hard: float, soft: float, full: float) -> float | None:
    """Share of the hard-labels gap (few data -> all data) that soft targets close; None without a gap."""
    return (hard - soft) / (hard - full) if hard > full else None


def gap_closed_row(rows: list[dict]) -> dict:
    """Share of the 3%-hard -> 100%-hard gap that soft targets close, per seed: seed k's soft targets come
    from teacher k and are compared with seed k's hard-label runs (the paper: 87% on speech)."""
    by_label = {r["experiment"]: r for r in rows}
    hard3, soft3, full = (by_label[PAPER_ROWS[i][1]].get("by_seed", {}) for i in (3, 5, 6))
    seeds = sorted(set(hard3) & set(soft3) & set(full), key=lambda s: (s is None, s))
    shares = [gap_closed(hard3[k], soft3[k], full[k]) for k in seeds]
    paired = [share for share in shares if share is not None]
    value = share_spread(paired) if paired else ("no gap" if seeds else "not run")
    paper = f"{(57.0 - 44.5) / (58.9 - 44.5):.0%} (speech)"
    return {"experiment": "share of the 3% -> 100% gap closed by soft targets", "paper": paper, "kdcli": value,
            "values": paired, "seeds": len(paired), "config": "", "command": "", "wall_seconds": 0}


def extra_rows(results: dict[str, dict]) -> list[dict]:
    """Rows contributed by other experiments (omitted classes, ensembles)."""
    rows = []
    for provider in ROW_PROVIDERS:
        rows += provider(results)
    return rows


ROW_PROVIDERS: list = []  # functions results -> rows, registered by the modules that own them

ENSEMBLE_PAPER = registry.ENSEMBLE_PAPER


def gain_kept(single: float, ensemble: float, distilled: float) -> float | None:
    """Share of the ensemble's gain over a single net that the distilled net keeps; None without a gain."""
    return (single - distilled) / (single - ensemble) if single > ensemble else None


def ensemble_rows(results: dict[str, dict]) -> list[dict]:
    """Table 1 analogue: single net, 10-net ensemble, the single net distilled from it with each transfer-set
    protocol, and for each protocol the share of the ensemble's gain the distilled net keeps."""
    rows = []
    for suffix, dataset in registry.ENSEMBLE_DATASETS:
        found = {part: seed_runs(results, f"{stem}{suffix}") for part, stem, _, _ in registry.ENSEMBLE_PARTS}
        if not any(found.values()):
            continue
        by_seed = {}
        for part, _, label, _ in registry.ENSEMBLE_PARTS:
            if part.startswith("distilled") and not found[part]:
                continue  # a protocol not run (make ensembles runs both)
            row = seeds_row(found[part], f"{dataset}: {label}", ENSEMBLE_PAPER[part])
            by_seed[part] = row.pop("by_seed")  # kept for the share-kept rows, not shown
            nlls = [r["test"]["nll"] for r in found[part]]
            if nlls:
                row["kdcli"] += f", NLL {sum(nlls) / len(nlls):.4f}"
            rows.append(row)
        for part, protocol in (("distilled", "transfer set without jitter"), ("distilled-jitter", "jittered transfer set")):
            if part in by_seed:
                rows.append(share_kept_row(dataset, protocol, found["ensemble"], by_seed["single"], by_seed[part]))
    return rows


def share_kept_row(dataset: str, protocol: str, ensemble_runs: list[dict], single: dict, distilled: dict) -> dict:
    """Seed k's single net and seed k's distilled net against the ensemble (one run of its members)."""
    shares = []
    if ensemble_runs:
        ensemble = test_errors(ensemble_runs[0])
        shares = [gain_kept(single[k], ensemble, distilled[k]) for k in single if k in distilled]
    kept = [share for share in shares if share is not None]
    shown = share_spread(kept) if kept else ("ensemble gained nothing" if shares else "not run")
    return {"experiment": f"{dataset}: share of the ensemble's gain kept by distillation, {protocol}",
            "paper": ENSEMBLE_PAPER["kept"], "kdcli": shown, "values": kept, "seeds": len(kept),
            "config": "", "command": "", "wall_seconds": 0}


ROW_PROVIDERS.append(ensemble_rows)

OMIT_PAPER = {(r.stem, protocol): figure for r in registry.OMITTED for protocol, figure in r.protocols.items()}
OMIT_LABELS = {r.stem: r.label for r in registry.OMITTED}
PROTOCOL_LABELS = registry.PROTOCOLS


def omit_rows(results: dict[str, dict]) -> list[dict]:
    """§3 omitted-class rows: errors under each bias-correction protocol."""
    rows = []
    for stem, experiment in OMIT_LABELS.items():
        found = [r for r in seed_runs(results, stem) if "bias_correction" in r]
        if not found:
            continue
        for protocol, label in PROTOCOL_LABELS.items():
            ps = [r["bias_correction"]["protocols"][protocol] for r in found]
            if stem.startswith("omit-3"):
                values = [p["errors_per_10k"] for p in ps]
                threes = [p["omitted_n_errors"] for p in ps]
                kdcli = f"{spread(values)} ({sum(threes) / len(threes):.0f} threes)"
            else:
                # two decimals: 10,000 test images resolve 0.01%, and a mean of 13.24% must not read
                # as the paper's 13.2% by rounding
                values = [100 * (1 - p["accuracy"]) for p in ps]
                kdcli = f"{sum(values) / len(values):.2f}% error" + (
                    f" [{min(values):.2f}–{max(values):.2f}]" if len(values) > 1 else "")
            shifts = [p["shift"] for p in ps if p["shift"] is not None]
            if protocol != "none" and shifts:
                kdcli += f", shift {sum(shifts) / len(shifts):+.1f}"
            rows.append({"experiment": f"{experiment}: {label}", "paper": OMIT_PAPER[(stem, protocol)],
                         "kdcli": kdcli, "values": values, "seeds": len(found), **provenance(found),
                         "wall_seconds": wall_of(found) if protocol == "none" else 0})
    return rows


ROW_PROVIDERS.insert(0, omit_rows)

# `make jitter`: rows with a jittered (±2 px) transfer set, which the paper did not run; its figures for the
# unjittered rows stand beside them for comparison.
BEYOND_ROWS = [(r.stem, r.label, r.paper) for r in registry.BEYOND]


def beyond_rows(results: dict[str, dict]) -> list[dict]:
    """Rows of `make jitter`, shown only once run."""
    return [seeds_row(found, label, paper) for stem, label, paper in BEYOND_ROWS if (found := seed_runs(results, stem))]


# §5 on JFT (15,000 classes): kdcli's specialists rows are the analogue on 10 classes
SPECIALIST_PAPER = registry.SPECIALIST_PAPER


def specialist_rows(results: dict[str, dict]) -> list[dict]:
    """§5 analogue: generalist alone vs generalist + specialists (KL rule), the
    Table 4 analogue, and the time of training the specialists together."""
    rows = []
    for stem, dataset in (("specialists-fashion", "Fashion-MNIST"), ("specialists-mnist", "MNIST")):
        found = [r for r in seed_runs(results, stem) if "specialists" in r]
        if not found:
            continue
        sections = [r["specialists"] for r in found]
        k = sorted({len(s["clusters"]) for s in sections})
        common = {"seeds": len(found), **provenance(found)}

        def row(label: str, paper: str, kdcli: str, values: list, wall: bool = False) -> dict:
            return {"experiment": f"{dataset} (analogue of §5 on JFT): {label}", "paper": paper, "kdcli": kdcli,
                    "values": values, **common,
                    "wall_seconds": wall_of(found) if wall else 0}

        def accuracy(key: str) -> str:
            values = [100 * s["test"][key]["accuracy"] for s in sections]
            return f"{sum(values) / len(values):.2f}% top-1"

        generalist = [s["test"]["generalist"]["errors_per_10k"] for s in sections]
        combined = [s["test"]["combined"]["errors_per_10k"] for s in sections]
        rows.append(row("generalist alone, test errors", SPECIALIST_PAPER["generalist"],
                        f"{spread(generalist)} ({accuracy('generalist')})", generalist))
        controls = {r.get("seed"): r for r in seed_runs(results, stem.replace("specialists-", "specialists-control-"))}
        if controls:
            control = [test_errors(controls[r.get("seed")]) for r in found if r.get("seed") in controls]
            # the control row names its own runs' recipe and command, not the specialists'
            rows.append({**row("control: the generalist trained further with the specialists' recipe, no clusters",
                               "—", spread(control), control), "seeds": len(control), **provenance([controls[min(controls)]])})
        rows.append(row(f"generalist + {'/'.join(map(str, k))} specialists, KL combination", SPECIALIST_PAPER["combined"],
                        f"{spread(combined)} ({accuracy('combined')})", combined, wall=True))
        if controls:
            paired = [(s["test"]["combined"]["errors_per_10k"], test_errors(controls[r.get("seed")]))
                      for r, s in zip(found, sections) if r.get("seed") in controls]
            over = [100 * relative_change(mine, base) for mine, base in paired]
            rows.append({**row("what specialists add over the control: relative change of errors", "—",
                               percent_spread(over), over), "seeds": len(over)})
        def mean_range(values: list[float]) -> str:
            shown = f"{sum(values) / len(values):+.2f}%"
            return shown + (f" [{min(values):+.2f}–{max(values):+.2f}]" if len(values) > 1 else "")

        relative = [100 * s["test"]["relative_accuracy_change"] for s in sections]
        errors = [100 * s["test"]["relative_error_change"] for s in sections if s["test"]["relative_error_change"] is not None]
        shown = f"accuracy {mean_range(relative)}" + (f", errors {mean_range(errors)}" if errors else "")
        rows.append(row("relative change of accuracy and of errors", SPECIALIST_PAPER["relative"], shown, relative))
        pooled: dict[int, list[int]] = {}  # specialists covering -> [images, Δ correct, generalist correct]
        for s in sections:
            for b in s["test"]["by_coverage"]:
                total = pooled.setdefault(b["n_specialists"], [0, 0, 0])
                for i, key in enumerate(("n_examples", "delta_correct", "generalist_correct")):
                    total[i] += b[key]
        coverage = "; ".join(f"{c}: {d:+d} of {n:,} images ({d / g:+.2%})" if g else f"{c}: {d:+d} of {n:,}"
                             for c, (n, d, g) in sorted(pooled.items()))
        rows.append(row("by specialists covering the true class (Table 4 analogue, seeds pooled)",
                        SPECIALIST_PAPER["coverage"], coverage, []))
        timing = [s["timing"] for s in sections if s.get("timing")]
        if timing:
            together = sum(t["together_s"] for t in timing) / len(timing)
            sequential = sum(t["sequential_s"] for t in timing) / len(timing)
            shown = f"{together:.2f} s vs {sequential:.2f} s ({sequential / together:.2f}x)"
            runs_together = [t["run_together_s"] for t in timing if "run_together_s" in t]
            estimates = [t["run_sequential_estimate_s"] for t in timing if "run_sequential_estimate_s" in t]
            if runs_together and estimates:
                shown += (f"; whole run {sum(runs_together) / len(runs_together):.0f} s together, "
                          f"≈ {sum(estimates) / len(estimates):.0f} s one after another")
            rows.append(row(f"time of {timing[0]['steps']} training steps, all specialists together vs one after "
                            f"another ({timing[0]['device']})", SPECIALIST_PAPER["timing"], shown, []))
    return rows


ROW_PROVIDERS.append(specialist_rows)
ROW_PROVIDERS.append(beyond_rows)


def tsweep_runs(results: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """{width: {seed: result}} from the sweep's runs: tsweep-<width> (seed 1) and tsweep-s<k>-<width>."""
    import re

    found: dict[str, dict[int, dict]] = {}
    for name, result in results.items():
        if "members" not in result:
            continue
        seeded = re.fullmatch(r"tsweep-s(\d+)-(.+)", name)
        plain = re.fullmatch(r"tsweep-(.+)", name)
        if seeded:
            found.setdefault(seeded.group(2), {})[int(seeded.group(1))] = result
        elif plain:
            found.setdefault(plain.group(1), {})[1] = result
    return found


def tsweep_table(results: dict[str, dict]) -> dict[str, dict[float, float]]:
    """{width: {T: test errors, the mean over the sweep's seeds}}, widest first."""
    sweep = {}
    for width, by_seed in tsweep_runs(results).items():
        errors: dict[float, list[int]] = {}
        for result in by_seed.values():
            for m in result["members"]:
                errors.setdefault(m["temperature"], []).append(m["test_errors"])
        sweep[width] = {t: round(sum(e) / len(e), 1) for t, e in errors.items()}
    return dict(sorted(sweep.items(), key=lambda kv: -int(kv[0].split("x")[0]) if kv[0].split("x")[0].isdigit() else 0))


def tsweep_description(results: dict[str, dict]) -> str:
    """How many seeds and epochs the sweep's figures rest on, e.g. "3 seeds, 10 epochs"."""
    found = tsweep_runs(results)
    seeds = sorted({k for by_seed in found.values() for k in by_seed})
    epochs = sorted({r.get("epochs") for by_seed in found.values() for r in by_seed.values()} - {None})
    shown = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    return shown + (f", {'/'.join(map(str, epochs))} epochs" if epochs else "")


def format_errors(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def plot_tsweep(sweep: dict[str, dict[float, int]], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for width, by_t in sweep.items():
        temps = sorted(by_t)
        ax.plot(temps, [by_t[t] for t in temps], marker="o", label=f"{width} units per layer")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 3, 4, 6, 8, 12, 20])
    ax.set_xticklabels(["1", "2", "3", "4", "6", "8", "12", "20"])
    ax.set_xlabel("distillation temperature T")
    ax.set_ylabel("test errors (of 10,000)")
    ax.set_title("MNIST: distilled students vs temperature")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    runs.save_figure(fig, path)


def curve_series(history: list[dict]) -> dict[str, list[tuple[int, list[float]]]]:
    """(epoch, values) points per logged quantity, one value per stacked member.

    Epochs without a quantity (test errors are logged every `eval_every`
    epochs, validation errors only with `val_size`) are left out of its series.
    """
    series: dict[str, list[tuple[int, list[float]]]] = {}
    for record in history:  # anything but numbers (a hand-edited or corrupt line) is passed over
        for key in ("loss", "val_errors", "test_errors", "test_ensemble_errors"):
            value = record.get(key)
            values = value if isinstance(value, list) else [value]
            if is_number(record.get("epoch")) and values and all(map(is_number, values)):
                series.setdefault(key, []).append((record["epoch"], values))
    return series


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


CURVE_STYLES = {"val_errors": ("-", "validation"), "test_errors": ("--", "test"),
                "test_ensemble_errors": (":", "test, ensemble")}


def plot_curves(series_by_run: dict[str, dict], path: Path) -> None:
    """Training loss and errors against epoch (each run's `curve_series`), one colour per run;
    stacked members as thin lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_errors = fig.subplots(1, 2)
    for i, (name, series) in enumerate(series_by_run.items()):
        colour = f"C{i % 10}"
        for key, points in series.items():
            axis, style, what = (ax_loss, "-", "loss") if key == "loss" else (ax_errors, *CURVE_STYLES[key])
            members = min(len(values) for _, values in points)
            for k in range(members):
                axis.plot([epoch for epoch, _ in points], [values[k] for _, values in points], style, color=colour,
                          linewidth=1.5 if members == 1 else 0.7, alpha=1.0 if members == 1 else 0.6,
                          label=f"{name} ({what})" if k == 0 else None)
    ax_loss.set_ylabel("training loss (as minimised)")
    ax_errors.set_ylabel("errors (of 10,000)")
    for ax in (ax_loss, ax_errors):
        ax.set_yscale("log", nonpositive="mask")  # both fall over orders of magnitude
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    runs.save_figure(fig, path)


def carried_section(label: str) -> str | None:
    """The section of the report a row belongs to, if it is one a report may carry over from an earlier build:
    the ensemble and specialist tables (they use no teacher, so a rebuild on new teachers leaves them as they were)."""
    if "(analogue of §5 on JFT)" in label:
        return "specialists " + label.split(" (analogue")[0]
    dataset, _, rest = label.partition(": ")
    if dataset in {name for _, name in registry.ENSEMBLE_DATASETS} and ("ensemble" in rest or "single" in rest):
        return "ensembles " + dataset
    return None


def carry_rows(rows: list[dict], earlier: Path) -> list[dict]:
    """rows, plus the earlier summary's rows of every ensemble or specialist section that rows lack, each marked
    `carried` and placed after the row that preceded it there. Paper rows are never carried: they follow the teacher."""
    try:
        old_rows = json.loads(earlier.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise runs.RunError(f"{earlier}: cannot read an earlier report's rows to carry ({e})") from None
    present = {carried_section(r["experiment"]) for r in rows}
    merged = list(rows)
    previous = None
    for old in old_rows:
        section = carried_section(old.get("experiment", ""))
        if section and section not in present:
            labels = [r["experiment"] for r in merged]
            at = labels.index(previous) + 1 if previous in labels else len(merged)
            merged.insert(at, {**old, "carried": True})
        previous = old.get("experiment")
    return merged


def build_report(runs_dir: Path, out_dir: Path, console: Console, released: str | None = None,
                 carry: Path | None = None) -> Path:
    """REPORT.md and summary.json from the runs under runs_dir; `released` (e.g. teachers/mnist-1200):
    the teacher row is read from the released teachers <released>-s1, -s2, ... instead of runs_dir; `carry`
    (an earlier summary.json): its ensemble and specialist sections that runs_dir has no runs for are kept, marked."""
    results = collect_results(runs_dir)
    if released:
        results = {k: v for k, v in results.items() if not seed_runs({k: v}, "teacher")}
        results.update(released_teacher_results(released))
    rows = paper_rows(results)
    for r in rows:
        r["public"] = PUBLIC.get(r["experiment"], "—")
    if carry:
        rows = carry_rows(rows, carry)
    sweep = tsweep_table(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    if sweep:
        plot_tsweep(sweep, out_dir / "tsweep.png")
    markdown = render_markdown(rows, sweep, runs_dir, released, tsweep_description(results))
    (out_dir / "REPORT.md").write_text(markdown)
    runs.write_json(out_dir / "summary.json", {"rows": rows, "tsweep": {w: {str(t): e for t, e in s.items()} for w, s in sweep.items()}})
    print_report(rows, sweep, console)
    return out_dir / "REPORT.md"


def released_teacher_results(prefix: str) -> dict[str, dict]:
    """The released teachers <prefix>-s1, -s2, ... as the report's teacher, teacher-s2, ... runs (checksums verified)."""
    import re

    found = {}
    base = Path(prefix)
    for folder in sorted(base.parent.glob(f"{base.name}-s*"), key=lambda p: p.name):
        seed = re.fullmatch(re.escape(base.name) + r"-s(\d+)", folder.name)
        if not seed or not teachers.is_released(folder):
            continue
        teachers.verify(folder)
        result = read_shown_result(folder)
        if result is not None:
            found["teacher" if seed.group(1) == "1" else f"teacher-s{seed.group(1)}"] = result
    if not found:
        raise runs.RunError(f"no released teachers {prefix}-s1, -s2, ...: kdcli teachers lists those there are")
    return found


def render_markdown(rows: list[dict], sweep: dict, runs_dir: Path, released: str | None = None,
                    sweep_basis: str = "") -> str:
    teacher_source = f" (the teacher row: the released teachers `{released}-s*`)" if released else ""
    lines = [
        "# kdcli vs Hinton, Vinyals & Dean (2015): MNIST",
        "",
        f"Built by `kdcli report` from the `result.json` files under `{relative_to_cwd(f'{runs_dir}/')}`{teacher_source}. "
        "Test errors out of",
        "10,000 (mean [min–max] over seeds); speech rows of the paper are the analogue kdcli mirrors on MNIST.",
        f"Best public reproduction: {PUBLIC_SOURCE}. Transfer set: what the student learned from; the paper's",
        "MNIST transfer set is unjittered (the student \"regularized solely by adding the additional task of matching",
        "the soft targets\"), the public reproductions' is jittered.",
        "",
        "| experiment | paper | best public | kdcli | seeds | transfer set | config | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " †" if r.get("carried") else ""
        lines.append(f"| {r['experiment']}{mark} | {r['paper']} | {r.get('public', '—')} | {r['kdcli']} | {r['seeds']} | "
                     f"{r.get('transfer') or '—'} | `{r['config']}` | `{r['command']}` |")
    if any(r.get("carried") for r in rows):
        lines += ["", "† Carried unchanged from an earlier build (its `summary.json`, `kdcli report --carry`): these rows use no "
                  "teacher and their", f"runs are not under `{relative_to_cwd(f'{runs_dir}/')}`; each row's command "
                  "rebuilds it."]
    if any("share of the ensemble's gain kept" in r["experiment"] for r in rows):
        lines += ["", registry.ENSEMBLE_ANALOGUE]
    if sweep:
        temps = sorted({t for by_t in sweep.values() for t in by_t})
        basis = f"test errors, mean over {sweep_basis}; " if sweep_basis else ""
        lines += ["", f"## Temperature sweep ({basis}paper: {TSWEEP_PAPER})", "",
                  "| units per layer | " + " | ".join(f"T={t:g}" for t in temps) + " |",
                  "|---|" + "---|" * len(temps)]
        for width, by_t in sweep.items():
            lines.append(f"| {width} | " + " | ".join(format_errors(by_t[t]) if t in by_t else "" for t in temps) + " |")
        lines += ["", "![test errors vs temperature](tsweep.png)"]
    # a run listed twice counts once; carried rows' runs are not part of this build
    total = sum({r["command"]: r["wall_seconds"] for r in rows if not r.get("carried")}.values())
    carried = " (rows marked † excluded)" if any(r.get("carried") for r in rows) else ""
    lines += ["", f"Wall time of the runs above (as recorded in each result.json){carried}: {total / 60:.1f} min.", ""]
    return "\n".join(lines)


def print_report(rows: list[dict], sweep: dict, console: Console) -> None:
    table = Table(title="kdcli vs the paper (test errors of 10,000)")
    for column in ("experiment", "paper", "kdcli", "seeds"):
        table.add_column(column, justify="left" if column == "experiment" else "right")
    for r in rows:
        table.add_row(r["experiment"], r["paper"], r["kdcli"], str(r["seeds"]))
    console.print(table)
    if sweep:
        temps = sorted({t for by_t in sweep.values() for t in by_t})
        st = Table(title=f"temperature sweep: {TSWEEP_PAPER}")
        st.add_column("units")
        for t in temps:
            st.add_column(f"T={t:g}", justify="right")
        for width, by_t in sweep.items():
            st.add_row(width, *[format_errors(by_t[t]) if t in by_t else "" for t in temps])
        console.print(st)
