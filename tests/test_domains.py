"""Held-out evaluation domains: built-in texts, per-domain ratios to the teacher, the report's and
`compress eval`'s domain tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from compress import api
from compress.domains import BUILTIN_DOMAINS, builtin_text_spec, python_code_text, python_docs_text
from compress.errors import UserError
from compress.evaluation import evaluate_stream, summarize_domains
from conftest import run_cli
from tiny import make_model

PROFILE = str(Path(__file__).parent / "profiles" / "distill-tiny.yaml")


def test_builtin_texts_are_deterministic_and_of_their_kind():
    code, docs = python_code_text(), python_docs_text()
    assert code == python_code_text() and docs == python_docs_text()
    assert len(code) >= 400_000 and len(docs) >= 400_000
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert sum(ln.lstrip().startswith(("def ", "class ", "import ", "from ", "#")) for ln in lines) > 0.15 * len(lines)
    dl = [ln for ln in docs.splitlines() if ln.strip()]
    assert sum(ln.lstrip().startswith(("def ", "class ", "import ")) for ln in dl) < 0.02 * len(dl)  # prose
    assert docs.count(" the ") > 2000
    a, b = builtin_text_spec("python-docs"), builtin_text_spec("python-docs")
    assert a == b and a.paths[0].read_text() == docs and "standard library docstrings" in a.label


def test_summary_is_the_geometric_mean_and_the_worst():
    per = {"a": {"perplexity": 11.0, "teacher_perplexity": 10.0}, "b": {"perplexity": 12.1, "teacher_perplexity": 10.0},
           "c": {"perplexity": 5.0, "teacher_perplexity": 5.0}}
    s = summarize_domains(per)
    assert s["geomean_ratio"] == pytest.approx((1.1 * 1.21 * 1.0) ** (1 / 3)) and s["domains"] == 3
    assert s["worst_domain"] == "b" and s["worst_ratio"] == pytest.approx(1.21)


def test_teacher_perplexity_comes_from_the_same_windows():
    teacher, student = make_model(64, seed=1), make_model(64, seed=2)
    stream = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(0))
    both = evaluate_stream(student, stream, window=64, max_tokens=256, teacher=teacher)
    alone = evaluate_stream(teacher, stream, window=64, max_tokens=256)
    assert both["teacher_perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)


def test_pipeline_reports_every_domain(tiny_dir, tiny_text, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Edge devices run small language models. " * 80)
    p = api.plan(str(tiny_dir), PROFILE, data=str(tiny_text), eval_data=[str(tiny_text), str(other)])
    assert p.to_dict()["eval_data"][:2] == [str(tiny_text), str(other)]
    rep = api.run(p, tmp_path / "run", quiet=True)
    src, dst = rep["stages"]
    assert list(dst["domains"]) == ["corpus", "other", *BUILTIN_DOMAINS]
    assert all(d["tokens"] > 0 for d in dst["domains"].values())
    assert dst["perplexity"] == dst["domains"]["corpus"]["perplexity"]  # the first domain is the primary one
    assert src["ratio_geomean"] == pytest.approx(1.0) and src["ratio_worst"] == pytest.approx(1.0)
    ratios = [d["perplexity"] / d["teacher_perplexity"] for d in dst["domains"].values()]
    assert dst["ratio_geomean"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
    assert dst["ratio_worst"] == pytest.approx(max(ratios))
    for name, d in dst["domains"].items():  # the teacher's figure is the source stage's, same windows
        assert d["teacher_perplexity"] == pytest.approx(src["domains"][name]["perplexity"], rel=1e-6)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| **geometric mean** |" in md and "| python-docs |" in md and "standard library source code" in md
    from compress.evaluation import TEACHER_TOPK

    assert dst["kl_topk"] == TEACHER_TOPK and f"teacher's {TEACHER_TOPK} most likely tokens" in md  # as recorded


def test_cli_eval_several_domains(tiny_dir, tiny_text, tmp_path):
    other = tmp_path / "b.txt"
    other.write_text("Quantization maps weights to few bits. " * 60)
    r = run_cli("eval", str(tiny_dir), "--data", str(tiny_text), "--data", str(other), "--teacher", str(tiny_dir),
                "--max-tokens", "256", "--window", "64", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res["domains"]) == ["corpus", "b"] and res["summary"]["geomean_ratio"] == pytest.approx(1.0)
    r = run_cli("eval", str(tiny_dir), "--data", str(other), "--domains", "python-code", "--teacher", str(tiny_dir),
                "--max-tokens", "256", "--window", "64")
    assert r.returncode == 0, r.stderr
    assert "| b |" in r.stdout and "| python-code |" in r.stdout and "| **geometric mean** |" in r.stdout
    r = run_cli("eval", str(tiny_dir), "--domains", "nope", "--max-tokens", "256", "--window", "64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown domain 'nope'" in r.stderr


def test_unknown_domain_refused_at_plan_time(tiny_dir):
    with pytest.raises(UserError, match="evaluation.domains: unknown domain 'wiki'"):
        api.plan(str(tiny_dir), PROFILE, ["evaluation.domains=[answers, wiki]"])
