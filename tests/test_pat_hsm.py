"""PAT's modules and their materialization (compress/passes/pat/hsm.py): the sliced model computes
what the hard-masked model computed; the schedule's endpoints; the mask losses."""

from __future__ import annotations

import math

import pytest
import torch

from compress.passes.pat.hsm import FREEZE_AT, PATModules, SharedMask, mask_bias, mask_temperature, materialize


def _tiny(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    if not tied:  # an untied head of its own
        model.lm_head.weight.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_materialized_model_equals_the_hard_masked_one(tied):
    model = _tiny(tied)
    pat = PATModules(model, total_steps=100, rank=16).attach(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        keep = torch.randperm(64, generator=g)[:48]
        pat.mask.theta.fill_(-0.5)
        pat.mask.theta[keep] = 0.5
        for h in pat.transforms():  # a trained-looking transform: B != 0, scales off 1
            h.B.normal_(0, 0.05, generator=g)
            h.scale.uniform_(0.5, 1.5, generator=g)
    pat.mask.hard = True
    ids = torch.randint(0, 128, (2, 24), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
        hidden = model(ids, output_hidden_states=True).hidden_states
    # the pruned channels of the residual stream are exactly zero, at every layer
    off = torch.ones(64, dtype=torch.bool)
    off[keep] = False
    assert all(torch.all(h[..., off] == 0) for h in hidden[:-1])
    d_new = materialize(model, pat)
    assert d_new == 48 and model.config.hidden_size == 48 and model.config.head_dim == 16
    assert model.model.embed_tokens.weight.shape == (128, 48)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (48, 96)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # tied stays tied
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), float((got - ref).abs().max())
    # and a fresh model built from the new config loads the sliced weights (what save/load does)
    from transformers import LlamaForCausalLM

    again = LlamaForCausalLM(model.config).eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, ref, atol=1e-4, rtol=0)


def test_without_the_epsilon_rescale_the_slice_is_only_approximate():
    # the check above is strict enough to see the RMSNorm epsilon: tiny activations make it matter
    model = _tiny(False)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e-3)
    pat = PATModules(model, total_steps=10, rank=8).attach(model)
    with torch.no_grad():
        pat.mask.theta.fill_(0.5)
        pat.mask.theta[:32] = -0.5
    pat.mask.hard = True
    ids = torch.arange(16)[None]
    with torch.no_grad():
        ref = model(ids).logits
    materialize(model, pat)
    with torch.no_grad():
        exact = model(ids).logits
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.variance_epsilon = 1e-5  # the unscaled epsilon
        plain = model(ids).logits
    assert (exact - ref).abs().max() < 1e-4 < (plain - ref).abs().max()


def test_soft_mask_schedule():
    m = SharedMask(8, total_steps=1000)
    assert torch.equal(m(), torch.ones(8))  # step 0: no pruning at all
    assert mask_bias(0, 1000) == 0.5 and mask_bias(500, 1000) == 0.0
    assert mask_temperature(0, 1000) == pytest.approx(1.0, abs=1e-5)
    frozen = mask_temperature(int(FREEZE_AT * 1000), 1000)
    assert frozen == pytest.approx(1 / (1 - math.log(800) / math.log(1000)), rel=1e-4)
    assert mask_temperature(999, 1000) == frozen  # frozen from 0.8 G on
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.5, -0.5, 0.3, -0.2, 0.5, 0.5, -0.5, 0.1]))
    m.step = 799
    soft = m()
    assert soft.requires_grad and not torch.all((soft == 0) | (soft == 1))
    m.step = 800
    late = m()
    assert late.requires_grad is False  # theta is detached from 0.8 G on, and the mask is binary
    assert late.tolist() == [1, 0, 1, 0, 1, 1, 0, 1] and m.kept().tolist() == [0, 2, 4, 5, 7]
    m.step, m.hard = 0, True
    assert m().tolist() == late.tolist()


def test_hold_shifts_theta_to_exactly_the_target_count():
    m = SharedMask(6, total_steps=10)
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.5, 0.3, 0.2, 0.1, -0.2, -0.5]))
    assert m.hold(3) == pytest.approx(0.15)  # the midpoint of 0.2 and 0.1 moves to 0
    assert torch.allclose(m.theta, torch.tensor([0.35, 0.15, 0.05, -0.05, -0.35, -0.65]))
    assert m.hold(3) == 0.0  # holds already
    assert m.hold(5) == pytest.approx(-0.5) and int((m.theta >= 0).sum()) == 5
    m.step = 4
    assert not m.holding()
    m.step = 5
    assert m.holding()  # from 0.5 G
    m.step = 8
    assert m.holding() and m.frozen()  # and on into the frozen fifth, where theta no longer moves


def test_snap_keeps_exactly_the_target_largest():
    m = SharedMask(8, total_steps=10)
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.4, -0.1, 0.3, 0.02, -0.5, 0.5, 0.01, -0.01]))
    assert m.snap(3) == 2  # 0.02 and 0.01 were kept, now dropped
    assert m.kept().tolist() == [0, 2, 5] and m.theta[3] == -0.5 and m.theta[6] == -0.5
    assert m.snap(3) == 0  # idempotent
    assert m.snap(5) == 2 and m.kept().tolist() == [0, 1, 2, 5, 7]  # the next largest come in
    with torch.no_grad():
        m.theta.zero_()
    m.snap(2)
    assert m.kept().tolist() == [0, 1]  # ties by channel index


def test_mask_losses_count_and_polarize():
    m = SharedMask(10, total_steps=10)
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.5] * 6 + [-0.5] * 4))
    count, polar = m.losses(target=8)
    assert float(count.detach()) == pytest.approx(2 / 8) and float(polar.detach()) == 0.0
    count.backward()
    assert torch.all(m.theta.grad < 0)  # more channels wanted: every theta is pushed up
    with torch.no_grad():
        m.theta.copy_(torch.tensor([0.1] * 5 + [-0.3] * 5))
    _, polar = m.losses(target=5)
    assert float(polar.detach()) == pytest.approx(0.4 ** 2 + 0.2 ** 2)


def test_identity_loss_is_zero_for_orthonormal_rows():
    model = _tiny(True)
    pat = PATModules(model, total_steps=10, rank=8)
    h = pat.layers[0][0]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(64, 8))
        h.A.copy_(q.t())
    assert float(h.identity_loss().detach()) < 1e-10
    assert not pat.embed.transform and len(pat.transforms()) == 4  # tied: the embedding's HSM is a pure mask
