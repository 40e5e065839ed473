"""Errors the way the paper counts them: test errors out of 10,000.

    logits = predict(model, data.test_x)          # (members, n, 10)
    summary = summarize(combine_logits(logits), data.test_y)
    fidelity = agreement(student_log_probs, teacher_log_probs)  # how closely a student copies its teacher
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import soft_targets
from .models import StackedMLP


@torch.no_grad()
def predict(model: StackedMLP, images: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Logits of every member, in eval mode: (members, n, classes)."""
    was_training = model.training
    model.eval()
    flat = images.reshape(len(images), -1)
    out = torch.cat([model(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)], dim=1)
    model.train(was_training)
    return out


def combine_logits(member_logits: torch.Tensor, rule: str = "mean_probs") -> torch.Tensor:
    """One (n, classes) log-probability matrix for a stack of members.
    A single model's log-softmax; an ensemble's combined distribution."""
    return soft_targets(member_logits, 1.0, rule)


def count_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Errors per member: logits (..., n, classes) -> (...)."""
    return (logits.argmax(-1) != labels).sum(-1)


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return F.nll_loss(log_probs, labels).item()


def summarize(log_probs: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> dict:
    """Errors, accuracy, per-class errors and the confusion matrix (rows = true class)."""
    predicted = log_probs.argmax(-1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long, device=labels.device)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    wrong = predicted != labels
    n = len(labels)
    n_errors = int(wrong.sum())
    return {
        "n_errors": n_errors,
        "n_examples": n,
        "errors_per_10k": round(n_errors * 10000 / n, 1) if n else math.nan,
        "accuracy": round(1 - n_errors / n, 6) if n else math.nan,
        "per_class_errors": torch.bincount(labels[wrong], minlength=n_classes).tolist(),
        "per_class_count": torch.bincount(labels, minlength=n_classes).tolist(),
        "confusion": confusion.tolist(),
        "nll": round(nll(log_probs, labels), 6) if n else math.nan,
    }


def shift_biases(log_probs_or_logits: torch.Tensor, shifts: dict[int, float]) -> torch.Tensor:
    """Add a constant to chosen classes' logits (the paper's bias correction)."""
    shifted = log_probs_or_logits.clone()
    for cls, delta in shifts.items():
        shifted[..., cls] += delta
    return shifted


def agreement(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> dict:
    """How closely one model copies another on the same images: top-1 agreement
    and KL(reference || model) at T = 1, the distillation "fidelity" measures."""
    disagree = int((log_probs.argmax(-1) != reference_log_probs.argmax(-1)).sum())
    n = len(log_probs)
    kl = F.kl_div(log_probs, reference_log_probs, reduction="batchmean", log_target=True).item() if n else math.nan
    return {"n_examples": n, "n_disagree": disagree, "agreement": round(1 - disagree / n, 6) if n else math.nan,
            "kl_from_reference": round(kl, 6)}


def softness(logits: torch.Tensor, temperature: float) -> dict:
    """How soft a model's outputs are at temperature T, over images (n, classes) of logits: the mean
    entropy (nats; uniform over 10 classes is 2.303), the mean top probability, and the mean
    probability left for the nine other classes, which is what soft targets carry beyond the label."""
    log_p = (logits / temperature).log_softmax(-1)
    p = log_p.exp()
    top = p.max(-1).values
    return {"temperature": temperature, "entropy_nats": round(float(-(p * log_p).sum(-1).mean()), 6),
            "top_probability": round(float(top.mean()), 6), "other_mass": round(float((1 - top).mean()), 6)}
