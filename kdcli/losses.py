"""Temperature softmax and the distillation objective of Hinton, Vinyals & Dean (2015).

    log_q = soft_targets(teacher_logits, T)              # (members, n, classes)
    loss = distillation_loss(student_logits, log_q, labels, T, alpha)

All functions take logits whose last two dimensions are (batch, classes) and
any leading "members" dimensions (stacked models); the loss is the sum over
members of each member's batch-mean loss, so stacked members train exactly
as they would alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log_softmax_t(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log softmax(z / T): T > 1 softens the distribution (paper eq. 1)."""
    return F.log_softmax(logits / temperature, dim=-1)


def soft_targets(teacher_logits: torch.Tensor, temperature: float | torch.Tensor, combine: str = "mean_probs") -> torch.Tensor:
    """Log-probabilities of the teacher's soft targets at temperature T.

    teacher_logits: (teachers, batch, classes), one slice per ensemble member
    (a single teacher is a stack of one). An ensemble's targets combine the
    members' softened distributions:
      mean_probs   arithmetic mean of softmax(z_m / T)
      mean_logits  geometric mean, renormalised = softmax(mean_m(z_m) / T)
    """
    if combine == "mean_logits":
        return log_softmax_t(teacher_logits.mean(dim=0), temperature)
    if combine == "mean_probs":
        log_p = log_softmax_t(teacher_logits, temperature)
        return torch.logsumexp(log_p, dim=0) - math.log(teacher_logits.shape[0])
    raise ValueError(f"unknown combination rule {combine!r}")


def _broadcastable(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """T as a tensor that multiplies `like` (members, …): one temperature per member becomes (members, 1, …)."""
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))) if t.dim() else t


def _per_member_mean(per_example: torch.Tensor) -> torch.Tensor:
    """(…, batch) -> scalar: mean over the batch, summed over members."""
    return per_example.mean(dim=-1).sum()


def soft_loss(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """T^2 * KL(q || softmax(z_s / T)), averaged over the batch, not the classes.

    Why T^2: the gradient of the KL term w.r.t. the student logits is
    (p_s - q) / T, and at high T, p - 1/N ~ z / (N T), so soft-target gradients
    shrink as 1/T^2. Multiplying by T^2 keeps the soft term's contribution
    roughly unchanged when T changes (paper §2), so alpha means the same at
    every temperature.
    """
    log_p_student = log_softmax_t(student_logits, temperature)
    # kl_div with log_target computes q * (log q - log p) stably, also where q = 0
    kl = F.kl_div(log_p_student, target_log_probs.expand_as(log_p_student), reduction="none", log_target=True).sum(-1)
    return _per_member_mean(kl * _broadcastable(temperature, kl) ** 2)


def logit_loss(student_logits: torch.Tensor, target_log_probs: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Squared difference of zero-meaned logits, sum_c (z_c - v_c)^2 / (2 N), averaged over the batch.

    The paper's §2.1 "matching logits" (Caruana et al.'s compression), the high-temperature limit of
    distillation: as T -> infinity the gradient of T^2 * KL w.r.t. z_c tends to (z_c - v_c) / N,
    which is this loss's gradient, so alpha and the learning rate mean the same for both.
    The teacher's logits v come back from its soft targets: T * log q is v up to a constant per
    example (exactly for one teacher; for an ensemble, the logits of its combined distribution).
    """
    v = _broadcastable(temperature, student_logits) * target_log_probs
    diff = (student_logits - student_logits.mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))
    return _per_member_mean(diff.pow(2).sum(-1) / (2 * student_logits.shape[-1]))


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the true labels at T = 1, averaged over the batch.
    labels: (batch,) shared by all members, or (members, batch)."""
    labels = labels.expand(student_logits.shape[:-1])
    ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1), reduction="none")
    return _per_member_mean(ce.reshape(labels.shape))


def distillation_loss(
    student_logits: torch.Tensor,
    target_log_probs: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float | torch.Tensor,
    alpha: float,
    match: str = "soft_targets",
) -> torch.Tensor:
    """L = alpha * T^2 * KL(q || p_s^T) + (1 - alpha) * CE(z_s, y).

    alpha = 1 uses soft targets only, so the transfer set may be unlabelled;
    alpha = 0 (or no teacher) is plain training on the hard labels.
    match = "logits" swaps the soft term for `logit_loss`, its T -> infinity limit.
    """
    loss = torch.zeros((), device=student_logits.device)
    if alpha > 0 and target_log_probs is not None:
        term = logit_loss if match == "logits" else soft_loss
        loss = loss + alpha * term(student_logits, target_log_probs, temperature)
    if alpha < 1 or target_log_probs is None:
        weight = 1.0 if target_log_probs is None else 1.0 - alpha
        loss = loss + weight * hard_loss(student_logits, labels)
    return loss
