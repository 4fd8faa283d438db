"""The shared training loop: schedule, hooks, determinism, resume."""

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compress.ops.losses import forward_kl
from compress.training.loop import Hooks, LossWeights, TrainSettings, batch_indices, lr_factor, train
from conftest import run_cli
from test_cli import PROFILE, _wait_for_checkpoint
from tiny import make_model


def test_lr_schedule_warmup_then_cosine():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    mid = 4 + 8
    assert lr_factor(mid, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(mid, 4, 20, 0.1, "linear") == pytest.approx(1 - 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1, "linear") == pytest.approx(0.1)
    assert [lr_factor(s, 4, 20, 0.1, "constant") for s in (2, 4, 12, 19)] == [0.75, 1.0, 1.0, 1.0]


def test_batches_cover_each_epoch_once_and_depend_only_on_step():
    st = TrainSettings(steps=10, batch_size=3, seed=5)
    seen = torch.cat([batch_indices(s, 0, 0, st, 1, 12) for s in range(4)])
    assert sorted(seen.tolist()) == list(range(12))
    assert torch.equal(batch_indices(2, 0, 0, st, 1, 12), batch_indices(2, 0, 0, st, 1, 12))
    # two processes split the global batch of one process with twice the batch
    st2 = TrainSettings(steps=10, batch_size=6, seed=5)
    both = torch.cat([batch_indices(1, 0, r, st, 2, 12) for r in range(2)])
    assert torch.equal(both, batch_indices(1, 0, 0, st2, 1, 12))


def _blocks(n=16, t=24, vocab=64):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))


def _settings(**kw):
    base = dict(steps=8, lr=5e-3, warmup_steps=2, batch_size=2, checkpoint_every=3,
                loss=LossWeights(kl=1.0, squarehead=1.0, ce=0.1))
    base.update(kw)
    return TrainSettings(**base)


def test_distillation_lowers_kl_on_a_fixed_batch(tmp_path):
    teacher, student = make_model(64, seed=1), make_model(64, seed=2)
    blocks = _blocks()
    with torch.no_grad():
        before = forward_kl(student(blocks).logits, teacher(blocks).logits).item()
    train(student, teacher, blocks, _settings(steps=30, loss=LossWeights(kl=1.0)), work_dir=tmp_path)
    with torch.no_grad():
        after = forward_kl(student(blocks).logits, teacher(blocks).logits).item()
    assert after < 0.7 * before


def test_hooks_param_groups_and_masks_held_exactly(tmp_path):
    teacher, student = make_model(64, seed=1), make_model(64, seed=2)
    w = student.model.layers[0].mlp.up_proj.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    calls, zeros_seen = [], []

    def after_step(model, step):  # runs after the loop re-applied the masks
        zeros_seen.append(bool((model.model.layers[0].mlp.up_proj.weight[~mask] == 0).all()))
        calls.append(step)

    def groups(model):
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        rest = [p for n, p in model.named_parameters() if "norm" not in n]
        return [{"params": rest}, {"params": norms, "lr": 0.0}]

    norm_before = student.model.norm.weight.detach().clone()
    train(student, teacher, _blocks(), _settings(), work_dir=tmp_path, hooks=Hooks(groups, after_step),
          masks={"model.layers.0.mlp.up_proj": mask})
    assert calls == list(range(1, 9)) and all(zeros_seen)
    assert (w[~mask] == 0).all() and (w[mask] != 0).float().mean() > 0.99
    assert torch.equal(student.model.norm.weight, norm_before)  # lr 0 group untouched


def test_loss_hook_adds_terms_and_runs_several_forwards(tmp_path):
    """A loss hook replaces the step's loss: here the distillation terms plus an L2 pull of one
    weight towards zero, and a second forward (a "subnet" with a layer skipped) per micro-batch."""
    teacher = make_model(64, seed=1)
    base, hooked = make_model(64, seed=2), make_model(64, seed=2)
    forwards = []

    def loss(inp):
        total, parts = inp.distillation(inp.student_outputs())
        layers = inp.unwrapped.model.layers
        full = list(layers)
        inp.unwrapped.model.layers = torch.nn.ModuleList(full[:1])  # a shallower subnet, same weights
        try:
            sub = forward_kl(inp.student_outputs().logits, inp.teacher_outputs().logits)
        finally:
            inp.unwrapped.model.layers = torch.nn.ModuleList(full)
        reg = inp.unwrapped.model.layers[0].mlp.up_proj.weight.pow(2).sum()
        forwards.append(inp.step)
        parts.update(subnet=float(sub.detach()), l2=float(reg.detach()))
        return total + sub + 0.5 * reg, parts

    train(base, teacher, _blocks(), _settings(), work_dir=tmp_path / "a")
    res = train(hooked, teacher, _blocks(), _settings(), work_dir=tmp_path / "b", hooks=Hooks(loss=loss))
    assert forwards == list(range(8))  # once per micro-batch, told its step
    w_base = base.model.layers[0].mlp.up_proj.weight.norm()
    w_hook = hooked.model.layers[0].mlp.up_proj.weight.norm()
    assert w_hook < 0.9 * w_base  # the regularizer acted
    assert res["loss_last"] > 0 and len(res["history"]) == 8


class _Stop(Exception):
    pass


def test_resumed_training_equals_uninterrupted(tmp_path):
    teacher = make_model(64, seed=1)
    ref = make_model(64, seed=2)
    res_ref = train(ref, teacher, _blocks(), _settings(), work_dir=tmp_path / "a", fingerprint="x")

    killed = make_model(64, seed=2)

    def stop_at_5(model, step):
        if step == 5:
            raise _Stop

    with pytest.raises(_Stop):
        train(killed, teacher, _blocks(), _settings(), work_dir=tmp_path / "b", fingerprint="x",
              hooks=Hooks(after_step=stop_at_5))
    resumed = make_model(64, seed=2)  # fresh weights: everything must come from the checkpoint
    res = train(resumed, teacher, _blocks(), _settings(), work_dir=tmp_path / "b", fingerprint="x")
    assert res["resumed_from_step"] == 3
    assert res["history"] == res_ref["history"]
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_checkpoint_with_other_fingerprint_is_ignored(tmp_path):
    teacher = make_model(64, seed=1)

    def stop(model, step):
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train(make_model(64, seed=2), teacher, _blocks(), _settings(), work_dir=tmp_path, fingerprint="a",
              hooks=Hooks(after_step=stop))
    res = train(make_model(64, seed=2), teacher, _blocks(), _settings(), work_dir=tmp_path, fingerprint="b")
    assert res["resumed_from_step"] == 0


def test_killed_cli_run_resumes_to_the_same_model(tiny_dir, tiny_text, tmp_path):
    """SIGKILL mid-pass (no cleanup at all), rerun: same weights as an uninterrupted run."""
    common = ["--profile", PROFILE, "--data", str(tiny_text), "--eval-data", str(tiny_text),
              "--set", "distill.steps=120", "--set", "distill.checkpoint_every=15"]
    ref = run_cli("model", str(tiny_dir), *common, "--out", str(tmp_path / "ref"), "--quiet")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "compress", "model", str(tiny_dir), *common, "--out", str(out),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "stages" / "01-distill").exists()
    again = run_cli("model", str(tiny_dir), *common, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming from checkpoint at step" in again.stderr
    a = load_file(tmp_path / "ref" / "stages" / "01-distill" / "model.safetensors")
    b = load_file(out / "stages" / "01-distill" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (out / "stages").iterdir() if p.name.startswith(".")]


def test_bf16_auto_is_decided_by_measurement_and_remembered(monkeypatch, tmp_path):
    import compress.hardware as hw

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    for speedup, expected in ((2.0, True), (0.06, False)):
        (tmp_path / "hardware.json").unlink(missing_ok=True)
        monkeypatch.setattr(hw, "measure_bf16_speedup", lambda s=speedup: calls.append(s) or s)
        on, why = hw.resolve_bf16("auto")
        assert on is expected and f"{speedup:.2f}x" in why
        assert hw.resolve_bf16("auto")[0] is expected  # remembered: measured once per machine
    assert calls == [2.0, 0.06]
    assert hw.resolve_bf16("on")[0] and not hw.resolve_bf16("off")[0]
    monkeypatch.undo()
    assert 0 < hw.measure_bf16_speedup(rounds=1) < 100  # the real measurement runs (about a second)
