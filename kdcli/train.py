"""The one training loop, and the run that every training command is built on.

    result = run_training(cfg, command="distill", hooks=Hooks(on_step=bar.advance))

`fit` is the only training loop in kdcli. What differs between commands
(labels or soft targets, cached or computed per batch, one model or a stack)
comes in through the `TransferSet` and the config, never as a branch here.
`fit` prints nothing and returns its history; callers own the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import runs, teachers
from .config import Config, member_temperatures
from .device import device_name, pick_device
from .errors import ConfigError, Diverged
from .data import Dataset, class_filter, every_shift, jitter_windows, load_dataset
from .evaluate import combine_logits, count_errors, predict, summarize
from .losses import distillation_loss, soft_targets
from .models import StackedMLP, arch_from_config, build_model, member_seeds, stack_models

log = logging.getLogger(__name__)


def dead_members(logits: torch.Tensor) -> list[int]:
    """Members whose outputs are identical for every example of a batch.

    logits: (members, batch, classes). A ReLU network gives one constant output
    only when a whole layer is zero for every input (a live network's outputs
    differ between distinct images), and no gradient then reaches the layers
    below it, so such a member never recovers: training on is wasted time.
    """
    if logits.shape[1] < 2:
        return []
    constant = (logits.amax(dim=1) == logits.amin(dim=1)).all(dim=-1)
    return constant.nonzero().flatten().tolist()


def died(members: list[int], stack_size: int) -> str:
    if stack_size == 1:
        return "the network died (it gives every image the same output)"
    return f"member {', '.join(map(str, members))} of the stack died (it gives every image the same output)"


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for a batch of row indices, via index_select: on CPU about twice as
    fast as advanced indexing, which was a quarter of a stacked 30-30 step."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *table.shape[1:])


@dataclass
class TransferSet:
    """What a student learns from: images, labels and (optionally) the teacher.

    soft_targets: cached teacher log-probabilities (1 or members, n, classes),
        for a transfer set that is not augmented: the teacher runs once.
    teacher: for an augmented transfer set, a function from a batch of
        flattened images (m, 784) to log-probabilities (1 or members, m, classes).
    shifted_targets: for a jittered transfer set with cache_teacher, the teacher's
        log-probabilities for every shift (1 or members, n, 2s+1, 2s+1, classes).
    """

    images: torch.Tensor  # (n, 28, 28)
    labels: torch.Tensor  # (n,)
    soft_targets: torch.Tensor | None = None
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None
    shifted_targets: torch.Tensor | None = None
    # Per-member sampling (specialists, kdcli/specialists.py): member_epoch(k, generator) is
    # member k's epoch as epoch_size indices into images. None: every member sees a
    # permutation of all images. labels may then be (members, n): one labelling per member.
    member_epoch: Callable[[int, torch.Generator], torch.Tensor] | None = None
    epoch_size: int = 0

    def epoch_length(self) -> int:
        return self.epoch_size if self.member_epoch is not None else len(self.images)

    def epoch_order(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(members, epoch_length) indices: each member's order for one epoch, drawn from its own generator."""
        if self.member_epoch is None:
            return torch.stack([torch.randperm(len(self.images), generator=g) for g in generators])
        return torch.stack([self.member_epoch(k, g) for k, g in enumerate(generators)])

    def labels_for(self, idx: torch.Tensor) -> torch.Tensor:
        """Hard labels for a batch idx (members, b): shared (n,) labels, or each member's own row of (members, n)."""
        if self.labels.dim() == 1:
            return self.labels[idx]
        return self.labels[torch.arange(idx.shape[0], device=idx.device)[:, None], idx]

    def targets_for(self, idx: torch.Tensor, x: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Soft targets for a batch: idx (members, b), x (members, b, 784) -> (members, b, classes);
        windows (2, members, b): each image's shift, as jitter_windows() drew it."""
        if self.shifted_targets is not None:
            table, (rows, columns) = self.shifted_targets, windows
            if table.shape[0] == 1:
                return table[0][idx, rows, columns]
            return table[torch.arange(idx.shape[0], device=idx.device)[:, None], idx, rows, columns]
        if self.soft_targets is not None:
            table = self.soft_targets
        elif self.teacher is not None:
            members, b = idx.shape
            table = self.teacher(x.reshape(members * b, -1))  # (1 or members, members * b, classes)
            table = table.reshape(table.shape[0], members, b, -1)
            return table[0] if table.shape[0] == 1 else table[torch.arange(members), torch.arange(members)]
        else:
            return None
        if table.shape[0] == 1:
            return gather_rows(table[0], idx)
        return gather_rows(table.flatten(0, 1), idx + table.shape[1] * torch.arange(idx.shape[0], device=idx.device)[:, None])


@dataclass
class Hooks:
    """Callbacks for the caller: progress, per-epoch records, resumable state."""

    on_start: Callable[[int, int, int], None] = lambda start_epoch, epochs, steps: None
    on_step: Callable[[], None] = lambda: None
    on_epoch: Callable[[dict], None] = lambda record: None
    save_state: Callable[[dict], None] | None = None
    # after run_training's own save_state has written resume.pt for this epoch (a Ray worker sends it on)
    on_saved: Callable[[int], None] = lambda epoch: None


def make_optimizer(model: StackedMLP, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    # fused kernels: one pass over all parameters per step instead of a loop of small ops
    fused = True if device.type in ("cpu", "cuda") else None
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=fused)
    optimizer_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup, cycle_momentum=False)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step // steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def lr_factor(cfg: Config, epoch: int) -> float:
    """Schedule step: the learning rate of 0-based `epoch` over cfg.lr (lr_step 1: exponential decay)."""
    return cfg.lr_decay ** (epoch // cfg.lr_step)


def momentum_at(cfg: Config, epoch: int) -> float:
    """SGD's momentum during 0-based `epoch`: a linear ramp from momentum_start to momentum over
    momentum_ramp epochs, then constant (the dropout papers' MNIST nets ramp it towards 0.99)."""
    if cfg.momentum_ramp == 0:
        return cfg.momentum
    progress = min(epoch / cfg.momentum_ramp, 1.0)
    return cfg.momentum_start + (cfg.momentum - cfg.momentum_start) * progress


def temperature_tensor(cfg: Config, device: torch.device) -> float | torch.Tensor:
    temps = member_temperatures(cfg)
    if len(set(temps)) == 1:
        return temps[0]
    return torch.tensor(temps, device=device).reshape(-1, 1, 1)  # (members, 1, 1)


def mixed_precision(cfg: Config, device: torch.device):
    """`precision: bf16`: the forward pass's matmuls run in bfloat16 (and, through autocast,
    their backward), the rest in fp32: master weights, optimiser state, loss, evaluation.
    On CPUs with AMX or AVX512-BF16, and on CUDA, bf16 matmuls are several times faster."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_precision(cfg: Config, device: torch.device) -> None:
    """Before anything is written: bf16 needs a device autocast supports, and is only fast with bf16 hardware."""
    if cfg.precision == "fp32":
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"'precision: {cfg.precision}' runs on CPU or CUDA, not on {device.type}; use fp32")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("this CPU has no bfloat16 instructions: precision bf16 will be slower than fp32")


def fit(
    model: StackedMLP,
    transfer: TransferSet,
    cfg: Config,
    evaluate: Callable[[StackedMLP], dict],
    hooks: Hooks | None = None,
    state: dict | None = None,
) -> list[dict]:
    """Train `model` on `transfer` for cfg.epochs; return one record per epoch.

    `state` (from hooks.save_state) resumes a run exactly where it stopped:
    on CPU the result is bit-identical to an uninterrupted run.
    """
    hooks = hooks or Hooks()
    device = transfer.images.device
    members, n, batch = model.members, transfer.epoch_length(), cfg.batch_size
    steps = math.ceil(n / batch)
    temperature = temperature_tensor(cfg, device)
    precision = mixed_precision(cfg, device)  # one context, entered every step
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, steps)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # kdcli draws nothing from these three; seeded and saved so extensions resume exactly
    np.random.seed(cfg.seed % 2**32)
    rngs = MemberStreams(member_seeds(cfg.seed, members), device)
    history: list[dict] = []
    best = EarlyStopping(model) if cfg.early_stopping else None
    start_epoch = 0
    if state is not None:
        start_epoch, history = restore_state(state, model, optimizer, scheduler, rngs, best)
        log.info("resuming after epoch %d of %d", start_epoch, cfg.epochs)

    hooks.on_start(start_epoch, cfg.epochs, steps)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if cfg.momentum_ramp:
            for group in optimizer.param_groups:
                group["momentum"] = momentum_at(cfg, epoch)
        order = transfer.epoch_order(rngs.order).to(device)  # (members, n)
        step_losses = torch.zeros(steps, device=device)
        started = time.perf_counter()
        for step in range(steps):
            idx = order[:, step * batch : (step + 1) * batch]  # (members, b)
            images = gather_rows(transfer.images, idx)  # (members, b, 28, 28)
            images, windows = jitter_windows(images, cfg.jitter, rngs.jitter)
            x = images.flatten(-2)
            with precision:
                logits = model(x, rngs.dropout)
            targets = transfer.targets_for(idx, x, windows)
            loss = distillation_loss(logits.float(), targets, transfer.labels_for(idx), temperature, cfg.alpha, cfg.match)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if cfg.max_norm:
                model.apply_max_norm(cfg.max_norm)
            step_losses[step] = loss.detach()  # no .item(): no device sync per step
            hooks.on_step()
        seconds = time.perf_counter() - started
        bad = (~torch.isfinite(step_losses)).nonzero()
        if len(bad):
            raise Diverged(epoch + 1, int(bad[0]) + 1)
        dead = dead_members(logits.detach())  # the epoch's last batch: one cheap check an epoch
        if dead:
            raise Diverged(epoch + 1, steps, died(dead, members))
        record = {
            "epoch": epoch + 1,
            "loss": step_losses.mean().item() / members,
            "lr": scheduler.get_last_lr()[0],
            **({"momentum": momentum_at(cfg, epoch)} if cfg.momentum_ramp else {}),
            "seconds": round(seconds, 3),
            "samples_per_s": round(members * n / seconds, 1),
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            record.update(evaluate(model))
            if best is not None:
                best.update(record["val_errors"], epoch + 1)
        history.append(record)
        hooks.on_epoch(record)
        if hooks.save_state is not None:
            hooks.save_state(capture_state(epoch + 1, history, model, optimizer, scheduler, rngs, best))
    if best is not None:
        best.restore()
        history[-1]["best_epoch"] = best.best_epoch
    return history


class EarlyStopping:
    """Keeps, per member, the weights of the epoch with the fewest validation errors."""

    def __init__(self, model: StackedMLP):
        self.model = model
        self.best_errors = torch.full((model.members,), math.inf)
        self.best_epoch = [0] * model.members
        self.weights = [p.detach().clone() for p in model.parameters()]

    def update(self, val_errors: list[int], epoch: int) -> None:
        improved = torch.tensor(val_errors, dtype=torch.float) < self.best_errors
        if not improved.any():
            return
        self.best_errors = torch.where(improved, torch.tensor(val_errors, dtype=torch.float), self.best_errors)
        for k in improved.nonzero().flatten().tolist():
            self.best_epoch[k] = epoch
        mask = improved.to(self.weights[0].device)
        with torch.no_grad():
            for saved, p in zip(self.weights, self.model.parameters()):
                saved[mask] = p[mask]

    def restore(self) -> None:
        with torch.no_grad():
            for saved, p in zip(self.weights, self.model.parameters()):
                p.copy_(saved)

    def state(self) -> dict:
        return {"best_errors": self.best_errors, "best_epoch": self.best_epoch, "weights": self.weights}

    def load(self, state: dict) -> None:
        self.best_errors, self.best_epoch = state["best_errors"], list(state["best_epoch"])
        self.weights = [w.to(p.device) for w, p in zip(state["weights"], self.model.parameters())]


class MemberStreams:
    """Each member's own random streams: data order, jitter shifts and dropout masks,
    seeded from the member's seed. So member k of a stack draws exactly what a single
    run seeded like member k draws, and a stack trains its members as separate runs."""

    NAMES = ("order", "jitter", "dropout")  # resume.pt holds each as <name>_rngs, a state per member

    def __init__(self, seeds: list[int], device: torch.device):
        self.device = device
        self.order = [torch.Generator().manual_seed(s + 7919) for s in seeds]
        self.jitter = [torch.Generator().manual_seed(s + 104729) for s in seeds]
        self.dropout = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def state(self) -> dict:
        return {f"{name}_rngs": [g.get_state() for g in getattr(self, name)] for name in self.NAMES}

    def load(self, state: dict) -> None:
        saved = len(state["order_rngs"])
        if saved != len(self.order):
            raise ValueError(f"{saved} members saved, {len(self.order)} in this run")
        if "dropout_rngs" not in state:
            state = self._from_shared_streams(state)
        for name in self.NAMES:
            for g, s in zip(getattr(self, name), state[f"{name}_rngs"]):
                g.set_state(s)

    def _from_shared_streams(self, state: dict) -> dict:
        """A resume.pt from kdcli before per-member streams: one jitter stream and the global
        RNG's dropout masks. For a single run on CPU those are member 0's streams, so it
        resumes exactly; a stack's members shared them, which no per-member state repeats."""
        if len(self.order) > 1 or self.device.type != "cpu":
            raise ValueError("saved by an earlier kdcli whose stacked members shared one jitter and dropout stream")
        return {**state, "jitter_rngs": [state["jitter_rng"]], "dropout_rngs": [state["torch_rng"]]}


def capture_state(epoch, history, model, optimizer, scheduler, rngs: MemberStreams, best) -> dict:
    return {
        "epoch": epoch,
        "history": history,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **rngs.state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),  # (version, tuple of 625 ints, gauss): plain values
        "numpy_rng": _numpy_rng_state(),
        "early_stopping": best.state() if best is not None else None,
    }


def _numpy_rng_state() -> tuple:
    """np.random's global state as plain values (weights_only loads no ndarrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, keys.tolist(), int(pos), int(has_gauss), float(cached)


def restore_state(state, model, optimizer, scheduler, rngs: MemberStreams, best) -> tuple[int, list]:
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs.load(state)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if isinstance(state.get("python_rng"), tuple):
            random.setstate(state["python_rng"])
        if state.get("numpy_rng") is not None:
            name, keys, pos, has_gauss, cached = state["numpy_rng"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if best is not None and state["early_stopping"] is not None:
            best.load(state["early_stopping"])
        return int(state["epoch"]), list(state["history"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise runs.RunError(f"{runs.RESUME}: the saved training state does not fit this run "
                            f"({runs.first_line(err)}); start over with --force") from None


# --- teachers ---------------------------------------------------------------

def load_teacher(spec: str | Path, device: torch.device) -> tuple[StackedMLP, dict]:
    """A frozen teacher in eval mode: one run (a single model or an ensemble run),
    or several runs separated by commas, stacked into one ensemble."""
    loaded = [teachers.load_any(path) for path in teachers.specs(str(spec))]
    if not loaded:
        raise runs.RunError("no teacher given")
    datasets = {payload.get("config", {}).get("dataset", "mnist") for _, payload in loaded}
    if len(datasets) > 1:
        raise runs.RunError(f"teacher runs {spec} were trained on different datasets: {', '.join(sorted(datasets))}")
    try:
        teacher = stack_models([model for model, _ in loaded]) if len(loaded) > 1 else loaded[0][0]
    except ValueError as err:
        raise runs.RunError(f"teacher {spec}: {err}") from None
    if teacher.arch["n_classes"] != 10 or teacher.arch["n_inputs"] != 28 * 28:
        raise runs.RunError(f"{spec}: teacher has {teacher.arch['n_inputs']} inputs and "
                            f"{teacher.arch['n_classes']} outputs; kdcli students need 784 and 10")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, loaded[0][1]


def teacher_targets(teacher: StackedMLP, flat_images: torch.Tensor, temperatures: list[float], combine: str) -> torch.Tensor:
    """Soft targets (1 or members, n, classes) as log-probabilities, one per distinct temperature."""
    with torch.no_grad():
        logits = predict(teacher, flat_images)  # (teachers, n, classes)
        if len(set(temperatures)) == 1:
            return soft_targets(logits, temperatures[0], combine).unsqueeze(0)
        return torch.stack([soft_targets(logits, t, combine) for t in temperatures])


def build_transfer_set(cfg: Config, data: Dataset, device: torch.device) -> TransferSet:
    keep = class_filter(data.train_y, cfg.omit_digits, cfg.keep_digits)
    if len(keep) == 0:
        raise runs.RunError("the transfer set is empty after removing the omitted digits")
    images, labels = data.train_x[keep], data.train_y[keep]
    transfer = TransferSet(images, labels)
    if not cfg.teacher:
        return transfer
    teacher, payload = load_teacher(cfg.teacher, device)
    teacher_dataset = payload.get("config", {}).get("dataset", cfg.dataset)
    if teacher_dataset != cfg.dataset:
        raise runs.RunError(f"teacher {cfg.teacher} was trained on {teacher_dataset}, this run uses {cfg.dataset}")
    temps = member_temperatures(cfg)
    if cfg.jitter == 0:
        # The paper's transfer set is unaugmented: the teacher runs once, and
        # distillation then costs what training the student alone costs.
        transfer.soft_targets = teacher_targets(teacher, images.flatten(-2), temps, cfg.combine)
    elif cfg.cache_teacher:
        transfer.shifted_targets = targets_for_every_shift(teacher, images, cfg.jitter, temps, cfg.combine)
    else:
        transfer.teacher = lambda x: teacher_targets(teacher, x, temps, cfg.combine)
    return transfer


CACHE_LIMIT_BYTES = 8 * 2**30


def targets_for_every_shift(teacher: StackedMLP, images: torch.Tensor, max_shift: int,
                            temperatures: list[float], combine: str) -> torch.Tensor:
    """teacher_targets() for each of jitter's (2s+1)^2 shifts of every image:
    (1 or len(temperatures), n, 2s+1, 2s+1, classes). Scoring them once costs
    (2s+1)^2 epochs of teacher forward passes; scoring every batch costs one an epoch."""
    side = 2 * max_shift + 1
    shifts = every_shift(images, max_shift)
    row, column, shifted = next(shifts)
    first = teacher_targets(teacher, shifted.flatten(-2), temperatures, combine)  # (tables, n, classes)
    size = first.numel() * first.element_size() * side * side
    if size > CACHE_LIMIT_BYTES:
        raise runs.RunError(f"cache_teacher would hold {size / 2**30:.1f} GiB of teacher outputs "
                            f"(limit {CACHE_LIMIT_BYTES / 2**30:.0f} GiB): set cache_teacher: false")
    table = first.new_empty(first.shape[0], first.shape[1], side, side, first.shape[2])
    table[:, :, row, column] = first
    for row, column, shifted in shifts:
        table[:, :, row, column] = teacher_targets(teacher, shifted.flatten(-2), temperatures, combine)
    return table


# --- a whole run ------------------------------------------------------------

@dataclass
class Recipe:
    """What a run trains and how its result is read, built once the data is
    loaded and before anything in the run directory changes. `standard_recipe`
    serves every command but train-specialists, which brings its own
    (kdcli/specialists.py): same loop, same run directory, other model and batches."""

    model: StackedMLP
    transfer: TransferSet
    evaluate: Callable[[StackedMLP], dict]  # per-epoch metrics (val_errors drives early stopping)
    result: Callable[[StackedMLP, list[dict]], dict]  # result.json's command-specific part
    checkpoint_extra: dict = field(default_factory=dict)  # saved in model.pt beside the weights


def standard_recipe(cfg: Config, data: Dataset, device: torch.device, command: str) -> Recipe:
    transfer = build_transfer_set(cfg, data, device)
    model = build_model(arch_from_config(cfg), seeds=member_seeds(cfg.seed, cfg.members))
    if cfg.init_from:
        start_from(model, cfg.init_from)
    model.to(device)
    return Recipe(model, transfer, make_evaluator(data, ensemble=cfg.members > 1),
                  lambda trained, history: final_result(cfg, trained, data, history, command))


def start_from(model: StackedMLP, spec: str) -> None:
    """Copy a finished run's weights into `model` (a warm start, e.g. the specialists' control: the generalist
    trained further); its layers must match, and a single model fills every member of a stack."""
    source, _ = teachers.load_any(spec, what="init_from")
    layers = lambda arch: {k: v for k, v in arch.items() if k not in ("members", "dropout_input", "dropout_hidden")}  # noqa: E731
    mine, theirs = layers(model.arch), layers(source.arch)
    if mine != theirs:
        differ = next(k for k in mine if mine[k] != theirs.get(k))
        raise runs.RunError(f"init_from {spec}: its {differ} is {theirs.get(differ)}, this run's {mine[differ]}")
    if source.members not in (1, model.members):
        raise runs.RunError(f"init_from {spec}: a stack of {source.members} cannot start {model.members} members")
    with torch.no_grad():
        for mine_p, theirs_p in zip(model.parameters(), source.parameters()):
            mine_p.copy_(theirs_p.expand_as(mine_p))


def make_evaluator(data: Dataset, ensemble: bool) -> Callable[[StackedMLP], dict]:
    def evaluate(model: StackedMLP) -> dict:
        out = {}
        for split, images, labels in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
            if len(images) == 0:
                continue
            logits = predict(model, images)
            out[f"{split}_errors"] = count_errors(logits, labels).tolist()
            if ensemble:
                out[f"{split}_ensemble_errors"] = int(count_errors(combine_logits(logits), labels))
        return out

    return evaluate


def final_result(cfg: Config, model: StackedMLP, data: Dataset, history: list[dict], command: str) -> dict:
    """result.json's figures: test errors per member, of the model or the ensemble, and validation errors.
    A blind run (test_eval: false) gets the validation part alone; its test errors, once a decision is
    recorded, come from an explicit `kdcli eval`."""
    temps = member_temperatures(cfg)
    members = [{"member": k, "seed": seed, "temperature": temps[k] if cfg.teacher else None}
               for k, seed in enumerate(member_seeds(cfg.seed, model.members))]
    result = {"command": command, "name": cfg.name, "dataset": cfg.dataset, "members": members}
    if cfg.test_eval:
        result.update(scored_on_test(model, data, members, command))
    else:
        result["test_eval"] = False
    if len(data.val_x):
        val_logits = predict(model, data.val_x)
        result["val_errors"] = count_errors(val_logits, data.val_y).tolist()
        if model.members > 1:
            result["val_ensemble_errors"] = int(count_errors(combine_logits(val_logits), data.val_y))
    return result


def scored_on_test(model: StackedMLP, data: Dataset, members: list[dict], command: str) -> dict:
    """Test errors of each member (added to `members`), of the model or ensemble, and of both ensemble rules."""
    logits = predict(model, data.test_x)  # (members, n, classes)
    for k, member in enumerate(members):
        summary = summarize(combine_logits(logits[k : k + 1]), data.test_y)
        member.update({"test_errors": summary["n_errors"], "test_nll": summary["nll"],
                       "per_class_errors": summary["per_class_errors"]})
    figures = {}
    if model.members == 1 or command == "train-ensemble":
        figures["test"] = summarize(combine_logits(logits, "mean_probs"), data.test_y)
    if model.members > 1:
        figures["ensemble"] = {rule: {k: v for k, v in summarize(combine_logits(logits, rule), data.test_y).items()
                                      if k in ("n_errors", "accuracy", "nll")}
                               for rule in ("mean_probs", "mean_logits")}
    return figures


# settings a resumed run may change: they move the run, not its result
RESUME_MAY_CHANGE = ("name", "out", "device", "data_dir", "expect_max_errors")


def read_resume_state(cfg: Config, run_dir: Path | None = None) -> dict:
    """The training state in <run_dir>/resume.pt (default cfg.run_dir), checked against this run's config."""
    path = runs.checkpoint_path(run_dir or cfg.run_dir, runs.RESUME)
    payload = runs.read_checkpoint(path)
    state = payload.get("train_state")
    if not isinstance(state, dict) or "epoch" not in state:
        raise runs.RunError(f"{path}: holds no training state")
    saved, now = payload.get("config") or {}, cfg.to_dict()
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise runs.RunError(f"{path} was saved with {k} = {saved[k]!r}, this run has {now[k]!r}: resume with "
                            "the interrupted run's settings, or start over with --force")
    return state


def clear_run_dir(run_dir: Path) -> None:
    """A fresh start (--force) drops an earlier attempt's training state. An earlier
    finished model.pt and result.json stay until this run's pair replaces them,
    so a run that fails or is interrupted never costs the finished result."""
    (run_dir / runs.RESUME).unlink(missing_ok=True)


def run_training(cfg: Config, command: str, hooks: Hooks | None = None, resume: bool = False,
                 command_line: str | None = None,
                 recipe: Callable[[Config, Dataset, torch.device, str], Recipe] | None = None,
                 run_dir: Path | None = None) -> dict:
    """Load data, build the transfer set, train, evaluate and write the run directory.

    Nothing in the run directory changes until the config, data and teacher
    have been checked. resume.pt is rewritten after every epoch; model.pt and
    result.json appear together at the end. `recipe` builds what is trained
    (default: `standard_recipe`; train-specialists passes its own). `run_dir`
    (default cfg.run_dir) is where the files go: a Ray worker without the
    driver's filesystem trains into a folder of its own (kdcli/cluster.py).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
    command_line = command_line or shlex.join(["kdcli", *sys.argv[1:]])
    state = read_resume_state(cfg, run_dir) if resume else None
    if state is not None:  # wall time counts the epochs before the resume too
        started -= sum(r.get("seconds", 0) for r in state["history"])
    device = pick_device(cfg.device)
    check_precision(cfg, device)
    log.info("device %s, run directory %s", device, run_dir)
    data = load_dataset(cfg, device)
    plan = (recipe or standard_recipe)(cfg, data, device, command)
    model, transfer = plan.model, plan.transfer
    log.info("transfer set of %d images; %d validation, %d test", len(transfer.images), len(data.val_x), len(data.test_x))
    hooks = hooks or Hooks()
    with runs.recording_status(run_dir, command, command_line, (state or {}).get("epoch", 0)) as progress:
        if state is None:
            clear_run_dir(run_dir)
        runs.rewrite_metrics(run_dir, (state or {}).get("history", []))
        runs.write_config(cfg, run_dir)
        if hooks.save_state is None:
            def save_state(s: dict) -> None:
                runs.save_checkpoint(run_dir / runs.RESUME, model, cfg.to_dict(), {"train_state": s})
                progress["saved_epoch"] = s["epoch"]
                log.debug("saved %s after epoch %d", run_dir / runs.RESUME, s["epoch"])
                hooks.on_saved(s["epoch"])

            hooks.save_state = save_state
        user_on_epoch = hooks.on_epoch

        def on_epoch(record: dict) -> None:
            runs.append_metrics(run_dir, record)
            user_on_epoch(record)

        hooks.on_epoch = on_epoch
        history = fit(model, transfer, cfg, plan.evaluate, hooks, state)
        result = finish_run(cfg, command, command_line, plan, history, device, started, run_dir)
    return result


def finish_run(cfg: Config, command: str, command_line: str, plan: Recipe, history: list[dict],
               device: torch.device, started: float, run_dir: Path) -> dict:
    model, transfer = plan.model, plan.transfer
    train_seconds = sum(r["seconds"] for r in history)
    result = plan.result(model, history)
    result.update({
        "n_transfer": len(transfer.images),
        "epochs": cfg.epochs,
        "best_epoch": history[-1].get("best_epoch"),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "samples_per_s": round(model.members * transfer.epoch_length() * len(history) / max(train_seconds, 1e-9), 1),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "torch_version": torch.__version__,
        "command_line": command_line,
        "config": cfg.to_dict(),
    })
    # both written before either is renamed in: a full disk leaves the old pair
    runs.atomic_write_all([(run_dir / runs.CHECKPOINT, runs.checkpoint_writer(model, cfg.to_dict(), plan.checkpoint_extra)),
                           (run_dir / runs.RESULT, runs.json_writer(result))])
    (run_dir / runs.RESUME).unlink(missing_ok=True)
    return result
