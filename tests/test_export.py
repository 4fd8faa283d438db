"""ONNX export on the tiny model: every shape later passes produce, validation, runtimes."""

import json

import numpy as np
import pytest
import torch

from compress.errors import UserError
from exporters.onnx.export import ExportOptions, export_model
from exporters.onnx.runtime import Decoder, RuntimeOptions, StepTimes
from exporters.onnx.validate import ValidationSettings, validate

# shapes that pruning / subnet extraction produce, each exported and validated
VARIANTS = {
    "default": {},
    "hidden_ne_heads_x_head_dim": {"hidden_size": 48},  # 4 heads x 16 = 64 != 48
    "fewer_layers": {"num_hidden_layers": 1},
    "narrow_mlp": {"intermediate_size": 40},
    "fewer_heads": {"num_attention_heads": 2, "num_key_value_heads": 1},  # whole GQA groups removed
    "untied": {"tie_word_embeddings": False},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


def _export(src, out, **opts):
    out.mkdir()
    return export_model(src, out, ExportOptions(**opts))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_shape_variant_exports_and_validates(name, tmp_path):
    from tiny import save_tiny

    src = save_tiny(tmp_path / "src", **VARIANTS[name])
    if name == "biases":  # random biases, so a missing Add would show
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(src)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
        m.save_pretrained(src)
    res = _export(src, tmp_path / "onnx")
    v = res["validation"]
    assert v["greedy_equal"] and v["max_rel_error"] <= 1e-3 and v["prompts"] == 3
    cfg = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]
    hf = json.loads((src / "config.json").read_text())
    assert cfg["decoder"]["num_hidden_layers"] == hf["num_hidden_layers"]
    assert cfg["decoder"]["num_attention_heads"] == hf["num_attention_heads"]
    assert cfg["decoder"]["num_key_value_heads"] == hf["num_key_value_heads"]
    assert cfg["decoder"]["hidden_size"] == hf["hidden_size"] and cfg["decoder"]["head_size"] == 16
    for f in ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "onnx" / f).is_file()


@pytest.fixture(scope="module")
def tiny_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    out.mkdir()
    export_model(tiny_dir, out, ExportOptions())
    return out


def test_logits_match_pytorch_within_tolerance(tiny_dir, tiny_export):
    from compress.models import load_model

    model = load_model(tiny_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    got = Decoder(tiny_export).logits(ids.numpy())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_kv_cache_steps_equal_full_recompute(tiny_export):
    """Every incremental step's logits equal the no-cache logits of the whole sequence."""
    dec = Decoder(tiny_export)
    prompt = [5, 17, 33, 2, 90, 41]
    steps: list[np.ndarray] = []
    tokens = dec.generate(prompt, 12, on_logits=steps.append)
    full = dec.logits(np.array([prompt + tokens]))[0]
    for i, step in enumerate(steps):
        np.testing.assert_allclose(step, full[len(prompt) - 1 + i], rtol=0, atol=1e-4)
    times = StepTimes()
    assert dec.generate(prompt, 12, times=times) == tokens  # deterministic, buffers reset per call
    assert times.prefill_seconds > 0 and len(times.decode_seconds) == 11


def test_tied_embedding_is_stored_once(tiny_export, tiny_dir):
    import onnx

    m = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False)
    big = [t for t in m.graph.initializer if list(t.dims) in ([64, 320], [320, 64])]
    assert len(big) == 1  # the lm_head matrix also feeds the embedding Gather
    names = {t.name for t in m.graph.initializer}
    # rotary tables are computed from inv_freq in the graph, not stored (2 x 512 x 8 numbers here)
    assert "rotary.inv_freq" in names and not names & {"cos_cache", "sin_cache"}
    ops = {n.op_type for n in m.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "QuickGelu"} <= ops


def test_failed_validation_fails_the_export(tiny_dir, tmp_path, monkeypatch):
    from exporters.onnx import specs

    real = specs.LlamaExportSpec.read

    def broken(self, model):
        dw = real(self, model)
        dw.final_norm = dw.final_norm * 1.5  # an exporter bug: the graph computes something else
        return dw

    monkeypatch.setattr(specs.LlamaExportSpec, "read", broken)
    (tmp_path / "onnx").mkdir()
    with pytest.raises(UserError, match="export validation failed: logits differ"):
        export_model(tiny_dir, tmp_path / "onnx", ExportOptions())


def test_validation_reports_greedy_mismatch(tiny_dir, tiny_export):
    from compress.models import load_model, load_tokenizer

    model = load_model(tiny_dir)
    with torch.no_grad():  # a different model: logits and greedy tokens differ
        model.model.norm.weight.mul_(-1)
    with pytest.raises(UserError, match="export validation failed"):
        validate(Decoder(tiny_export), model, load_tokenizer(tiny_dir), ValidationSettings(rtol=1e9))


def test_kl_criterion_replaces_max_relative_error(tiny_dir, tiny_export):
    from compress.models import load_model, load_tokenizer

    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    with torch.no_grad():  # a slightly different model: greedy tokens unchanged, logits off by a few %
        model.model.norm.weight.mul_(1.05)
    with pytest.raises(UserError, match="logits differ"):  # the default criterion: max relative error
        validate(Decoder(tiny_export), model, tok, ValidationSettings(rtol=1e-3))
    v = validate(Decoder(tiny_export), model, tok, ValidationSettings(rtol=1e-3, kl_tol=1e-2))
    assert v["max_rel_error"] > 1e-2 and 0 < v["mean_kl"] < 1e-2 and v["kl_tol"] == 1e-2
    with torch.no_grad():  # far off: the distributions differ, the KL criterion fails too
        model.model.norm.weight.mul_(-1)
    with pytest.raises(UserError, match=r"mean KL .* above the tolerance 0.01"):
        validate(Decoder(tiny_export), model, tok, ValidationSettings(rtol=1e9, kl_tol=1e-2, allow_near_ties=True))


def test_fp16_export_validates(tiny_dir, tmp_path):
    res = _export(tiny_dir, tmp_path / "onnx", precision="fp16")
    v = res["validation"]
    assert v["greedy_equal"] and 1e-6 < v["max_rel_error"] <= 2e-2  # fp16 is not exact, and within tolerance
    assert res["onnx_bytes"] < 0.6 * _export(tiny_dir, tmp_path / "fp32")["onnx_bytes"]


def test_runs_in_onnxruntime_genai(tiny_export):
    from conftest import genai_generate

    prompt = [5, 17, 33, 2, 90, 41]
    assert genai_generate(tiny_export, prompt, 10)[0] == Decoder(tiny_export).generate(prompt, 10)


def test_cuda_provider_missing_is_one_line(tiny_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match=r"^target cuda unavailable: "):
        Decoder(tiny_export, RuntimeOptions(provider="cuda"))


def test_corrupt_export_is_a_user_error(tiny_export, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_export, bad)
    (bad / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        Decoder(bad)
    (bad / "genai_config.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        Decoder(bad)


def test_weight_zeros_reads_external_data_that_another_stage_hard_links(tmp_path):
    """A pipeline's profiling stage hard-links the export's data file; onnx.load refuses such a file
    (a 'hardlink attack'), so the zero count reads the external data itself."""
    import os

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx.weights import weight_zeros

    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) % 7  # 0 at every 7th weight
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layers.0.mlp")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [numpy_helper.from_array(w, "w")])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    os.link(tmp_path / "model.onnx.data", tmp_path / "linked.data")
    [row] = weight_zeros(tmp_path)
    assert row["weights"] == w.size and row["zeros"] == int((w == 0).sum()) == 293
