"""Model families come from one spec (compress.arch): a second family, Qwen2 (biases on q/k/v),
runs quantize -> export -> validation end to end on a tiny random model with no family-specific code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress import api
from compress.arch import arch_for, arch_of, supported_model_types
from compress.errors import UserError
from conftest import run_cli
from tiny import make_tokenizer

PROFILE = str(Path(__file__).parent / "profiles" / "quantize-tiny.yaml")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6,
                      rope_theta=1e6, use_sliding_window=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)  # large biases: an export that dropped them would not validate
    path = tmp_path_factory.mktemp("qwen2") / "model"
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_registry_knows_both_families():
    assert {"llama", "qwen2"} <= set(supported_model_types())
    q = arch_for("qwen2")
    assert q.biases == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and arch_for("llama").biases == ()
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'; supported: llama, qwen2"):
        arch_for("gpt2", "x")


def test_qwen2_quantize_export_validate(qwen2_dir, tiny_text, tmp_path):
    from compress.models import load_model

    model = load_model(qwen2_dir)
    arch = arch_of(model)
    assert arch.name == "qwen2" and len(arch.linear_names(model)) == 14
    assert all(getattr(model.get_submodule(f"{arch.layer_prefix(0)}{rel}"), "bias", None) is not None
               for rel in arch.biases)
    rep = api.run(api.plan(str(qwen2_dir), PROFILE, data=str(tiny_text), eval_data=str(tiny_text)),
                  tmp_path / "run", quiet=True)
    src, q, exp = rep["stages"]
    assert [s["format"] for s in rep["stages"]] == ["hf", "quantized", "onnx"]
    assert q["invariants"]["quantization"]["bits"] == 4 and q["parameters"] == src["parameters"]
    v = exp["pass_metrics"]["export"]["validation"]
    assert v["exact_codes"]["max_rel_error"] < 1e-4 and v["exact_codes"]["greedy_equal"]  # codes (and biases) exact
    assert 0 < v["mean_kl"] < 0.01
    assert abs(exp["perplexity"] / q["perplexity"] - 1) < 0.05 and q["perplexity"] < 1.5 * src["perplexity"]
    genai = json.loads((tmp_path / "run" / exp["path"] / "genai_config.json").read_text())
    assert genai["model"]["type"] == "qwen2"
    import onnx

    graph = onnx.load(str(tmp_path / "run" / exp["path"] / "model.onnx"), load_external_data=False).graph
    assert any(i.name.endswith("qkv_proj.bias") for i in graph.initializer)


def test_qwen2_fp32_export_matches_pytorch(qwen2_dir, tmp_path):
    r = run_cli("export", str(qwen2_dir), "--out", str(tmp_path / "onnx"), "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)["validation"]
    assert v["max_rel_error"] <= 1e-3 and v["greedy_equal"]
