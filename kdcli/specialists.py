"""Specialists (Hinton, Vinyals & Dean 2015, §5): a generalist, plus specialists
on the classes it confuses, trained together and combined by the paper's KL rule.

    kdcli train-teacher -c experiments/generalist-fashion.yaml        # the generalist
    kdcli train-specialists -c experiments/specialists-fashion.yaml    # clusters, specialists, combination
    kdcli eval runs/specialists-fashion                                # generalist alone vs combined

    cfg = resolve_clusters(cfg)                       # k-means on the generalist's validation covariance
    result = run_specialists(cfg)                     # K specialists, one stack, trained by train.fit
    log_q = combine(log_p_generalist, log_p_specialists, membership(clusters), active, steps=100)

1. Clusters. The generalist's class probabilities on the validation split
   give a 10 x 10 covariance matrix; classes that are predicted together (that
   the generalist confuses) have similar columns, and k-means on the columns,
   scaled to correlations (see `cluster_classes` for why), groups them. With
   cluster_overlap = r a class also joins every other cluster whose classes it
   correlates with at least r on average, so some classes are covered by
   several specialists (the paper's Table 4). Clusters may be given by hand
   instead (`clusters:`).
2. Specialists. Specialist m answers with its cluster's classes plus one
   "dustbin" class for every other class. The K specialists are one
   StackedMLP (members = K) with n_classes = (largest cluster) + 1: the dustbin
   is the last output, and a smaller cluster's outputs between its classes and
   its dustbin are padding, with zero weights and a bias of PAD_LOGIT = -1e4.
   Their probability is then exactly 0 in float32, so their gradient is exactly
   0 and they stay padding; they are never a target, and inference reads only
   the real outputs. Each specialist starts from the generalist: hidden layers
   copied, its classes' output rows copied, and a dustbin row fitted (least
   squares, on training images) to the log-sum-exp of the other classes'
   logits, so it starts as the generalist collapsed onto its cluster. Each
   epoch each member draws as many images as the training set holds, half from
   its cluster and half from the rest (TransferSet.member_epoch), so `fit`, the
   one loop, trains all of them in one batched pass. That sampling changes the
   prior odds of dustbin to cluster by the oversampling ratio (π_m / (1 - π_m),
   π_m the cluster's share of the training set): the dustbin bias starts
   lowered by its log, log((1 - π_m) / π_m), and that correction is added back
   to the dustbin logit after training, which restores the natural prior.
3. Combination (§5.2). For each image the specialists whose cluster meets the
   generalist's top_k classes are active, and q = softmax(z) minimises
       KL(p_g ‖ q) + Σ_active KL(p_m ‖ collapse_m(q)),
   collapse_m(q) being q's probabilities of m's classes plus their remainder in
   the dustbin: combine_steps steps of gradient descent on z from z = log p_g.

Nothing is chosen on the test set: clusters come from the validation split,
top_k (1, the paper's) and combine_steps are fixed in the experiment file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from . import runs, teachers
from .config import Config, make_config, validate
from .errors import ConfigError
from .data import Dataset, load_dataset
from .evaluate import predict, summarize
from .models import N_CLASSES, StackedMLP, build_model
from .device import pick_device
from .train import Hooks, Recipe, TransferSet, fit, run_training

log = logging.getLogger(__name__)

PAD_LOGIT = -1e4  # padded outputs: exp(-1e4) is 0 in float32, so they never take probability or gradient
COMBINE_LR = 2.0  # each term's Hessian in z has eigenvalues in [-1/2, 1/2]: step 1/L = 2 descends
COMBINE_MOMENTUM = 0.9  # Nesterov: far fewer steps where confident models leave the objective flat
KMEANS_SEED, KMEANS_RESTARTS = 0, 20
DUSTBIN_FIT_IMAGES = 10000
TIMING_STEPS = 20  # steps timed for "together vs one after another" (after training)
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}


# --- clusters -------------------------------------------------------------------

def prediction_covariance(probs: torch.Tensor) -> torch.Tensor:
    """Covariance (classes, classes) of predicted class probabilities probs (n, classes)."""
    centred = probs.double() - probs.double().mean(0)
    return centred.T @ centred / max(len(probs) - 1, 1)


def kmeans(points: torch.Tensor, k: int, seed: int = KMEANS_SEED, restarts: int = KMEANS_RESTARTS,
           iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ starts; the restart with the least inertia wins.

    points (n, d) -> (assignment (n,), centroids (k, d)). Seeded, so deterministic."""
    points = points.double()
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        chosen = [int(torch.randint(len(points), (1,), generator=generator))]
        for _ in range(1, k):
            d2 = torch.cdist(points, points[chosen]).min(1).values ** 2
            if d2.sum() <= 0:  # every point already a centre: any unchosen one
                d2 = torch.ones(len(points), dtype=points.dtype)
                d2[chosen] = 0
            chosen.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=generator)))
        centroids = points[chosen].clone()
        assignment = None
        for _ in range(iterations):
            new = torch.cdist(points, centroids).argmin(1)
            if assignment is not None and torch.equal(new, assignment):
                break
            assignment = new
            for j in range(k):
                mine = points[assignment == j]
                if len(mine):
                    centroids[j] = mine.mean(0)
                else:  # an empty cluster takes the point farthest from its centre
                    far = int((torch.cdist(points, centroids).min(1).values).argmax())
                    centroids[j] = points[far]
        inertia = float((torch.cdist(points, centroids).min(1).values ** 2).sum())
        if best is None or inertia < best[0] - 1e-15:
            best = (inertia, assignment.clone(), centroids.clone())
    return best[1], best[2]


def correlation(covariance: torch.Tensor) -> torch.Tensor:
    """The covariance scaled to unit diagonal (a class never predicted gets 0 correlations)."""
    std = covariance.double().diagonal().clamp_min(0).sqrt()
    scale = torch.where(std > 0, 1 / std, torch.zeros_like(std))
    return covariance.double() * scale[:, None] * scale[None, :]


def cluster_classes(covariance: torch.Tensor, k: int, overlap: float | None = None,
                    seed: int = KMEANS_SEED) -> list[list[int]]:
    """Classes grouped by k-means on the columns of the covariance of predicted
    probabilities, scaled to a correlation: classes predicted together (confused)
    share a cluster.

    Why scaled: a raw covariance column is dominated by its diagonal entry, the
    variance of that class's probability, i.e. how confidently the class is
    predicted, so k-means on raw columns groups classes by confidence. (On a
    Fashion-MNIST generalist, K = 4 gave [[0, 2, 3, 4, 6, 7, 8], [1], [5], [9]] on
    raw columns, [[0, 6], [1, 3, 8], [2, 4], [5, 7, 9]] on correlations.)

    overlap: a class also joins every other cluster whose classes it correlates
    with at least this much on average (None: clusters are disjoint). With
    confident predictions unrelated classes correlate at about -1/(classes - 1).
    Clusters are ordered by their smallest class."""
    corr = correlation(covariance)
    assignment, _ = kmeans(corr.T, k, seed)  # column c: how class c's probability co-varies with every class
    found = [(assignment == j).nonzero().flatten().tolist() for j in range(k)]
    clusters = [set(c) for c in found]
    if overlap is not None:
        for c in range(len(corr)):
            for j, classes in enumerate(found):
                if c not in classes and float(corr[c, classes].mean()) >= overlap:
                    clusters[j].add(c)
    found = [sorted(s) for s in clusters if s]
    if len(found) < k:  # only when columns coincide, e.g. classes the generalist never predicts
        raise runs.RunError(f"k-means found only {len(found)} distinct clusters of classes for K = {k}: choose a smaller K")
    return sorted(found, key=lambda s: (s[0], len(s)))


# --- clusters as matrices ----------------------------------------------------------

def n_outputs(clusters: list[list[int]]) -> int:
    """Outputs of the specialists' stack: the largest cluster's classes plus the dustbin."""
    return max(len(c) for c in clusters) + 1


def membership(clusters: list[list[int]], n_classes: int = N_CLASSES) -> torch.Tensor:
    """(K, classes, outputs) 0/1: where each class lands in specialist m's output:
    its position in the cluster, else the dustbin (the last output)."""
    outputs = n_outputs(clusters)
    m = torch.zeros(len(clusters), n_classes, outputs, dtype=torch.float64)
    for k, cluster in enumerate(clusters):
        m[k, :, outputs - 1] = 1.0
        for j, c in enumerate(cluster):
            m[k, c, outputs - 1] = 0.0
            m[k, c, j] = 1.0
    return m


def real_outputs(clusters: list[list[int]], n_classes: int = N_CLASSES) -> torch.Tensor:
    """(K, outputs) bool: the outputs that stand for classes (not padding; the dustbin
    of a cluster that holds every class stands for nothing)."""
    return membership(clusters, n_classes).sum(1) > 0


def collapse(log_q: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """q (n, classes) as log-probabilities -> each specialist's view (K, n, outputs):
    its classes' probabilities and their remainder in the dustbin; padding gets -inf."""
    return torch.einsum("nc,kcs->kns", log_q.exp().to(member.dtype), member).log()


def specialist_labels(labels: torch.Tensor, clusters: list[list[int]]) -> torch.Tensor:
    """(K, n): each example's target for each specialist (position in the cluster, else dustbin)."""
    dustbin = n_outputs(clusters) - 1
    table = torch.full((len(clusters), len(labels)), dustbin, dtype=torch.long, device=labels.device)
    for k, cluster in enumerate(clusters):
        for j, c in enumerate(cluster):
            table[k][labels == c] = j
    return table


def cluster_shares(labels: torch.Tensor, clusters: list[list[int]]) -> list[float]:
    """π_m: the share of the training set in each cluster."""
    return [float(torch.isin(labels, torch.tensor(c, device=labels.device)).float().mean()) for c in clusters]


def dustbin_shifts(shares: list[float]) -> list[float]:
    """log((1 - π) / π): training saw the cluster and the rest 50/50; this restores the natural odds."""
    return [math.log((1 - p) / p) if 0 < p < 1 else 0.0 for p in shares]


def specialist_log_probs(logits: torch.Tensor, clusters: list[list[int]], shifts: list[float]) -> torch.Tensor:
    """Specialists' logits (K, n, outputs) -> log-probabilities over their real outputs,
    dustbin corrected; padding gets -inf (probability 0)."""
    shift = torch.tensor(shifts, dtype=logits.dtype, device=logits.device)
    z = logits.clone()
    z[..., -1] += shift[:, None]
    real = real_outputs(clusters).to(logits.device)
    return torch.log_softmax(z.masked_fill(~real[:, None, :], -math.inf), -1)


# --- the combination (§5.2) ---------------------------------------------------------

def active_specialists(log_p_generalist: torch.Tensor, clusters: list[list[int]], top_k: int) -> torch.Tensor:
    """(K, n) bool: specialist m speaks for image i when its cluster meets the generalist's top_k classes."""
    n_classes = log_p_generalist.shape[-1]
    in_cluster = torch.zeros(len(clusters), n_classes, dtype=torch.bool, device=log_p_generalist.device)
    for k, cluster in enumerate(clusters):
        in_cluster[k, cluster] = True
    top = log_p_generalist.topk(top_k, dim=-1).indices  # (n, top_k)
    return in_cluster[:, top].any(-1)


def _kl(log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log r) over the last dim, counting only outputs with p > 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(-1)


def combination_objective(z: torch.Tensor, log_pg: torch.Tensor, log_ps: torch.Tensor, member: torch.Tensor,
                          active: torch.Tensor) -> torch.Tensor:
    """Per image (n,): [KL(p_g ‖ q) + Σ_active KL(p_m ‖ collapse_m(q))] / (1 + number active),
    q = softmax(z). The division leaves the minimiser unchanged and bounds the curvature."""
    log_q = torch.log_softmax(z, -1)
    real = member.sum(1) > 0  # (K, outputs)
    q_m = torch.einsum("nc,kcs->kns", log_q.exp(), member)  # (K, n, outputs)
    # log of 1 where an output is padding: no 0/0 in the gradient, and p_m = 0 there anyway
    log_r = torch.where(real[:, None, :], q_m.clamp_min(1e-300), torch.ones_like(q_m)).log()
    total = _kl(log_pg, log_q) + (active * _kl(log_ps, log_r)).sum(0)
    return total / (1 + active.sum(0))


def combination_gradient(z: torch.Tensor, log_pg: torch.Tensor, p_s: torch.Tensor, member: torch.Tensor,
                         active: torch.Tensor) -> torch.Tensor:
    """∂/∂z of combination_objective, in closed form: q − (p_g + Σ_active e_m) / (1 + number active),
    e_m spreading each output's probability p_m,j over its classes in proportion to q
    (e_m,c = q_c p_m,j(c) / collapse_m(q)_j(c)). p_s: the specialists' probabilities (padding 0)."""
    q = torch.softmax(z, -1)
    r = torch.einsum("nc,kcs->kns", q, member)  # collapse_m(q): (K, n, outputs)
    ratio = torch.where(p_s > 0, p_s / r.clamp_min(1e-300), torch.zeros_like(p_s))
    spread = q * torch.einsum("kns,kcs->knc", ratio * active[..., None], member)  # Σ over active m: (K, n, classes)
    return q - (log_pg.exp() + spread.sum(0)) / (1 + active.sum(0))[:, None]


def combine(log_pg: torch.Tensor, log_ps: torch.Tensor, member: torch.Tensor, active: torch.Tensor,
            steps: int = 200, lr: float = COMBINE_LR, momentum: float = COMBINE_MOMENTUM) -> tuple[torch.Tensor, float]:
    """The paper's combined distribution, as log-probabilities (n, classes), and the largest
    gradient left after the last step (how far from the minimum).

    log_pg (n, classes): the generalist; log_ps (K, n, outputs): the specialists (padding
    -inf); member (K, classes, outputs) from `membership`; active (K, n) bool.
    Gradient descent with Nesterov momentum on q's logits z, from z = log p_g. In q
    the objective is convex (a sum of −log of linear functions of q), so every
    stationary point in z is the minimum. Images with no active specialist keep the
    generalist's distribution exactly."""
    rows = active.any(0)
    out = log_pg.clone()
    if not rows.any():
        return out, 0.0
    # renormalised in float64: the closed-form gradient assumes distributions that sum to 1
    g, a = torch.log_softmax(log_pg.double()[rows], -1), active[:, rows]
    p_s = torch.softmax(log_ps.double()[:, rows], -1)
    m = member.to(device=log_pg.device, dtype=torch.float64)
    z = g.clone()
    velocity = torch.zeros_like(z)
    for _ in range(steps):
        velocity = momentum * velocity + combination_gradient(z - lr * momentum * velocity, g, p_s, m, a)
        z = z - lr * velocity
    out[rows] = torch.log_softmax(z, -1).to(out.dtype)
    return out, float(combination_gradient(z, g, p_s, m, a).abs().max())


# --- the generalist -----------------------------------------------------------------

def load_generalist(cfg: Config) -> tuple[StackedMLP, dict]:
    """The generalist run's single model, checked against this run."""
    if not cfg.generalist:
        raise runs.RunError("no generalist given: set 'generalist' in the experiment file or pass --generalist "
                            "runs/<run> (train one: kdcli train-teacher -c experiments/generalist-fashion.yaml)")
    if not Path(cfg.generalist).exists():
        raise runs.RunError(f"generalist run '{cfg.generalist}' not found: train it first "
                            "(kdcli train-teacher -c experiments/generalist-fashion.yaml) or pass --generalist")
    model, payload = runs.load_model(cfg.generalist)
    saved = payload.get("config") or {}
    if "specialists" in payload:
        raise runs.RunError(f"{cfg.generalist} is a specialists run; give the generalist it was built on")
    dataset = saved.get("dataset", "mnist")
    if dataset != cfg.dataset:
        raise runs.RunError(f"generalist {cfg.generalist} was trained on {dataset}, this run uses {cfg.dataset}")
    if model.members != 1:
        raise runs.RunError(f"generalist {cfg.generalist} is a stack of {model.members} models; "
                            "specialists start from one model's weights: give a single-model run")
    if model.arch["n_classes"] != N_CLASSES or model.arch["n_inputs"] != 28 * 28:
        raise runs.RunError(f"generalist {cfg.generalist} has {model.arch['n_inputs']} inputs and "
                            f"{model.arch['n_classes']} outputs; kdcli's need 784 and {N_CLASSES}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, payload


def check_config(cfg: Config) -> None:
    """What train-specialists needs beyond a valid config."""
    if cfg.teacher:
        raise ConfigError("train-specialists learns from hard labels and its generalist: remove 'teacher' "
                          "(the generalist is 'generalist' / --generalist)")
    if cfg.omit_digits or cfg.keep_digits:
        raise ConfigError("train-specialists trains on every class: remove 'omit_digits' / 'keep_digits'")
    if cfg.members != 1 and cfg.clusters is None:
        raise ConfigError("train-specialists has one member per cluster: set 'n_clusters' (--clusters K), not 'members'")
    if cfg.clusters is None and cfg.n_clusters is None:
        raise ConfigError("train-specialists needs clusters: pass --clusters K (k-means on the generalist's "
                          "validation covariance) or list 'clusters' in the experiment file")
    if cfg.clusters is None and cfg.val_size <= 0:
        raise ConfigError("clustering needs the generalist's predictions on a validation split: set 'val_size' > 0 "
                          "(the experiments use 10000), or list 'clusters' by hand")


def resolve_clusters(cfg: Config) -> Config:
    """The run's config with its clusters settled: given by hand (n_clusters stays
    null) or by k-means on the validation covariance (n_clusters = K), and the
    specialists' architecture (members, hidden) taken from the generalist."""
    check_config(cfg)
    generalist, payload = load_generalist(cfg)
    clusters = cfg.clusters
    if clusters is None:
        generalist_val = int((payload.get("config") or {}).get("val_size", 0))
        if generalist_val < cfg.val_size:
            raise runs.RunError(
                f"generalist {cfg.generalist} trained on part of this run's validation split (its val_size is "
                f"{generalist_val}, this run's {cfg.val_size}): clusters must come from images it has not seen; "
                f"retrain it with val_size: {cfg.val_size}")
        device = pick_device(cfg.device)
        data = load_dataset(cfg, device)
        probs = predict(generalist.to(device), data.val_x)[0].softmax(-1)
        clusters = cluster_classes(prediction_covariance(probs).cpu(), cfg.n_clusters, cfg.cluster_overlap)
        log.info("clusters by k-means on %d validation images: %s", len(probs), clusters)
    resolved = dataclasses.replace(cfg, clusters=[list(c) for c in clusters], members=len(clusters),
                                   hidden=list(generalist.arch["hidden"]))
    validate(resolved)
    return resolved


# --- the specialists' stack -----------------------------------------------------------

@torch.no_grad()
def last_hidden(model: StackedMLP, flat_images: torch.Tensor) -> torch.Tensor:
    """A single model's last hidden layer (n, hidden), in eval mode (no dropout)."""
    h = flat_images
    for weight, bias in zip(list(model.weights)[:-1], list(model.biases)[:-1]):
        h = torch.relu(h @ weight[0].T + bias[0])
    return h


@torch.no_grad()
def dustbin_rows(generalist: StackedMLP, clusters: list[list[int]], flat_images: torch.Tensor) -> list[torch.Tensor | None]:
    """For each cluster, the linear output row (hidden weights, then bias) that best
    reproduces, in least squares on `flat_images`, the generalist's log-sum-exp of the
    logits of the classes outside the cluster: the dustbin's logit if the generalist's
    own probabilities were collapsed onto the cluster. None for a cluster of every class."""
    h = last_hidden(generalist, flat_images).double()
    logits = h @ generalist.weights[-1][0].T.double() + generalist.biases[-1][0, 0].double()  # (n, classes)
    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], 1).cpu()
    rows = []
    for cluster in clusters:
        rest = [c for c in range(logits.shape[-1]) if c not in cluster]
        if not rest:
            rows.append(None)
            continue
        target = torch.logsumexp(logits[:, rest], -1).cpu()
        rows.append(torch.linalg.lstsq(design, target[:, None]).solution[:, 0].float())
    return rows


@torch.no_grad()
def specialists_from(generalist: StackedMLP, clusters: list[list[int]], cfg: Config,
                     flat_images: torch.Tensor | None = None) -> StackedMLP:
    """K specialists initialised from the generalist (see the module docstring). With
    flat_images, each dustbin row is fitted by least squares to the generalist's
    log-sum-exp of the other classes (`dustbin_rows`); without, it is the mean of
    their rows plus log(number of them), which is exact only when their logits are
    equal: on a Fashion-MNIST generalist that started specialists at 6% errors on
    their own 50/50 task instead of 30%."""
    outputs = n_outputs(clusters)
    arch = {**generalist.arch, "members": len(clusters), "n_classes": outputs,
            "dropout_input": cfg.dropout_input, "dropout_hidden": cfg.dropout_hidden}
    model = build_model(arch)
    for dst, src in zip(list(model.weights)[:-1] + list(model.biases)[:-1],
                        list(generalist.weights)[:-1] + list(generalist.biases)[:-1]):
        dst.copy_(src.expand_as(dst))
    weight, bias = generalist.weights[-1][0], generalist.biases[-1][0, 0]  # (classes, hidden), (classes,)
    model.weights[-1].zero_()
    model.biases[-1].fill_(PAD_LOGIT)
    fitted = dustbin_rows(generalist, clusters, flat_images) if flat_images is not None else None
    for k, cluster in enumerate(clusters):
        model.weights[-1][k, : len(cluster)] = weight[cluster]
        model.biases[-1][k, 0, : len(cluster)] = bias[cluster]
        rest = [c for c in range(len(bias)) if c not in cluster]
        if not rest:
            continue
        if fitted is not None:
            model.weights[-1][k, -1] = fitted[k][:-1].to(weight.device)
            model.biases[-1][k, 0, -1] = fitted[k][-1]
        else:
            model.weights[-1][k, -1] = weight[rest].mean(0)
            model.biases[-1][k, 0, -1] = bias[rest].mean() + math.log(len(rest))
    return model


class HalfAndHalf:
    """member_epoch for TransferSet: member k's epoch of `size` indices, half from its
    cluster and half from the rest (all from the cluster when it holds every class),
    each half cycling through shuffles of its pool."""

    def __init__(self, labels: torch.Tensor, clusters: list[list[int]], size: int):
        labels = labels.cpu()
        self.size = size
        self.pools = []
        for cluster in clusters:
            inside = torch.isin(labels, torch.tensor(cluster))
            self.pools.append((inside.nonzero().flatten(), (~inside).nonzero().flatten()))

    def __call__(self, k: int, generator: torch.Generator) -> torch.Tensor:
        inside, outside = self.pools[k]
        half = self.size // 2 if len(outside) else self.size
        picks = torch.cat([_cycle(inside, half, generator), _cycle(outside, self.size - half, generator)])
        return picks[torch.randperm(self.size, generator=generator)]


def _cycle(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    if count == 0:
        return pool[:0]
    rounds = -(-count // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(rounds)])[:count]


def own_task_errors(log_ps: torch.Tensor, labels: torch.Tensor, clusters: list[list[int]]) -> list[int]:
    """Each specialist's errors on its own task (its classes + dustbin)."""
    return (log_ps.argmax(-1) != specialist_labels(labels, clusters)).sum(-1).tolist()


def specialist_recipe(generalist: StackedMLP, generalist_payload: dict) -> Callable[[Config, Dataset, torch.device, str], Recipe]:
    """run_training's recipe for train-specialists (cfg.clusters already resolved)."""

    def build(cfg: Config, data: Dataset, device: torch.device, command: str) -> Recipe:
        clusters = cfg.clusters
        empty = [k for k, c in enumerate(clusters) if not torch.isin(data.train_y, torch.tensor(c, device=data.train_y.device)).any()]
        if empty:
            raise runs.RunError(f"cluster {empty[0]} {clusters[empty[0]]} has no training examples")
        generalist.to(device)
        shares = cluster_shares(data.train_y, clusters)
        shifts = dustbin_shifts(shares)
        transfer = TransferSet(data.train_x, specialist_labels(data.train_y, clusters),
                               member_epoch=HalfAndHalf(data.train_y, clusters, len(data.train_x)),
                               epoch_size=len(data.train_x))
        # the dustbin rows are fitted on (up to) the first DUSTBIN_FIT_IMAGES training images
        model = specialists_from(generalist, clusters, cfg, data.train_x[:DUSTBIN_FIT_IMAGES].flatten(-2)).to(device)
        with torch.no_grad():  # start at the training sampler's prior; dustbin_shifts restore the natural one
            model.biases[-1][:, 0, -1] -= torch.tensor(shifts, device=device)
        initial = copy.deepcopy(model)  # for timing, after training

        def evaluate(model: StackedMLP) -> dict:
            out = {}
            for split, images, labels in (("val", data.val_x, data.val_y), ("test", data.test_x, data.test_y)):
                if len(images):
                    log_ps = specialist_log_probs(predict(model, images), clusters, shifts)
                    out[f"{split}_errors"] = own_task_errors(log_ps, labels, clusters)
            return out

        def result(model: StackedMLP, history: list[dict]) -> dict:
            result = specialists_result(cfg, command, generalist, model, initial, data, transfer, shares, shifts)
            timing = result["specialists"]["timing"]
            # the whole run's training, and what one specialist after another would have cost at the timed ratio
            timing["run_together_s"] = round(sum(r["seconds"] for r in history), 2)
            if timing["speedup"]:
                timing["run_sequential_estimate_s"] = round(timing["run_together_s"] * timing["speedup"], 2)
            return result

        extra = {"specialists": {
            "clusters": clusters, "dustbin_shift": shifts, "cluster_share": shares,
            "generalist_run": str(cfg.generalist),
            "generalist": {"arch": generalist.arch,
                           "state_dict": {k: v.detach().cpu().clone() for k, v in generalist.state_dict().items()}},
        }}
        return Recipe(model, transfer, evaluate, result, extra)

    return build


def run_specialists(cfg: Config, command: str = "train-specialists", hooks: Hooks | None = None,
                    resume: bool = False, command_line: str | None = None) -> dict:
    """Train the specialists of cfg (clusters resolved here when not yet) and write the run directory."""
    if cfg.clusters is None or cfg.members != len(cfg.clusters):
        cfg = resolve_clusters(cfg)
    generalist, payload = load_generalist(cfg)
    return run_training(cfg, command, hooks, resume=resume, command_line=command_line,
                        recipe=specialist_recipe(generalist, payload))


# --- results --------------------------------------------------------------------------

def compare(log_pg: torch.Tensor, log_ps: torch.Tensor, labels: torch.Tensor, clusters: list[list[int]],
            top_k: int, steps: int) -> dict:
    """Generalist alone against the combination on one split: errors overall, per
    cluster, and by the number of specialists covering the true class (Table 4)."""
    member = membership(clusters, log_pg.shape[-1]).to(log_pg.device)
    active = active_specialists(log_pg, clusters, top_k)
    log_q, residual = combine(log_pg, log_ps, member, active, steps)
    generalist = summarize(log_pg, labels)
    combined = summarize(log_q, labels)
    right_g = log_pg.argmax(-1) == labels
    right_q = log_q.argmax(-1) == labels
    in_cluster = member[:, :, :-1].sum(-1) > 0  # (K, classes)
    covering = in_cluster.sum(0)[labels]  # (n,) specialists whose cluster holds the true class
    per_cluster = []
    for k, cluster in enumerate(clusters):
        mine = in_cluster[k][labels]
        per_cluster.append({"cluster": cluster, "n_examples": int(mine.sum()),
                            "generalist_errors": int((~right_g[mine]).sum()),
                            "combined_errors": int((~right_q[mine]).sum()),
                            "n_active": int(active[k].sum())})
    by_coverage = []
    for c in range(int(covering.max()) + 1 if len(labels) else 0):
        mine = covering == c
        if not mine.any():
            continue
        g, q = int(right_g[mine].sum()), int(right_q[mine].sum())
        by_coverage.append({"n_specialists": c, "n_examples": int(mine.sum()), "generalist_correct": g,
                            "combined_correct": q, "delta_correct": q - g,
                            "relative_accuracy_change": round((q - g) / g, 6) if g else None})
    keep = ("n_errors", "n_examples", "errors_per_10k", "accuracy", "nll")
    acc_g, acc_q = generalist["accuracy"], combined["accuracy"]
    return {
        "generalist": {k: generalist[k] for k in keep},
        "combined": {k: combined[k] for k in keep},
        "relative_accuracy_change": round((acc_q - acc_g) / acc_g, 6) if acc_g else None,
        "relative_error_change": round((combined["n_errors"] - generalist["n_errors"]) / generalist["n_errors"], 6)
        if generalist["n_errors"] else None,
        "n_changed": int((log_q.argmax(-1) != log_pg.argmax(-1)).sum()),
        "mean_active": round(float(active.float().sum(0).mean()), 4),
        "residual_gradient": residual,
        "own_task_errors": own_task_errors(log_ps, labels, clusters),
        "per_cluster": per_cluster,
        "by_coverage": by_coverage,
        "_summaries": (generalist, combined),
    }


def split_logprobs(generalist: StackedMLP, specialists: StackedMLP, images: torch.Tensor,
                   clusters: list[list[int]], shifts: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    log_pg = torch.log_softmax(predict(generalist, images)[0], -1)
    return log_pg, specialist_log_probs(predict(specialists, images), clusters, shifts)


def specialists_result(cfg: Config, command: str, generalist: StackedMLP, model: StackedMLP, initial: StackedMLP,
                       data: Dataset, transfer: TransferSet, shares: list[float], shifts: list[float]) -> dict:
    clusters = cfg.clusters
    test = compare(*split_logprobs(generalist, model, data.test_x, clusters, shifts), data.test_y, clusters,
                   cfg.top_k, cfg.combine_steps)
    generalist_test, combined_test = test.pop("_summaries")
    section = {
        "clusters": clusters,
        "class_names": [[CLASS_NAMES[cfg.dataset][c] for c in cluster] for cluster in clusters],
        "cluster_source": (f"k-means (K = {cfg.n_clusters}, overlap {cfg.cluster_overlap}) on the generalist's "
                           f"validation covariance" if cfg.n_clusters is not None else "the experiment file"),
        "generalist_run": str(cfg.generalist),
        "cluster_share": [round(s, 6) for s in shares],
        "dustbin_shift": [round(s, 6) for s in shifts],
        "top_k": cfg.top_k,
        "combine_steps": cfg.combine_steps,
        "test": test,
    }
    if len(data.val_x):
        val_pg, val_ps = split_logprobs(generalist, model, data.val_x, clusters, shifts)
        section["validation_covariance"] = [[round(v, 6) for v in row]
                                            for row in prediction_covariance(val_pg.exp()).tolist()]
        val = compare(val_pg, val_ps, data.val_y, clusters, cfg.top_k, cfg.combine_steps)
        val.pop("_summaries")
        section["val"] = val
    section["timing"] = time_together_vs_sequential(cfg, initial, transfer)
    return {"command": command, "name": cfg.name, "dataset": cfg.dataset,
            "test": combined_test, "generalist_test": generalist_test, "specialists": section}


def time_together_vs_sequential(cfg: Config, initial: StackedMLP, transfer: TransferSet,
                                steps: int = TIMING_STEPS) -> dict:
    """Seconds for `steps` training steps of all specialists stacked, against the same
    steps for each specialist alone, one after another (fit's own timing; no evaluation).
    initial: the specialists' stack as it started training."""
    clusters = cfg.clusters
    device = transfer.images.device
    short = dataclasses.replace(cfg, epochs=1, early_stopping=False, schedule="constant")  # the rate costs nothing
    size = min(steps * cfg.batch_size, transfer.epoch_length())

    def seconds(members: list[int]) -> float:
        model = copy.deepcopy(initial) if len(members) == len(clusters) else initial.member(members[0])
        model.to(device)
        sampler = transfer.member_epoch
        part = TransferSet(transfer.images, transfer.labels[members], epoch_size=size,
                           member_epoch=lambda j, g: sampler(members[j], g)[:size])
        return fit(model, part, dataclasses.replace(short, members=len(members)), evaluate=lambda m: {})[0]["seconds"]

    seconds([0])  # warm-up: first-call costs are no one's (seconds() takes all members, or one)
    together = seconds(list(range(len(clusters))))
    sequential = sum(seconds([k]) for k in range(len(clusters)))
    return {"steps": math.ceil(size / cfg.batch_size), "batch_size": cfg.batch_size, "specialists": len(clusters),
            "together_s": round(together, 4), "sequential_s": round(sequential, 4),
            "speedup": round(sequential / together, 3) if together > 0 else None, "device": str(device)}


# --- `kdcli eval` on a specialists run --------------------------------------------------

def is_specialists_run(run: str | Path) -> bool:
    released = teachers.locate(str(run))
    if released is not None and teachers.is_released(released):
        return False
    return "specialists" in runs.read_checkpoint(runs.checkpoint_path(run))


def evaluate_run(run: str | Path, data_dir: str | None = None, device: str | None = None) -> dict:
    """Rebuild the generalist and the specialists from the run's checkpoint alone and compare them on the test set."""
    model, payload = runs.load_model(run)
    section = payload["specialists"]
    try:
        generalist = build_model(section["generalist"]["arch"])
        generalist.load_state_dict(section["generalist"]["state_dict"])
        clusters = [list(map(int, c)) for c in section["clusters"]]
        shifts = [float(s) for s in section["dustbin_shift"]]
    except Exception as err:  # noqa: BLE001 - a damaged payload of any shape is one line
        raise runs.RunError(f"{run}: the specialists' checkpoint is incomplete ({runs.first_line(err)})") from None
    saved = dict(payload.get("config") or {})
    cfg = make_config({"dataset": saved.get("dataset", "mnist"),
                       "data_dir": data_dir if data_dir is not None else saved.get("data_dir"),
                       "test_limit": saved.get("test_limit"), "device": device or "auto"}, source=str(run))
    torch_device = pick_device(cfg.device)
    data = load_dataset(cfg, torch_device)
    generalist.to(torch_device)
    model.to(torch_device)
    top_k, steps = int(saved.get("top_k", 1)), int(saved.get("combine_steps", 200))
    test = compare(*split_logprobs(generalist, model, data.test_x, clusters, shifts), data.test_y, clusters, top_k, steps)
    generalist_test, combined_test = test.pop("_summaries")
    return {"run": str(run), "dataset": cfg.dataset, "clusters": clusters,
            "class_names": [[CLASS_NAMES[cfg.dataset][c] for c in cluster] for cluster in clusters],
            "dustbin_shift": shifts, "top_k": top_k, "combine_steps": steps,
            "test": combined_test, "generalist_test": generalist_test, "comparison": test}


# --- for people ---------------------------------------------------------------------------

def print_clusters(cfg: Config, console: Console) -> None:
    names = CLASS_NAMES[cfg.dataset]
    source = "k-means on the generalist's validation covariance" if cfg.n_clusters is not None else "the experiment file"
    covered = {c for cluster in cfg.clusters for c in cluster}
    lines = [f"  specialist {k}: " + ", ".join(f"{c} {names[c]}" if names[c] != str(c) else str(c) for c in cluster)
             for k, cluster in enumerate(cfg.clusters)]
    alone = [c for c in range(N_CLASSES) if c not in covered]
    if alone:
        lines.append("  generalist only: " + ", ".join(map(str, alone)))
    console.print(f"{len(cfg.clusters)} clusters ({source}):\n" + "\n".join(lines), highlight=False)


def comparison_tables(comparison: dict, clusters: list[list[int]], names: list[str], title: str) -> list[Table]:
    g, q = comparison["generalist"], comparison["combined"]
    overall = Table(title=title)
    for column in ("", "test errors", "of", "accuracy", "NLL"):
        overall.add_column(column, justify="left" if column == "" else "right")
    overall.add_row("generalist alone", str(g["n_errors"]), str(g["n_examples"]), f"{g['accuracy']:.2%}", f"{g['nll']:.4f}")
    overall.add_row("generalist + specialists (KL)", str(q["n_errors"]), str(q["n_examples"]), f"{q['accuracy']:.2%}",
                    f"{q['nll']:.4f}", style="bold")
    change = comparison["relative_accuracy_change"]
    overall.caption = (f"relative accuracy change {change:+.2%}; {comparison['n_changed']} predictions changed; "
                       f"{comparison['mean_active']:.2f} specialists active per image" if change is not None else None)
    per_cluster = Table(title="per cluster (test images whose true class is in it)")
    for column in ("specialist", "classes", "images", "generalist errors", "combined errors", "own-task errors, all images"):
        per_cluster.add_column(column, justify="left" if column == "classes" else "right")
    for k, (row, own) in enumerate(zip(comparison["per_cluster"], comparison["own_task_errors"])):
        per_cluster.add_row(str(k), ", ".join(names[c] for c in clusters[k]), str(row["n_examples"]),
                            str(row["generalist_errors"]), str(row["combined_errors"]), str(own))
    coverage = Table(title="by the number of specialists covering the true class (paper's Table 4)")
    for column in ("specialists", "images", "Δ correct", "relative accuracy change"):
        coverage.add_column(column, justify="right")
    for row in comparison["by_coverage"]:
        rel = row["relative_accuracy_change"]
        coverage.add_row(str(row["n_specialists"]), str(row["n_examples"]), f"{row['delta_correct']:+d}",
                         "" if rel is None else f"{rel:+.2%}")
    return [overall, per_cluster, coverage]


def print_result(result: dict, console: Console) -> None:
    """After train-specialists."""
    section = result["specialists"]
    names = CLASS_NAMES[result["dataset"]]
    for table in comparison_tables(section["test"], section["clusters"], names, f"{result['command']}: {result['name']}"):
        console.print(table)
    if "val" in section:
        v = section["val"]
        console.print(f"validation: generalist {v['generalist']['n_errors']} errors, combined "
                      f"{v['combined']['n_errors']} of {v['combined']['n_examples']}")
    t = section["timing"]
    console.print(f"{t['steps']} training steps of all {t['specialists']} specialists together: {t['together_s']:.2f} s; "
                  f"one after another: {t['sequential_s']:.2f} s ({t['speedup']:.2f}x)")
    console.print(f"{result['epochs']} epochs in {result['train_seconds']:.1f} s "
                  f"({result['samples_per_s']:,.0f} samples/s on {result['device']}), wall {result['wall_seconds']:.1f} s")


def print_eval(result: dict, console: Console) -> None:
    """`kdcli eval` on a specialists run."""
    names = CLASS_NAMES[result["dataset"]]
    for table in comparison_tables(result["comparison"], result["clusters"], names, f"eval: {result['run']}"):
        console.print(table)
