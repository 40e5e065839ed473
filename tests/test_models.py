"""Stacked MLPs against plain nn.Linear networks; max-norm; checkpoints."""

import torch
from torch import nn

from kdcli.models import StackedMLP, member_seeds
from kdcli.runs import load_model, save_checkpoint


def reference_net(model: StackedMLP, k: int) -> nn.Sequential:
    layers = []
    for i, (w, b) in enumerate(zip(model.weights, model.biases)):
        linear = nn.Linear(w.shape[2], w.shape[1])
        linear.weight.data.copy_(w[k])
        linear.bias.data.copy_(b[k, 0])
        layers += [linear, nn.ReLU()] if i < len(model.weights) - 1 else [linear]
    return nn.Sequential(*layers)


def test_stack_gives_the_logits_of_separate_models():
    model = StackedMLP([32, 16], members=4, seeds=member_seeds(5, 4)).eval()
    x = torch.rand(7, 784)
    stacked = model(x)
    for k in range(4):
        assert torch.allclose(stacked[k], reference_net(model, k)(x), atol=1e-5)


def test_member_k_equals_a_single_model_with_its_seed():
    seeds = member_seeds(3, 3)
    stack = StackedMLP([20], members=3, seeds=seeds)
    single = StackedMLP([20], members=1, seeds=[seeds[2]])
    for a, b in zip(stack.member(2).parameters(), single.parameters()):
        assert torch.equal(a, b)


def test_dropout_only_in_training_and_per_member():
    model = StackedMLP([50], members=2, dropout_input=0.5, dropout_hidden=0.5, seeds=[0, 0])
    x = torch.rand(1, 784)
    model.eval()
    out = model(x)
    assert torch.allclose(out[0], out[1])  # identical members, no dropout
    model.train()
    torch.manual_seed(0)
    out = model(x)
    assert not torch.allclose(out[0], out[1])  # independent masks per member


def test_max_norm_caps_each_units_incoming_weights():
    model = StackedMLP([30], members=2)
    with torch.no_grad():
        model.weights[0].mul_(100)
    small_before = model.weights[1].detach().clone()
    model.apply_max_norm(2.0)
    norms = model.weights[0].norm(dim=2)
    assert norms.max() <= 2.0 + 1e-5 and norms.min() > 1.99  # all were large, all now on the bound
    assert torch.equal(model.weights[1], small_before)  # already inside the ball: untouched


def test_checkpoint_round_trip_rebuilds_identical_logits(tmp_path):
    model = StackedMLP([40, 20], members=2, dropout_input=0.2, seeds=[1, 2]).eval()
    save_checkpoint(tmp_path / "model.pt", model, {"dataset": "mnist"})
    rebuilt, payload = load_model(tmp_path)
    rebuilt.eval()
    x = torch.rand(5, 784)
    assert torch.equal(model(x), rebuilt(x))
    assert payload["config"]["dataset"] == "mnist" and rebuilt.arch == model.arch
