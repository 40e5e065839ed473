"""The one training loop: exact repeats, exact resume, stacks equal separate runs."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import interrupt_after_epoch, synthetic_config as config, weights
from kdcli.config import make_config
from kdcli.data import jitter_windows, load_dataset
from kdcli.models import StackedMLP
from kdcli.config import ConfigError
from kdcli.runs import RunError, read_metrics
from kdcli.train import (Diverged, TransferSet, check_precision, dead_members, fit, mixed_precision,
                         run_training, targets_for_every_shift, teacher_targets)




def test_seeded_runs_repeat_exactly(synthetic_dir, tmp_path):
    kw = dict(dropout_input=0.2, dropout_hidden=0.3, jitter=2, max_norm=2.0)
    a = run_training(config(synthetic_dir, tmp_path / "a", **kw), "train-teacher")
    b = run_training(config(synthetic_dir, tmp_path / "b", **kw), "train-teacher")
    assert a["test"] == b["test"]
    wa, wb = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    run_training(config(synthetic_dir, tmp_path / "c", seed=2, **kw), "train-teacher")
    wc = weights(tmp_path / "c" / "run")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_training_learns_the_synthetic_task(synthetic_dir, tmp_path):
    result = run_training(config(synthetic_dir, tmp_path, epochs=4), "train-teacher")
    assert result["test"]["n_errors"] < 20  # of 200; chance is 180


def test_resume_after_interrupt_equals_uninterrupted(synthetic_dir, tmp_path):
    kw = dict(dropout_input=0.2, dropout_hidden=0.3, jitter=2, max_norm=2.0, epochs=4)
    full = run_training(config(synthetic_dir, tmp_path / "full", **kw), "train-teacher")

    cfg = config(synthetic_dir, tmp_path / "cut", **kw)

    interrupt_after_epoch(cfg, 2)  # the kept state is epoch 1
    assert (cfg.run_dir / "resume.pt").is_file() and not (cfg.run_dir / "result.json").exists()
    resumed = run_training(cfg, "train-teacher", resume=True)

    assert resumed["test"] == full["test"]
    wf, wr = weights(tmp_path / "full" / "run"), weights(cfg.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    metrics = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4
    assert not (cfg.run_dir / "resume.pt").exists()


# With the config's defaults (Nesterov SGD on a one-cycle schedule) this is the regularised ensemble members'
# recipe (experiments/search/ensreg-ensemble-mnist.yaml), so the stack test below covers it.
REGULARISED = dict(dropout_input=0.2, dropout_hidden=0.5, jitter=2, max_norm=2.0)


@pytest.mark.parametrize("options", [{}, REGULARISED], ids=["plain", "dropout-jitter-maxnorm"])
def test_stacked_members_train_like_separate_runs(synthetic_dir, tmp_path, options):
    """Member k draws its own data order, jitter shifts and dropout masks, those of a single run
    seeded like it: only the batched matmuls' rounding tells the two apart."""
    stacked = run_training(config(synthetic_dir, tmp_path / "s", members=2, epochs=2, **options), "train-ensemble")
    for k, seed in enumerate((1, 1001)):
        single = run_training(config(synthetic_dir, tmp_path / f"m{k}", seed=seed, epochs=2, **options), "train-teacher")
        w_single = weights(tmp_path / f"m{k}" / "run")
        w_stack = weights(tmp_path / "s" / "run")
        for name in w_single:
            assert torch.allclose(w_stack[name][k : k + 1], w_single[name], atol=1e-5), name
        assert abs(stacked["members"][k]["test_errors"] - single["test"]["n_errors"]) <= 1


def test_a_stack_resumes_exactly_with_each_members_streams(synthetic_dir, tmp_path):
    kw = dict(REGULARISED, members=2, epochs=3)
    full = run_training(config(synthetic_dir, tmp_path / "full", **kw), "train-ensemble")
    cfg = config(synthetic_dir, tmp_path / "cut", **kw)
    interrupt_after_epoch(cfg, 2)
    resumed = run_training(cfg, "train-ensemble", resume=True)
    assert resumed["members"] == full["members"]
    wf, wr = weights(tmp_path / "full" / "run"), weights(cfg.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def as_saved_before_member_streams(resume_pt):
    """Rewrite a resume.pt as kdcli saved it when a run had one jitter stream and drew its
    dropout masks from the global RNG (for one member, member 0's streams)."""
    payload = torch.load(resume_pt, weights_only=True)
    state = payload["train_state"]
    state["jitter_rng"], state["torch_rng"] = state.pop("jitter_rngs")[0], state.pop("dropout_rngs")[0]
    torch.save(payload, resume_pt)


def test_a_single_run_saved_before_member_streams_resumes_exactly(synthetic_dir, tmp_path):
    full = run_training(config(synthetic_dir, tmp_path / "full", **REGULARISED), "train-teacher")
    cfg = config(synthetic_dir, tmp_path / "cut", **REGULARISED)
    interrupt_after_epoch(cfg, 2)
    as_saved_before_member_streams(cfg.run_dir / "resume.pt")
    assert run_training(cfg, "train-teacher", resume=True)["test"] == full["test"]
    wf, wr = weights(tmp_path / "full" / "run"), weights(cfg.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_a_stack_saved_before_member_streams_is_refused_in_one_line(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path / "cut", members=2, **REGULARISED)
    interrupt_after_epoch(cfg, 2)
    as_saved_before_member_streams(cfg.run_dir / "resume.pt")
    with pytest.raises(RunError, match="shared one jitter and dropout stream.*start over with --force"):
        run_training(cfg, "train-ensemble", resume=True)


def test_bf16_runs_the_forward_matmuls_in_bfloat16_and_keeps_fp32_weights():
    model = StackedMLP(hidden=[16], members=2)
    x = torch.rand(5, 784)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with mixed_precision(make_config({"precision": precision}), torch.device("cpu")):
            assert model(x).dtype == dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_training_learns_close_to_fp32_but_is_not_fp32(synthetic_dir, tmp_path):
    fp32 = run_training(config(synthetic_dir, tmp_path / "a", epochs=4), "train-teacher")
    bf16 = run_training(config(synthetic_dir, tmp_path / "b", epochs=4, precision="bf16"), "train-teacher")
    assert bf16["test"]["n_errors"] < 20  # of 200, as fp32 training (chance is 180)
    assert abs(bf16["test"]["n_errors"] - fp32["test"]["n_errors"]) <= 5
    wa, wb = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(w.dtype == torch.float32 for w in wb.values())
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_is_refused_on_a_device_autocast_does_not_cover():
    with pytest.raises(ConfigError, match="precision: bf16.*mps"):
        check_precision(make_config({"precision": "bf16"}), torch.device("mps"))
    check_precision(make_config({"precision": "fp32"}), torch.device("mps"))  # fp32 runs anywhere


def test_importing_kdcli_flushes_denormals_in_every_torch_thread():
    """The flag is per thread; set after torch's thread pool had started, it reached only the main
    thread, and half of a two-thread op on denormals ran slowly and kept them."""
    code = ("import kdcli, torch\n"
            "torch.full((4_000_000,), 1.0).mul_(0.5)\n"  # torch's first parallel op starts its worker threads
            "y = torch.full((8_000_000,), 1e-20) * 1e-19\n"  # 1e-39 is denormal: flushed to zero
            "print(int((y != 0).sum()))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"


def test_cached_and_per_batch_teacher_targets_agree():
    teacher = StackedMLP([16], members=3, seeds=[1, 2, 3]).eval()
    images = torch.rand(40, 28, 28)
    temps = [4.0]
    cached = TransferSet(images, torch.zeros(40, dtype=torch.long),
                         soft_targets=teacher_targets(teacher, images.flatten(-2), temps, "mean_probs"))
    online = TransferSet(images, torch.zeros(40, dtype=torch.long),
                         teacher=lambda x: teacher_targets(teacher, x, temps, "mean_probs"))
    idx = torch.randint(0, 40, (2, 8))
    x = images[idx].flatten(-2)
    assert torch.allclose(cached.targets_for(idx, x), online.targets_for(idx, x), atol=1e-6)


@pytest.mark.parametrize("temps", [[4.0], [1.0, 4.0]])
def test_every_shift_cache_gives_the_teachers_targets_for_each_shifted_batch(temps):
    """cache_teacher: the table scored once per shift, looked up by the shifts jitter drew, equals the
    teacher scoring the shifted batch (one table for one T; one per stacked student's T)."""
    teacher = StackedMLP([16], members=3, seeds=[1, 2, 3]).eval()
    images = torch.rand(40, 28, 28)
    cached = TransferSet(images, torch.zeros(40, dtype=torch.long),
                         shifted_targets=targets_for_every_shift(teacher, images, 2, temps, "mean_probs"))
    online = TransferSet(images, torch.zeros(40, dtype=torch.long),
                         teacher=lambda x: teacher_targets(teacher, x, temps, "mean_probs"))
    idx = torch.randint(0, 40, (len(temps), 8))
    shifted, windows = jitter_windows(images[idx], 2, [torch.Generator().manual_seed(k) for k in range(len(temps))])
    x = shifted.flatten(-2)
    assert torch.allclose(cached.targets_for(idx, x, windows), online.targets_for(idx, x), atol=1e-6)
    assert not torch.allclose(cached.targets_for(idx, x, torch.full_like(windows, 2)), online.targets_for(idx, x), atol=1e-6)


def test_a_cache_too_large_for_memory_is_refused_in_one_line(monkeypatch):
    import kdcli.train as train_module
    monkeypatch.setattr(train_module, "CACHE_LIMIT_BYTES", 1000)
    teacher = StackedMLP([16], seeds=[1]).eval()
    with pytest.raises(RunError, match=r"cache_teacher would hold .* GiB .*set cache_teacher: false"):
        targets_for_every_shift(teacher, torch.rand(40, 28, 28), 2, [4.0], "mean_probs")


def test_a_cached_teacher_trains_the_student_the_per_batch_teacher_trains(synthetic_dir, tmp_path):
    """Same shifts, same targets up to float rounding: the same losses epoch by epoch, close weights."""
    run_training(config(synthetic_dir, tmp_path / "t", epochs=2), "train-teacher")
    kw = dict(jitter=2, epochs=2, temperature=4.0, teacher=str(tmp_path / "t" / "run"))
    online = run_training(config(synthetic_dir, tmp_path / "a", **kw), "distill")
    cached = run_training(config(synthetic_dir, tmp_path / "b", cache_teacher=True, **kw), "distill")
    losses = lambda run: [r["loss"] for r in read_metrics(tmp_path / run / "run")]
    assert losses("b") == pytest.approx(losses("a"), rel=1e-5)
    wa, wb = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert abs(cached["test"]["n_errors"] - online["test"]["n_errors"]) <= 1


def test_jittered_transfer_set_shows_the_teacher_the_shifted_batch(synthetic_dir, tmp_path):
    """With jitter the teacher runs on each batch as the student sees it, not on the unshifted images."""
    cfg = config(synthetic_dir, tmp_path, jitter=2, epochs=1, temperature=4.0)
    data = load_dataset(cfg, torch.device("cpu"))
    teacher = StackedMLP([16], seeds=[3]).eval()
    seen_by_teacher, seen_by_student = [], []

    def spy_teacher(x):
        seen_by_teacher.append(x.clone())
        return teacher_targets(teacher, x, [4.0], "mean_probs")

    student = StackedMLP([24])
    forward = student.forward
    student.forward = lambda x, *rngs: (seen_by_student.append(x.detach().clone()), forward(x, *rngs))[1]
    fit(student, TransferSet(data.train_x, data.train_y, teacher=spy_teacher), cfg, evaluate=lambda m: {})
    assert len(seen_by_teacher) == len(seen_by_student) > 0
    assert all(torch.equal(t, s.reshape(t.shape)) for t, s in zip(seen_by_teacher, seen_by_student))
    unshifted = {row.numpy().tobytes() for row in data.train_x.flatten(-2)}
    shown = torch.cat(seen_by_teacher)
    assert sum(row.numpy().tobytes() in unshifted for row in shown) < len(shown) / 2


def test_divergence_is_reported_with_epoch_and_step(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path, lr=1e30, schedule="constant", momentum=0.0)
    data = load_dataset(cfg, torch.device("cpu"))
    model = StackedMLP([24])
    with pytest.raises(Diverged, match=r"epoch 1, step \d+"):
        fit(model, TransferSet(data.train_x, data.train_y), cfg, evaluate=lambda m: {})


def test_dead_members_are_those_with_one_output_for_every_example():
    logits = torch.randn(3, 5, 10)
    logits[1] = torch.randn(10)  # member 1: the same row for all 5 examples
    assert dead_members(logits) == [1]
    assert dead_members(logits[:, :1]) == []  # one example proves nothing


def kill(model, member):
    """Every first-layer unit of `member` negative for any [0, 1] image: a dead ReLU network."""
    with torch.no_grad():
        model.biases[0][member].fill_(-1e3)


def test_a_network_that_died_stops_training_and_says_so(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path)
    data = load_dataset(cfg, torch.device("cpu"))
    model = StackedMLP([24])
    kill(model, 0)
    with pytest.raises(Diverged, match=r"the network died .* at epoch 1, step \d+"):
        fit(model, TransferSet(data.train_x, data.train_y), cfg, evaluate=lambda m: {})


def test_a_stack_names_the_member_that_died_and_a_live_one_trains_on(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path, members=3, epochs=2)
    data = load_dataset(cfg, torch.device("cpu"))
    model = StackedMLP([24], members=3)
    kill(model, 1)
    with pytest.raises(Diverged, match=r"member 1 of the stack died"):
        fit(model, TransferSet(data.train_x, data.train_y), cfg, evaluate=lambda m: {})
    healthy = StackedMLP([24], members=3)
    assert len(fit(healthy, TransferSet(data.train_x, data.train_y), cfg, evaluate=lambda m: {})) == 2


def test_early_stopping_keeps_the_best_validation_epoch(synthetic_dir, tmp_path):
    cfg = config(synthetic_dir, tmp_path, val_size=100, early_stopping=True, epochs=3)
    result = run_training(cfg, "train-teacher")
    assert 1 <= result["best_epoch"][0] <= 3


def test_a_jittered_ensemble_teacher_scores_exactly_the_batch_the_student_sees(synthetic_dir, tmp_path, monkeypatch):
    """An ensemble run as the teacher of a jittered transfer set: all its members score each shifted batch,
    and the student learns from their combined distribution on exactly that batch."""
    import kdcli.train as train_module
    from kdcli.train import build_transfer_set, load_teacher

    run_training(config(synthetic_dir, tmp_path / "ens", members=3, epochs=2), "train-ensemble")
    cfg = config(synthetic_dir, tmp_path, jitter=2, epochs=1, temperature=4.0, teacher=str(tmp_path / "ens" / "run"))
    data = load_dataset(cfg, torch.device("cpu"))
    scored = []
    real_targets = train_module.teacher_targets

    def spy(teacher, x, temps, combine):
        out = real_targets(teacher, x, temps, combine)
        scored.append((teacher.members, x.clone(), out))
        return out

    monkeypatch.setattr(train_module, "teacher_targets", spy)
    transfer = build_transfer_set(cfg, data, torch.device("cpu"))
    seen_by_student = []
    student = StackedMLP([24])
    forward = student.forward
    student.forward = lambda x, *rngs: (seen_by_student.append(x.detach().clone()), forward(x, *rngs))[1]
    fit(student, transfer, cfg, evaluate=lambda m: {})
    assert len(scored) == len(seen_by_student) > 0 and all(members == 3 for members, _, _ in scored)
    assert all(torch.equal(x, s.reshape(x.shape)) for (_, x, _), s in zip(scored, seen_by_student))
    teacher, _ = load_teacher(cfg.teacher, torch.device("cpu"))
    _, x, targets = scored[0]
    assert torch.allclose(targets, real_targets(teacher, x, [4.0], "mean_probs"))
