import math

import pytest
import torch
import torch.nn.functional as F

from compress.ops import losses


def _ref_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    return (p * (p.log() - torch.log_softmax(q_logits.double(), -1))).sum(-1)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g)
    t = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    return s, t, ids


def test_cross_entropy_matches_hand_computation(batch):
    s, _, ids = batch
    ref = 0.0
    for b in range(2):
        for i in range(4):
            ref += -torch.log_softmax(s[b, i].double(), -1)[ids[b, i + 1]].item()
    assert losses.cross_entropy(s, ids).item() == pytest.approx(ref / 8, rel=1e-6)


def test_cross_entropy_excludes_padding(batch):
    s, _, ids = batch
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ref = [-torch.log_softmax(s[0, i], -1)[ids[0, i + 1]].item() for i in range(2)]
    ref += [-torch.log_softmax(s[1, i], -1)[ids[1, i + 1]].item() for i in range(4)]
    assert losses.cross_entropy(s, ids, mask).item() == pytest.approx(sum(ref) / 6, rel=1e-5)


def test_forward_and_reverse_kl_match_reference(batch):
    s, t, _ = batch
    fwd = _ref_kl(t[:, :-1], s[:, :-1]).mean().item()
    rev = _ref_kl(s[:, :-1], t[:, :-1]).mean().item()
    assert losses.forward_kl(s, t).item() == pytest.approx(fwd, rel=1e-5)
    assert losses.reverse_kl(s, t).item() == pytest.approx(rev, rel=1e-5)
    assert fwd != pytest.approx(rev, rel=1e-3)  # the two directions really differ here
    # torch's own kl_div agrees with our forward KL
    ref = F.kl_div(torch.log_softmax(s[:, :-1], -1).reshape(-1, 7), torch.log_softmax(t[:, :-1], -1).reshape(-1, 7),
                   log_target=True, reduction="batchmean")
    assert losses.forward_kl(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_temperature_scaling(batch):
    s, t, _ = batch
    T = 2.0
    ref = _ref_kl(t[:, :-1] / T, s[:, :-1] / T).mean().item() * T * T
    assert losses.forward_kl(s, t, temperature=T).item() == pytest.approx(ref, rel=1e-5)


def test_kl_is_zero_for_identical_logits(batch):
    s, _, _ = batch
    assert losses.forward_kl(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.reverse_kl(s, s).item() == pytest.approx(0.0, abs=1e-6)


def test_squarehead_reference_zero_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 6, 8, generator=g) * (i + 1) for i in range(3)]
    s = [x + 0.1 * torch.randn(2, 6, 8, generator=g) for x in t]
    ref = sum((((a - b) ** 2).mean() / (b**2).mean()).item() for a, b in zip(s, t))
    assert losses.squarehead(s, t, eps=0).item() == pytest.approx(ref, rel=1e-5)
    assert losses.squarehead(t, t).item() == 0.0
    scaled = losses.squarehead([10 * x for x in s], [10 * x for x in t])
    assert scaled.item() == pytest.approx(losses.squarehead(s, t).item(), rel=1e-4)
    # summed over layers, not averaged: three equal layers give three times one layer
    one = losses.squarehead(s[:1], t[:1], eps=0).item()
    assert losses.squarehead(s[:1] * 3, t[:1] * 3, eps=0).item() == pytest.approx(3 * one, rel=1e-6)


def test_squarehead_excludes_padding():
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(1, 4, 8, generator=g)]
    s = [t[0].clone()]
    s[0][0, 3] += 100.0  # a huge error on a padded position only
    mask = torch.tensor([[1, 1, 1, 0]])
    assert losses.squarehead(s, t, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.squarehead(s, t).item() > 1.0


def test_top1_agreement():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    t = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    assert losses.top1_agreement(s, t).item() == pytest.approx(0.5)
    assert math.isclose(losses.top1_agreement(t, t).item(), 1.0)
