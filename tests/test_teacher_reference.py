"""The teacher's side of an evaluation, computed once: bucketed KL, the on-disk cache, and that a
pipeline runs the teacher once per domain however many stages it evaluates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress import evaluation as E
from tiny import make_model


def _exact_kl(t_logits, s_logits):
    t, s = F.log_softmax(t_logits.double(), -1), F.log_softmax(s_logits.double(), -1)
    return (t.exp() * (t - s)).sum(-1)


def test_bucket_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below_it():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    t_lp, s_lp = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    exact = _exact_kl(t_logits, s_logits)
    full = t_lp.topk(50, dim=-1)
    assert torch.allclose(E.bucket_kl(full.indices, full.values, s_lp), exact, atol=1e-5)
    for k in (1, 5, 20):
        top = t_lp.topk(k, dim=-1)
        approx = E.bucket_kl(top.indices, top.values, s_lp)
        assert torch.all(approx <= exact + 1e-6) and torch.all(approx >= -1e-9), k
    assert torch.allclose(E.bucket_kl(t_lp.topk(5, -1).indices, t_lp.topk(5, -1).values, t_lp),
                          torch.zeros(6, dtype=torch.float64), atol=1e-6)  # the teacher against itself


def test_peaked_teacher_top_k_kl_is_within_a_percent():
    g = torch.Generator().manual_seed(1)
    t_logits = torch.randn(64, 2000, generator=g) * 6  # a confident teacher, like a trained LM
    s_logits = t_logits + torch.randn(64, 2000, generator=g)
    top = F.log_softmax(t_logits, -1).topk(256, -1)
    approx = E.bucket_kl(top.indices, top.values, F.log_softmax(s_logits, -1)).mean()
    assert approx == pytest.approx(float(_exact_kl(t_logits, s_logits).mean()), rel=0.01)


def test_reference_is_cached_by_teacher_tokens_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher = make_model(320, seed=0)
    stream = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(2))
    calls = []

    def load():
        calls.append(1)
        return teacher

    a = E.teacher_reference(load, stream, window=64, max_tokens=256, key="t1")
    b = E.teacher_reference(load, stream, window=64, max_tokens=256, key="t1")
    assert len(calls) == 1 and len(a.nll) == 4 and all(torch.equal(x, y) for x, y in zip(a.idx, b.idx))
    E.teacher_reference(load, stream, window=64, max_tokens=256, key="t2")  # another teacher
    E.teacher_reference(load, stream.flip(0), window=64, max_tokens=256, key="t1")  # other tokens
    E.teacher_reference(load, stream, window=32, max_tokens=256, key="t1")  # other windows
    assert len(calls) == 4
    for f in (tmp_path / "cache" / "teacher-eval").iterdir():  # a damaged entry is recomputed
        f.write_bytes(b"garbage")
    E.teacher_reference(load, stream, window=64, max_tokens=256, key="t1")
    assert len(calls) == 5
    # a student scored against the cached reference equals one scored against the model itself
    student = make_model(320, seed=1)
    r1 = E.evaluate_stream(student, stream, window=64, max_tokens=256, teacher=teacher)
    r2 = E.evaluate_stream(student, stream, window=64, max_tokens=256, reference=b)
    assert r1["kl"] == pytest.approx(r2["kl"], rel=1e-6) and r1["teacher_perplexity"] == pytest.approx(
        r2["teacher_perplexity"], rel=1e-6)
    assert r1["kl"] > 0 and 0 <= r1["top1_agreement"] <= 1


def test_teacher_as_its_own_student_scores_zero_and_the_same_perplexity(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    teacher = make_model(320, seed=0)
    stream = torch.randint(3, 320, (300,), generator=torch.Generator().manual_seed(2))
    own = E.evaluate_domains(teacher, [("x", stream)], window=64, max_tokens=256, teacher_key="t", is_teacher=True)
    other = E.evaluate_domains(teacher, [("x", stream)], window=64, max_tokens=256, teacher=lambda: teacher,
                               teacher_key="t")
    assert own["perplexity"] == pytest.approx(other["perplexity"], rel=1e-5)
    assert other["kl"] == pytest.approx(0.0, abs=1e-3) and other["top1_agreement"] == 1.0
