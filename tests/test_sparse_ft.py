"""The sparse_ft pass: exact masks through fine-tuning, quantization and export; plan-time refusals;
the pass in-process (methods, N:M, OWL, resume)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from compress import api
from compress.artifact import read_artifact
from compress.masks import check_n_m, read_masks
from compress.passes.sparse_ft.config import SparseFTConfig
from compress.passes.sparse_ft.run import sparse_ft
from conftest import killed_during_training, run_cli
from exporters.onnx.weights import weight_zeros
from test_quantize import _ctx, _teacher, _tiny_parent

TESTS = Path(__file__).parent
SPARSE = str(TESTS / "profiles" / "sparse-tiny.yaml")


def test_pipeline_prunes_exactly_and_the_zeros_reach_the_onnx_weights(tiny_dir, tiny_text, tmp_path):
    p = api.plan(str(tiny_dir), SPARSE, data=str(tiny_text), eval_data=str(tiny_text))
    rep = api.run(p, tmp_path / "run", quiet=True)
    stages = tmp_path / "run" / "stages"
    sparse = stages / "01-sparse_ft"
    sp = read_artifact(sparse).manifest["invariants"]["sparsity"]
    masks = read_masks(sparse)
    assert sp["modules"] == len(masks) == 14 and sp["pattern"] == "unstructured"
    from safetensors.torch import load_file

    src, w = load_file(tiny_dir / "model.safetensors"), load_file(sparse / "model.safetensors")
    trained = 0
    for name, keep in masks.items():
        assert int((~keep).sum()) == round(0.5 * keep.numel()), name  # exact, per tensor
        assert sp["per_module"][name] == int((~keep).sum()) / keep.numel()
        assert torch.all(w[f"{name}.weight"][~keep] == 0), name
        trained += int((w[f"{name}.weight"][keep] != src[f"{name}.weight"][keep]).sum())
    assert trained > 0.9 * sum(int(k.sum()) for k in masks.values())  # SparseGPT updates + fine-tuning moved them
    # embeddings, norms and the head are never pruned
    assert not any(k.startswith(("model.embed", "lm_head")) or "norm" in k for k in masks)
    assert read_artifact(stages / "02-quantize").manifest["invariants"]["sparsity"] == sp  # carried, checked
    rows = [r for r in weight_zeros(stages / "03-export_onnx") if "layers" in r["node"]]
    assert rows and all(r["op"] == "MatMulNBits" for r in rows)
    assert sum(r["weights"] for r in rows) == sum(k.numel() for k in masks.values())
    assert all(r["fraction"] >= 0.5 for r in rows), [(r["node"], r["fraction"]) for r in rows]
    st = {s["name"].split("-", 1)[1]: s for s in rep["stages"]}
    m = st["sparse_ft"]["pass_metrics"]["sparse_ft"]
    # recovered, by a margin (CE pulls the tiny random student towards the text, away from its teacher:
    # 8 steps at 1e-3 take the held-out KL 0.0462 -> 0.0433 on the test text alone)
    assert m["kl_heldout_tuned"] < 0.97 * m["kl_heldout_oneshot"]
    assert "dense" in "\n".join(st["sparse_ft"]["report"])
    # a user's runtime, from text: onnxruntime-genai's tokenizer and loop give our ONNX Runtime's greedy tokens
    from conftest import genai_generate
    from exporters.onnx.runtime import Decoder
    from transformers import AutoTokenizer

    onnx = stages / "03-export_onnx"
    got, _ = genai_generate(onnx, "The quick brown fox", 12)
    prompt = AutoTokenizer.from_pretrained(onnx)("The quick brown fox")["input_ids"]
    assert got == Decoder(onnx).generate(prompt, 12)


@pytest.mark.parametrize("sets, message", [
    (["sparse_ft.sparsity=1.2"], "sparse_ft.sparsity: must be in 0.1..0.9, got 1.2"),
    (["sparse_ft.pattern=3:2"], "sparse_ft.pattern: '3:2': need 0 < N < M"),
    (["sparse_ft.pattern=2:4", "sparse_ft.sparsity=0.6"], "pattern 2:4 prunes 0.5 of the weights"),
    (["sparse_ft.pattern=3:7", "sparse_ft.sparsity=0.5714285714285714"],
     "sparse_ft.pattern: 3:7 needs input sizes that are multiples of 7; the model's hidden_size is 64"),
    (["sparse_ft.pattern=2:4", "sparse_ft.ratios=owl"], "sparse_ft.ratios: owl sets per-layer fractions"),
    (["sparse_ft.method=obs"], "sparse_ft.method"),
])
def test_bad_settings_are_refused_at_plan_time(tiny_dir, tiny_text, tmp_path, sets, message):
    out = tmp_path / "out"
    args = [a for kv in sets for a in ("--set", kv)]
    r = run_cli("model", str(tiny_dir), "--profile", SPARSE, "--data", str(tiny_text), *args, "--out", str(out),
                "--dry-run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()


def test_plan_reads_the_input_sizes_of_the_embedded_gguf_without_torch():
    from compress.sources import resolve_source_ref, source_dims

    assert source_dims(resolve_source_ref(None)) == {"hidden_size": 576, "intermediate_size": 1536,
                                                      "attention_width": 576, "kv_width": 192, "num_layers": 30,
                                                      "num_heads": 9, "num_kv_heads": 3}


# ---------------------------------------------------------------- the pass, in-process

def _cfg(**kw):
    base = dict(method="sparsegpt", sparsity=0.5, calibration_blocks=6, block_size=16, steps=6, lr=1e-3,
                warmup_steps=1, batch_size=2, checkpoint_every=2, heldout_blocks=2)
    base.update(kw)
    return SparseFTConfig.from_dict(base)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_two_four_pattern_per_tensor(tmp_path, method):
    parent = _tiny_parent(tmp_path)
    res = sparse_ft(parent, _cfg(method=method, pattern="2:4", steps=2), _ctx(tmp_path, parent, "s", _teacher(parent)))
    masks = res.sparsity.masks
    assert res.sparsity.pattern == "2:4" and len(masks) == 14
    for name, keep in masks.items():
        check_n_m(keep.numpy(), "2:4", name)
        assert int(keep.sum()) == keep.numel() // 2


def test_sparsegpt_one_shot_beats_magnitude_and_tuning_lowers_kl(tmp_path):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    kl = {}
    for method in ("magnitude", "sparsegpt"):
        m = sparse_ft(parent, _cfg(method=method, sparsity=0.6, steps=8), _ctx(tmp_path, parent, method, teacher))
        kl[method] = m.metrics["sparse_ft"]
    assert kl["sparsegpt"]["kl_heldout_oneshot"] < kl["magnitude"]["kl_heldout_oneshot"]
    for r in kl.values():
        assert r["kl_heldout_tuned"] < r["kl_heldout_oneshot"]
        assert r["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_owl_spreads_the_layers_around_the_target(tmp_path):
    parent = _tiny_parent(tmp_path)
    res = sparse_ft(parent, _cfg(ratios="owl", owl_lambda=0.05, steps=0), _ctx(tmp_path, parent, "o", _teacher(parent)))
    layers = res.metrics["sparse_ft"]["layers"]
    s = [r["sparsity"] for r in layers]
    assert sum(s) / len(s) == pytest.approx(0.5) and max(s) - min(s) == pytest.approx(0.1)
    for r in layers:
        for rel in ("self_attn.q_proj", "mlp.down_proj"):
            keep = res.sparsity.masks[f"model.layers.{r['layer']}.{rel}"]
            assert int((~keep).sum()) == round(r["sparsity"] * keep.numel())


def test_a_sparse_parent_is_refused(tmp_path):
    from compress.errors import UserError

    parent = _tiny_parent(tmp_path, sparsity=0.3)
    with pytest.raises(UserError, match="already sparse"):
        sparse_ft(parent, _cfg(), _ctx(tmp_path, parent, "s", _teacher(parent)))


def test_resumed_sparse_fine_tuning_equals_uninterrupted(tmp_path):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    cfg = _cfg(steps=6, checkpoint_every=2)
    ref_ctx = _ctx(tmp_path, parent, "ref", teacher)
    ref = sparse_ft(parent, cfg, ref_ctx)

    ctx = _ctx(tmp_path, parent, "killed", teacher)
    killed_during_training(lambda: sparse_ft(parent, cfg, ctx), step=5)
    shutil.rmtree(ctx.out_dir)
    ctx.out_dir.mkdir()
    res = sparse_ft(parent, cfg, ctx)
    tr = res.metrics["sparse_ft"]["train"]
    assert tr["resumed_from_step"] == 4 and tr["history"] == ref.metrics["sparse_ft"]["train"]["history"]
    from safetensors.torch import load_file

    a, b = load_file(ref_ctx.out_dir / "model.safetensors"), load_file(ctx.out_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_files_are_the_same_bytes_every_time_and_version_1_still_reads(tmp_path):
    import hashlib
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from compress.masks import _pack, write_masks

    g = torch.Generator().manual_seed(0)
    masks = {f"model.layers.{i}.mlp.{p}": torch.rand(8, 16, generator=g) > 0.5 for i in range(3) for p in ("up", "down")}
    digests = set()
    for i in range(4):  # safetensors writes a metadata map in random order: one key keeps the bytes fixed
        (tmp_path / str(i)).mkdir()
        write_masks(tmp_path / str(i), masks)
        digests.add(hashlib.sha256((tmp_path / str(i) / "masks.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file({n: _pack(m.numpy()) for n, m in masks.items()}, str(v1 / "masks.safetensors"),
              metadata={"format": "compress-masks", "version": "1", "pattern": "unstructured",
                        "shapes": json.dumps({n: list(m.shape) for n, m in masks.items()})})
    back = read_masks(v1)
    assert back.keys() == masks.keys() and all(np.array_equal(back[n].numpy(), masks[n].numpy()) for n in masks)


def test_the_named_profiles_plan_on_the_embedded_model_and_take_overrides():
    p = api.plan(None, "cpu-sparse50-4bit", ["sparse_ft.sparsity=0.6"])
    names = [st.spec.name for st in p.pipeline.stages]
    assert names == ["sparse_ft", "quantize", "export_onnx", "profile_latency"]
    assert p.pipeline.stages[0].config.sparsity == 0.6 and p.formats == ["hf", "hf", "quantized", "onnx", "onnx"]
    s24 = api.plan(None, "sparse24").pipeline.stages[0].config
    assert s24.pattern == "2:4" and s24.n_m() == (2, 4) and s24.train.lr == 1e-4
