"""Throughput of the one training loop on this machine (`kdcli bench`, `make bench`).

Times `fit` itself (evaluation excluded) on real MNIST for the paper's
configurations, and prints achieved GFLOP/s beside the machine's fp32 matmul
rate, the ceiling for these matmul-bound MLPs. Run it on an idle machine.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table

from .config import make_config
from .data import load_dataset
from .models import arch_from_config, build_model, member_seeds
from .device import pick_device
from .train import TransferSet, check_precision, fit, teacher_targets

TEACHER = dict(hidden=[1200, 1200], dropout_input=0.2, dropout_hidden=0.5, max_norm=3.5, jitter=2,
               optimizer="sgd", lr=0.1)
STUDENT = dict(hidden=[800, 800], optimizer="sgd", lr=0.05)


def matmul_gflops(device: torch.device, n: int = 2048, seconds: float = 2.0, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e9


def flops_per_sample(hidden: list[int]) -> int:
    """Forward + backward of an MLP: about 6 flops per weight per sample."""
    sizes = [784, *hidden, 10]
    return 6 * sum(a * b for a, b in zip(sizes, sizes[1:]))


def time_fit(values: dict, data, device, n_samples: int, soft: bool = False) -> float:
    """Seconds per epoch of `fit` on the first n_samples training images."""
    cfg = make_config({**values, "epochs": 1, "device": str(device)})
    model = build_model(arch_from_config(cfg), member_seeds(cfg.seed, cfg.members)).to(device)
    transfer = TransferSet(data.train_x[:n_samples], data.train_y[:n_samples])
    if soft:  # cached soft targets at T = 20 from an (untrained) teacher: the cost is the same
        teacher = build_model(arch_from_config(make_config(TEACHER))).to(device)
        transfer.soft_targets = teacher_targets(teacher, transfer.images.flatten(-2), [20.0], "mean_probs")
    history = fit(model, transfer, cfg, evaluate=lambda m: {})
    return history[0]["seconds"]


def samples_per_s(values: dict, data, device, seconds: float, soft: bool = False) -> float:
    members = values.get("members", 1)
    warm = time_fit(values, data, device, 2000, soft)  # warm-up, and a first rate estimate
    n = int(min(len(data.train_x), max(2000, 2000 / warm * seconds)))
    return members * n / time_fit(values, data, device, n, soft)


def run_bench(data_dir: str | None, seconds: float, ensemble: bool, console: Console,
              precision: str | None = None) -> dict:
    device = pick_device("auto")
    precision_cfg = make_config({} if precision is None else {"precision": precision})  # validated; default fp32
    check_precision(precision_cfg, device)
    precision = precision_cfg.precision
    data = load_dataset(make_config({"data_dir": data_dir}), device)
    peak = matmul_gflops(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    console.print(f"device {device}, {torch.get_num_threads()} threads, precision {precision}; "
                  f"{precision} matmul 2048x2048: [bold]{peak:.0f} GFLOP/s[/]")
    rows = [
        ("teacher 1200-1200, batch 100 (dropout, max-norm, jitter)", {**TEACHER, "batch_size": 100}, False),
        ("teacher 1200-1200, batch 256", {**TEACHER, "batch_size": 256}, False),
        ("student 800-800, batch 128, hard labels", {**STUDENT, "batch_size": 128}, False),
        ("distill 800-800, batch 128, cached soft targets T=20", {**STUDENT, "batch_size": 128, "alpha": 1.0}, True),
    ]
    table = Table(title="training throughput (one process, evaluation excluded)")
    for column in ("configuration", "samples/s", "GFLOP/s", "% of matmul"):
        table.add_column(column, justify="right" if column != "configuration" else "left")
    results = {"matmul_gflops": peak, "precision": precision}
    for label, values, soft in rows:
        rate = samples_per_s({**values, "precision": precision}, data, device, seconds, soft)
        gflops = rate * flops_per_sample(values["hidden"]) / 1e9
        results[label] = rate
        table.add_row(label, f"{rate:,.0f}", f"{gflops:.1f}", f"{gflops / peak:.0%}")
    console.print(table)
    student, distill = results[rows[2][0]], results[rows[3][0]]
    console.print(f"distillation with cached soft targets runs at {distill / student:.0%} of plain student training")
    if ensemble:
        results["ensemble"] = bench_ensemble(data, device, console, precision)
    return results


def bench_ensemble(data, device, console: Console, precision: str = "fp32", members: int = 10,
                   n_samples: int = 6000) -> dict:
    """K members trained together (stacked) against K single runs one after another."""
    table = Table(title=f"K = {members} members, {n_samples} images, 1 epoch: together vs one after another")
    for column in ("net", "together (s)", "sequential (s)", "together / sequential"):
        table.add_column(column, justify="right")
    out = {}
    for hidden in ([800, 800], [30, 30]):
        values = {**STUDENT, "hidden": hidden, "batch_size": 128, "precision": precision}
        time_fit({**values, "members": members}, data, device, 1000)  # warm-up
        together = time_fit({**values, "members": members}, data, device, n_samples)
        sequential = sum(time_fit({**values, "seed": seed}, data, device, n_samples)
                         for seed in member_seeds(1, members))
        name = "-".join(map(str, hidden))
        out[name] = {"together_s": together, "sequential_s": sequential}
        table.add_row(name, f"{together:.2f}", f"{sequential:.2f}", f"{together / sequential:.2f}x")
    console.print(table)
    return out
