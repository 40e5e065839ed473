"""Tables for people: rich in the terminal, markdown and JSON in results/.

    print_result(result, console)     # after a training command
    evaluate_checkpoint("runs/teacher")  # what `kdcli eval` computes
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import runs
from .config import make_config
from .data import load_dataset
from .evaluate import combine_logits, predict, summarize


def evaluate_checkpoint(run: str | Path, data_dir: str | None = None, device: str | None = None,
                        combine: str = "mean_probs", bias_shifts: dict[int, float] | None = None) -> dict:
    """Rebuild a model from its checkpoint alone and count its test errors."""
    from .evaluate import shift_biases
    from .train import pick_device

    model, payload = runs.load_model(run)
    saved = dict(payload.get("config") or {})
    cfg = make_config({
        "dataset": saved.get("dataset", "mnist"),
        "data_dir": data_dir if data_dir is not None else saved.get("data_dir"),
        "test_limit": saved.get("test_limit"),
        "device": device or "auto",
    }, source=f"{run}")
    torch_device = pick_device(cfg.device)
    data = load_dataset(cfg, torch_device)
    model.to(torch_device)
    member_logits = predict(model, data.test_x)
    log_probs = combine_logits(member_logits, combine)
    if bias_shifts:
        log_probs = shift_biases(log_probs, bias_shifts)
    result = {"run": str(run), "dataset": cfg.dataset, "members": model.members, "combine": combine,
              "bias_shifts": {str(k): v for k, v in (bias_shifts or {}).items()},
              "test": summarize(log_probs, data.test_y)}
    if model.members > 1:
        result["member_test_errors"] = [int(summarize(combine_logits(member_logits[k:k + 1]), data.test_y)["n_errors"])
                                        for k in range(model.members)]
    return result


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
