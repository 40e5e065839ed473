"""Specialists (§5): the KL combination, collapsing, clustering, the stack's set-up, bad input, end to end."""

import json
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, kdcli, one_line_error
from kdcli import specialists as S
from kdcli.config import make_config
from kdcli.models import StackedMLP
from kdcli.report import specialist_rows
from kdcli.runs import save_checkpoint

CLUSTERS = [[0, 6], [2, 4, 6], [5, 7, 9]]  # overlapping, of different sizes; 1, 3 and 8 in none


def random_log_probs(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * scale, -1)


# --- collapsing and the combination -------------------------------------------------

def test_collapsing_q_onto_a_cluster_plus_dustbin_sums_to_one():
    log_q = random_log_probs(50, 10)
    member = S.membership(CLUSTERS)
    collapsed = S.collapse(log_q.double(), member).exp()  # (K, n, outputs)
    assert torch.allclose(collapsed.sum(-1), torch.ones(3, 50, dtype=torch.float64))
    q = log_q.double().exp()
    for k, cluster in enumerate(CLUSTERS):
        assert torch.allclose(collapsed[k, :, : len(cluster)], q[:, cluster])
        rest = [c for c in range(10) if c not in cluster]
        assert torch.allclose(collapsed[k, :, -1], q[:, rest].sum(-1))
        assert (collapsed[k, :, len(cluster):-1] == 0).all()  # padding holds nothing


def test_without_active_specialists_the_combination_is_the_generalist():
    log_pg = random_log_probs(40, 10)
    log_ps = S.specialist_log_probs(torch.randn(3, 40, 4), CLUSTERS, [0.0, 0.0, 0.0])
    nobody = torch.zeros(3, 40, dtype=torch.bool)
    log_q, residual = S.combine(log_pg, log_ps, S.membership(CLUSTERS), nobody, steps=50)
    assert torch.equal(log_q, log_pg) and residual == 0.0


def test_one_specialist_that_agrees_with_the_generalist_changes_nothing():
    log_pg = random_log_probs(40, 10, seed=1)
    member = S.membership(CLUSTERS[1:2])
    agreeing = S.collapse(log_pg.double(), member).float()  # exactly the generalist's view of its cluster
    everyone = torch.ones(1, 40, dtype=torch.bool)
    log_q, residual = S.combine(log_pg, agreeing, member, everyone, steps=100)
    assert torch.allclose(log_q.exp(), log_pg.exp(), atol=1e-6)
    assert residual < 1e-6


def test_a_specialist_over_every_class_gives_the_arithmetic_mean():
    """Independent reference (paper §5.2): when every model gives a full distribution,
    argmin_q KL(p_1 ‖ q) + KL(p_2 ‖ q) is the arithmetic mean of p_1 and p_2."""
    log_pg, log_p1 = random_log_probs(30, 10, seed=2, scale=1.5), random_log_probs(30, 10, seed=3, scale=1.5)
    everything = [list(range(10))]
    member = S.membership(everything)  # the dustbin stands for no class: padding
    log_ps = torch.cat([log_p1, torch.full((30, 1), -torch.inf)], -1)[None]
    log_q, residual = S.combine(log_pg, log_ps, member, torch.ones(1, 30, dtype=torch.bool), steps=200)
    assert torch.allclose(log_q.exp(), (log_pg.exp() + log_p1.exp()) / 2, atol=1e-6)
    assert residual < 1e-6


def test_the_closed_form_gradient_is_the_objectives():
    log_pg = random_log_probs(20, 10, seed=4).double()
    log_ps = S.specialist_log_probs(torch.randn(3, 20, 4, dtype=torch.float64) * 3, CLUSTERS, [0.5, -0.2, 1.0])
    member, active = S.membership(CLUSTERS), torch.rand(3, 20) < 0.6
    z = torch.randn(20, 10, dtype=torch.float64, requires_grad=True)
    (autograd,) = torch.autograd.grad(S.combination_objective(z, log_pg, log_ps, member, active).sum(), z)
    closed = S.combination_gradient(z.detach(), log_pg, log_ps.exp(), member, active)
    assert torch.allclose(autograd, closed, atol=1e-12)


def test_a_confident_specialist_overrules_a_hesitant_generalist():
    log_pg = torch.tensor([[0.55, 0.0, 0.0, 0.0, 0.0, 0.0, 0.45, 0.0, 0.0, 0.0]]).clamp_min(1e-4).log()
    log_pg = torch.log_softmax(log_pg, -1)
    member = S.membership([[0, 6]])
    log_ps = torch.tensor([[[0.05, 0.94, 0.01]]]).log()  # T-shirt 5%, shirt 94%, dustbin 1%
    active = S.active_specialists(log_pg, [[0, 6]], top_k=1)
    assert active.all()
    log_q, _ = S.combine(log_pg, log_ps, member, active, steps=100)
    assert log_q.argmax(-1).item() == 6 and abs(log_q.exp().sum().item() - 1) < 1e-6


def test_active_specialists_follow_the_generalists_top_classes():
    log_pg = torch.log_softmax(torch.tensor([[5.0, 0, 0, 0, 4.0, 0, 0, 0, 0, 0]]), -1)  # top: 0, then 4
    assert S.active_specialists(log_pg, CLUSTERS, top_k=1)[:, 0].tolist() == [True, False, False]
    assert S.active_specialists(log_pg, CLUSTERS, top_k=2)[:, 0].tolist() == [True, True, False]


# --- clusters ---------------------------------------------------------------------------

def planted_predictions(blocks, n=6000, seed=0):
    """Probabilities of a classifier that confuses classes only within their block."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    mates = torch.zeros(10, 10)  # mates[y, c]: c shares y's block
    for block in blocks:
        for y in block:
            mates[y, [c for c in block if c != y]] = 1.0
    confident = 0.5 + 0.5 * torch.rand(n, 1, generator=g)
    share = torch.rand(n, 10, generator=g) * mates[labels]
    share = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    probs = 0.002 + confident * torch.nn.functional.one_hot(labels, 10) + (1 - confident) * share
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize("blocks", [
    [[0, 6], [1, 3, 8], [2, 4], [5, 7, 9]],
    [[0, 2, 4, 6], [1], [3, 5, 7, 8, 9]],
])
def test_clustering_recovers_planted_clusters(blocks):
    covariance = S.prediction_covariance(planted_predictions(blocks))
    assert S.cluster_classes(covariance, len(blocks)) == sorted(blocks)
    assert S.cluster_classes(covariance, len(blocks)) == S.cluster_classes(covariance, len(blocks))  # seeded


def test_overlap_adds_a_class_to_the_cluster_it_is_confused_with():
    blocks = [[0, 6], [2, 4], [1, 3, 8], [5, 7, 9]]
    probs = planted_predictions(blocks)
    labels = torch.arange(len(probs)) % 10
    shirts = (labels == 6).nonzero().flatten()[::2]  # half the shirts also look like pullovers and coats
    probs[shirts, 2] += 0.3
    probs[shirts, 4] += 0.3
    probs = probs / probs.sum(-1, keepdim=True)
    covariance = S.prediction_covariance(probs)
    assert S.cluster_classes(covariance, 4) == sorted(blocks)
    # mean correlations: shirts with [pullover, coat] -0.10; pullovers or coats with [T-shirt, shirt] -0.13;
    # unrelated classes about -0.18
    assert S.cluster_classes(covariance, 4, overlap=-0.115) == [[0, 6], [1, 3, 8], [2, 4, 6], [5, 7, 9]]


# --- the specialists' stack ---------------------------------------------------------------

def test_specialists_start_as_the_generalist_collapsed_onto_their_clusters():
    generalist = StackedMLP([24], seeds=[3]).eval()
    cfg = make_config({})
    images = torch.rand(400, 784)
    stack = S.specialists_from(generalist, CLUSTERS, cfg, images).eval()
    assert stack.arch["members"] == 3 and stack.arch["n_classes"] == 4
    z_g, z_s = generalist(images)[0], stack(images)
    for k, cluster in enumerate(CLUSTERS):
        assert torch.allclose(z_s[k, :, : len(cluster)], z_g[:, cluster], atol=1e-5)
        assert (z_s[k, :, len(cluster):-1] == S.PAD_LOGIT).all()
        rest = [c for c in range(10) if c not in cluster]
        # a linear row cannot be a log-sum-exp, but on a small net's near-linear logits it comes close
        assert (z_s[k, :, -1] - torch.logsumexp(z_g[:, rest], -1)).abs().mean() < 0.05


def test_labels_sampler_and_dustbin_correction():
    labels = torch.arange(1000) % 10
    table = S.specialist_labels(labels, CLUSTERS)
    assert table[0, labels == 6].eq(1).all() and table[1, labels == 6].eq(2).all()
    assert table[0, labels == 3].eq(3).all()  # dustbin: the last output
    sampler = S.HalfAndHalf(labels, CLUSTERS, 600)
    order = sampler(2, torch.Generator().manual_seed(0))
    assert len(order) == 600 and torch.isin(labels[order], torch.tensor(CLUSTERS[2])).sum() == 300
    shares = S.cluster_shares(labels, CLUSTERS)
    assert shares == pytest.approx([0.2, 0.3, 0.3])
    assert S.dustbin_shifts(shares)[0] == pytest.approx(torch.tensor(0.8 / 0.2).log().item())


# --- bad input, through the real CLI -------------------------------------------------------

@pytest.fixture
def fake_generalist(tmp_path):
    def make(dataset="fashion-mnist", members=1, val_size=100):
        path = tmp_path / f"generalist-{dataset}-{members}"
        save_checkpoint(path / "model.pt", StackedMLP([8], members=members),
                        {"dataset": dataset, "val_size": val_size})
        return path
    return make


def experiment(tmp_path, text):
    path = tmp_path / "specialists.yaml"
    path.write_text("dataset: fashion-mnist\nval_size: 100\n" + text)
    return path


@pytest.mark.parametrize("text, message", [
    ("clusters: [[0, 2], [5, 12]]\n", "class 12 in cluster 1 is out of range"),
    ("clusters: [[0, 2], []]\n", "cluster 1 is empty"),
    ("clusters: [[0, 2, 2]]\n", "appears twice"),
    ("n_clusters: 11\n", "larger than the number of classes"),
    ("n_clusters: 3\nclusters: [[0, 6]]\n", "give one or the other"),
    ("cluster_overlap: 2\nn_clusters: 3\n", "cluster_overlap"),
    ("val_size: 0\nn_clusters: 3\n", "validation split"),
    ("", "needs clusters"),
])
def test_bad_clusters_are_one_line_and_exit_2(tmp_path, fake_generalist, text, message):
    line = one_line_error(kdcli("train-specialists", "-c", experiment(tmp_path, text),
                                "--generalist", fake_generalist(), "--out", tmp_path / "run"))
    assert message in line
    assert not (tmp_path / "run").exists()


def test_too_many_clusters_on_the_command_line(tmp_path, fake_generalist):
    line = one_line_error(kdcli("train-specialists", "-c", experiment(tmp_path, "clusters: [[0, 6]]\n"),
                                "--clusters", 12, "--generalist", fake_generalist(), "--out", tmp_path / "run"))
    assert "'n_clusters' (K = 12) is larger than the number of classes (10)" in line


@pytest.mark.parametrize("kind, message", [
    ("other-dataset", "was trained on mnist, this run uses fashion-mnist"),
    ("ensemble", "is a stack of 3 models"),
    ("missing", "not found"),
    ("saw-validation", "trained on part of this run's validation split"),
])
def test_unfit_generalists_are_refused(tmp_path, fake_generalist, kind, message):
    generalist = {"other-dataset": lambda: fake_generalist("mnist"), "ensemble": lambda: fake_generalist(members=3),
                  "missing": lambda: tmp_path / "nowhere", "saw-validation": lambda: fake_generalist(val_size=0)}[kind]()
    line = one_line_error(kdcli("train-specialists", "-c", experiment(tmp_path, "n_clusters: 2\n"),
                                "--generalist", generalist, "--out", tmp_path / "run"))
    assert message in line


# --- end to end on tiny data -----------------------------------------------------------------

def test_generalist_then_specialists_then_eval_and_report(synthetic_dir, tmp_path):
    runs_dir = tmp_path / "runs"
    generalist = runs_dir / "generalist-fashion"
    (tmp_path / "generalist.yaml").write_text(
        f"base: {REPO}/experiments/smoke/generalist-fashion.yaml\n"
        "val_size: 100\ntrain_limit: null\ntest_limit: null\nhidden: [24]\nepochs: 2\n")
    result = kdcli("train-teacher", "-c", tmp_path / "generalist.yaml", "--data-dir", synthetic_dir, "--out", generalist)
    assert result.exit_code == 0, result.output

    (tmp_path / "specialists.yaml").write_text(
        f"base: {REPO}/experiments/smoke/specialists-fashion.yaml\n"
        "val_size: 100\ntrain_limit: null\ntest_limit: null\nn_clusters: 3\ncluster_overlap: null\nepochs: 2\n")
    run = runs_dir / "specialists-fashion"
    result = kdcli("train-specialists", "-c", tmp_path / "specialists.yaml", "--generalist", generalist,
                   "--data-dir", synthetic_dir, "--out", run)
    assert result.exit_code == 0, result.output
    assert "3 clusters (k-means" in result.output and "generalist + specialists (KL)" in result.output

    saved = json.loads((run / "result.json").read_text())
    section = saved["specialists"]
    assert saved["command"] == "train-specialists" and len(section["clusters"]) == 3
    assert saved["config"]["clusters"] == section["clusters"] and saved["config"]["members"] == 3
    assert sorted(c for cluster in section["clusters"] for c in cluster) == list(range(10))
    test = section["test"]
    assert test["combined"]["n_examples"] == test["generalist"]["n_examples"] == 200
    assert saved["test"]["n_errors"] == test["combined"]["n_errors"]
    assert sum(b["n_examples"] for b in test["by_coverage"]) == 200
    assert {"together_s", "sequential_s", "speedup"} <= set(section["timing"])
    assert "val" in section and len(section["validation_covariance"]) == 10

    weights = torch.load(run / "model.pt", weights_only=True)
    out_w, out_b = weights["state_dict"]["weights.1"], weights["state_dict"]["biases.1"]
    for k, cluster in enumerate(section["clusters"]):  # padding is still exactly padding after training
        assert (out_w[k, len(cluster):-1] == 0).all() and (out_b[k, 0, len(cluster):-1] == S.PAD_LOGIT).all()

    result = kdcli("eval", run, "--data-dir", synthetic_dir, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test"]["n_errors"] == saved["test"]["n_errors"]
    assert evaluated["generalist_test"]["n_errors"] == saved["generalist_test"]["n_errors"]

    rows = specialist_rows({"specialists-fashion": saved})
    assert len(rows) == 5 and all("analogue of §5 on JFT" in r["experiment"] for r in rows)
    assert rows[1]["paper"].startswith("JFT + 61 specialists: 26.1%")


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_specialists_runs_three_seeds_each_on_its_own_generalist(tmp_path):
    done = subprocess.run(["make", "-n", "--no-print-directory", "specialists-fashion", f"RUNS={tmp_path}", "KDCLI=kdcli"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum("kdcli train-teacher -c experiments/generalist-fashion.yaml" in line for line in lines) == 3
    assert sum("kdcli train-specialists -c experiments/specialists-fashion.yaml" in line for line in lines) == 3
    assert f"--seed 3 --generalist {tmp_path}/generalist-fashion-s3" in done.stdout
