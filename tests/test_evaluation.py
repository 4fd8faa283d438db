import math

import pytest
import torch

from compress.evaluation import evaluate_stream, windows_of
from tiny import make_model


def test_windows_cover_first_n_tokens():
    s = torch.arange(1000)
    w = windows_of(s, 128, 600)
    assert [x.numel() for x in w] == [128, 128, 128, 128, 88]
    assert torch.equal(torch.cat(w), s[:600])
    assert [x.numel() for x in windows_of(s, 100, 301)] == [100, 100, 100]  # 1-token rest is dropped


def test_perplexity_matches_hand_computation():
    model = make_model(50, seed=3)
    stream = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    res = evaluate_stream(model, stream, window=100, max_tokens=250)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in (stream[0:100], stream[100:200], stream[200:250]):
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            nll -= logp.gather(-1, w[1:, None]).sum().item()
            n += w.numel() - 1
    assert res["predicted_tokens"] == n == 247
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res["windows"] == 3


def test_kl_and_agreement_against_teacher_and_determinism():
    student, teacher = make_model(50, seed=1), make_model(50, seed=2)
    stream = torch.randint(0, 50, (256,), generator=torch.Generator().manual_seed(0))
    a = evaluate_stream(student, stream, window=64, max_tokens=256, teacher=teacher, batch_size=2)
    b = evaluate_stream(student, stream, window=64, max_tokens=256, teacher=teacher, batch_size=2)
    assert a["kl"] > 0 and 0 <= a["top1_agreement"] < 1
    assert (a["perplexity"], a["kl"], a["top1_agreement"]) == (b["perplexity"], b["kl"], b["top1_agreement"])
    same = evaluate_stream(teacher, stream, window=64, max_tokens=256, teacher=teacher)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
