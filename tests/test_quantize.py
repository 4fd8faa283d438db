"""Low-bit quantization: packing, initializers, the pass, masks, recovery, resume, MatMulNBits export."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.artifact import Artifact
from compress.context import PassContext
from compress.masks import write_masks
from compress.runner import parent_masks_of
from compress.ops import quant as Q
from compress.ops.losses import forward_kl
from compress.passes.quantize.config import QuantizeConfig
from compress.passes.quantize.run import quantize
from compress.quantized import LinearQuant, QuantLinear, int8_blockwise, load_quantized, quant_modules
from conftest import killed_during_training, run_cli
from tiny import CORPUS, make_model, make_tokenizer

PROFILE = Path(__file__).parent / "profiles" / "quantize-tiny.yaml"


# ---------------------------------------------------------------- tensor math

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,group", [(64, 16), (72, 32), (576, 128)])  # 72/32 and 576/128: partial last block
def test_pack_unpack_round_trip(bits, k, group):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(0, 2 ** bits, (5, k), generator=g, dtype=torch.uint8)
    packed = Q.pack_codes(q, bits, group)
    cb = Q.container_bits(bits)
    assert packed.shape == (5, -(-k // group), group * cb // 8) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_codes(packed, bits, k), q)
    kb = -(-k // group)
    z = torch.randint(0, 2 ** bits, (5, kb), generator=g).float()
    zp = Q.pack_zero_points(z, bits)
    assert zp.shape == (5, -(-kb * cb // 8))
    assert torch.equal(Q.unpack_zero_points(zp, bits, kb).float(), z)


def test_low_bits_first():
    q = torch.tensor([[1, 2] + [0] * 14], dtype=torch.uint8)
    assert Q.pack_codes(q, 4, 16)[0, 0, 0] == 0x21
    assert Q.pack_codes(torch.tensor([[1, 2, 3, 0] + [0] * 12], dtype=torch.uint8), 2, 16)[0, 0, 0] == 0b00111001


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_zero_exact(bits, sym):
    w = torch.randn(16, 72) * 3
    w[0] = w[0].abs() + 1  # all-positive groups (32..71 of row 0): the range still includes 0
    w[:, 7] = 0.0
    s, z = Q.minmax_params(w, bits, 32, sym)
    q = Q.quantize(w, s, z, bits, 32)
    assert int(q.max()) <= 2 ** bits - 1
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2 ** bits - 1
    if sym:
        assert torch.all(z == 2 ** (bits - 1))
    deq = Q.dequantize(q, s, z, 32)
    assert torch.all(deq[:, 7] == 0)  # integer zero points represent 0 exactly


def test_more_bits_less_error_and_partial_group_uses_own_range():
    w = torch.randn(32, 72)
    errs = {}
    for bits in (2, 3, 4, 8):
        s, z = Q.minmax_params(w, bits, 32, False)
        errs[bits] = float((Q.dequantize(Q.quantize(w, s, z, bits, 32), s, z, 32) - w).pow(2).mean())
    assert errs[8] < errs[4] / 100 < errs[3] / 100 < errs[2] / 100
    # the last block (8 columns) gets its own range: scaling those columns up changes only its scale
    w2 = w.clone()
    w2[:, 64:] *= 10
    s1, _ = Q.minmax_params(w, 4, 32, False)
    s2, _ = Q.minmax_params(w2, 4, 32, False)
    assert torch.equal(s1[:, :2], s2[:, :2]) and torch.all(s2[:, 2] > 5 * s1[:, 2])


def _hessian(k, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.3 + torch.eye(k))  # correlated
    return 2 * x.T @ x / n


def _out_err(w, deq, h):
    d = w - deq
    return float(torch.einsum("nk,kj,nj->", d, h, d))


def test_gptq_and_clip_search_beat_rtn_on_layer_output_error():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    h = _hessian(128)
    q = LinearQuant(3, 32, False)
    s, z = Q.minmax_params(w, 3, 32, False)
    rtn = _out_err(w, Q.dequantize(Q.quantize(w, s, z, 3, 32), s, z, 32), h)
    codes, s_g, z_g = Q.gptq(w, h, 3, 32, False)
    gptq = _out_err(w, Q.dequantize(codes, s_g, z_g, 32), h)
    codes, s_c, z_c = Q.clip_search(w, h, q.bits, q.group, q.sym, 6, 0.5)
    clip = _out_err(w, Q.dequantize(codes, s_c, z_c, 32), h)
    assert gptq < 0.8 * rtn
    codes, s_m, z_m = Q.gptq(w, h, 3, 32, False, shrinks=[1.0, 0.9, 0.8, 0.7])  # MSE-clipped GPTQ
    assert _out_err(w, Q.dequantize(codes, s_m, z_m, 32), h) < 0.8 * rtn
    assert clip < rtn  # the grid includes "no shrink", so never worse per group
    assert int(codes.max()) <= 7


def test_gptq_keeps_masked_weights_at_zero():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    mask = torch.rand(16, 64) > 0.5
    w = w * mask
    codes, s, z = Q.gptq(w, _hessian(64), 4, 16, False, mask=mask)
    deq = Q.dequantize(codes, s, z, 16)
    assert torch.all(deq[~mask] == 0)


# ---------------------------------------------------------------- MatMulNBits semantics

def _matmul_nbits(a, codes, s, z, bits, group, acc, sym=False):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, k = codes.shape
    cb = Q.container_bits(bits)
    inits = [numpy_helper.from_array(Q.pack_codes(codes, bits, group).numpy(), "B"),
             numpy_helper.from_array(s.numpy().reshape(-1).astype(np.float32), "S")]
    inputs = ["A", "B", "S"]
    if not (sym and cb == bits):
        inits.append(numpy_helper.from_array(Q.pack_zero_points(z, bits).numpy().reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=cb,
                            block_size=group, accuracy_level=acc)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"A": a.numpy()})[0])


@pytest.mark.parametrize("bits,group,sym", [(2, 16, False), (3, 32, False), (4, 32, True), (4, 128, False),
                                            (8, 64, False)])
def test_matmul_nbits_computes_our_dequantized_weights(bits, group, sym):
    torch.manual_seed(bits)
    k = 96 if group <= 32 else 200  # partial last block in every case but one
    w = torch.randn(40, k) * 0.1
    s, z = Q.minmax_params(w, bits, group, sym)
    codes = Q.quantize(w, s, z, bits, group)
    deq = Q.dequantize(codes, s, z, group)
    a = torch.randn(3, k)
    a[:, 3] *= 20  # an outlier channel, as real activations have
    ref = a @ deq.T
    y0 = _matmul_nbits(a, codes, s, z, bits, group, 0, sym)
    assert float((y0 - ref).abs().max() / ref.abs().max()) < 1e-5
    if bits in (4, 8):  # accuracy_level 4: activations rounded to int8 per K block (symmetric)
        y4 = _matmul_nbits(a, codes, s, z, bits, group, 4, sym)
        ref4 = int8_blockwise(a, group) @ deq.T
        assert float((y4 - ref4).abs().max() / ref4.abs().max()) < 1e-5
        assert float((y4 - ref).abs().max() / ref.abs().max()) > 1e-4  # it really does round


# ---------------------------------------------------------------- the pass, in-process

def _tiny_parent(tmp_path: Path, sparsity: float = 0.0) -> Artifact:
    model = make_model(320, seed=0)
    tok = make_tokenizer()
    manifest = {"id": "parent", "format": "hf", "invariants": {}}
    path = tmp_path / "parent"
    path.mkdir(parents=True)
    if sparsity:
        masks = {}
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and ".layers." in n:
                    masks[n] = torch.rand(m.weight.shape, generator=g) >= sparsity
                    m.weight.mul_(masks[n])
        manifest["invariants"]["sparsity"] = write_masks(path, masks)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return Artifact(path, manifest)


def _blocks(tok, n=12, t=32):
    ids = tok(CORPUS)["input_ids"]
    return torch.tensor(ids[: n * t]).reshape(n, t)


def _ctx(tmp_path: Path, parent: Artifact, name: str, teacher) -> PassContext:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(make_tokenizer())
    return PassContext(artifact_id=name, out_dir=out, work_dir=tmp_path / f"{name}-work", teacher_path=parent.path,
                       load_teacher=lambda: teacher, training_blocks=lambda: blocks, progress=None, log=lambda m: None,
                       parent_masks=parent_masks_of(parent))


def _cfg(**kw):
    base = dict(bits=4, group_size=32, init="gptq", calibration_blocks=6, block_ap="off", steps=6, lr=1e-3,
                weight_lr=1e-4, warmup_steps=1, batch_size=2, checkpoint_every=2, heldout_blocks=2,
                embeddings="8")
    base.update(kw)
    return QuantizeConfig.from_dict(base)


def _teacher(parent):
    from compress.models import load_model

    return load_model(parent.path)


def test_masks_survive_init_block_ap_recovery_save_and_export(tmp_path):
    parent = _tiny_parent(tmp_path, sparsity=0.5)
    teacher = _teacher(parent)
    cfg = _cfg(bits=3, block_ap="on", block_ap_steps=3, recovery="ste")
    ctx = _ctx(tmp_path, parent, "q", teacher)
    quantize(parent, cfg, ctx)
    shutil.copy(parent.path / "masks.safetensors", ctx.out_dir)  # the runner carries the masks (kept invariant)
    model = load_quantized(ctx.out_dir)
    mods = quant_modules(model)
    assert len(mods) == 2 * 7 + 1
    for name in parent.manifest["invariants"]["sparsity"]["per_module"]:
        pruned = teacher.get_submodule(name).weight == 0
        w = mods[name].weight
        assert 0.45 < float(pruned.float().mean()) < 0.55
        assert torch.all(w[pruned] == 0), name
        assert int(mods[name].codes.max()) <= 7
    # the export carries the same zeros: its logits match the fake-quant model at level 0
    from exporters.onnx.export import ExportOptions, export_model

    out = tmp_path / "onnx"
    out.mkdir()
    res = export_model(ctx.out_dir, out, ExportOptions(greedy_tokens=8))
    assert res["validation"]["exact_codes"]["max_rel_error"] < 1e-4


@pytest.mark.parametrize("bits", ["4", "8"])
def test_tied_head_codes_scales_and_zero_points_stored_once(tmp_path, bits):
    import onnx

    from exporters.onnx.export import ExportOptions, export_model

    parent = _tiny_parent(tmp_path)
    ctx = _ctx(tmp_path, parent, "q", _teacher(parent))
    quantize(parent, _cfg(init="rtn", recovery="none", steps=0, embeddings=bits, embed_group_size=16), ctx)
    out = tmp_path / "onnx"
    out.mkdir()
    res = export_model(ctx.out_dir, out, ExportOptions(greedy_tokens=8))
    assert res["validation"]["exact_codes"]["max_rel_error"] < 1e-4 and res["validation"]["exact_codes"]["greedy_equal"]
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    names = [t.name for t in m.graph.initializer]
    assert not [n for n in names if n.startswith("embed_tokens")]
    head = {n: t for t in m.graph.initializer if (n := t.name).startswith("lm_head")}
    assert sorted(head) == ["lm_head.qweight", "lm_head.qzeros", "lm_head.scales_fp16"]  # fp16-valued scales: half the bytes
    kb = 64 // 16
    assert int(np.prod(head["lm_head.scales_fp16"].dims)) == 320 * kb and head["lm_head.scales_fp16"].data_type == 10
    assert int(np.prod(head["lm_head.qweight"].dims)) == 320 * 64 * int(bits) // 8
    made_by = {o: n for n in m.graph.node for o in n.output}
    (gather,) = [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]
    views = [made_by[i].input[0] for k, i in enumerate(gather.input) if k != 1]
    assert views[0] == "lm_head.qweight" and views[2] == "lm_head.qzeros"  # the embedding reads the head's tensors
    assert made_by[views[1]].op_type == "Cast" and made_by[views[1]].input == ["lm_head.scales_fp16"]


@pytest.mark.parametrize("bf16", ["off", "on"])
def test_block_ap_lowers_layer_error_and_never_keeps_a_worse_layer(tmp_path, bf16):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    cfg = _cfg(bits=2, group_size=32, init="rtn", block_ap="on", block_ap_steps=12, block_ap_lr=1e-3,
               block_ap_weight_lr=1e-3, recovery="none", embeddings="keep", block_ap_bf16=bf16)
    ctx = _ctx(tmp_path, parent, "ap", teacher)
    metrics = quantize(parent, cfg, ctx).metrics["quantize"]
    assert metrics["block_ap_bf16"] is (bf16 == "on")
    layers = metrics["layers"]
    recs = [r["block_ap"] for r in layers]
    assert len(recs) == len(teacher.model.layers)
    for r in recs:
        if r["kept"] == "trained":
            assert r["mse_calib_after"] < r["mse_calib_before"]
        else:  # rolled back to the initialization: the saved layer is the initial one
            assert r["kept"] == "initialization" and r["mse_calib_after"] >= r["mse_calib_before"]
    assert any(r["kept"] == "trained" and r["mse_calib_after"] < 0.9 * r["mse_calib_before"] for r in recs), recs


def test_recovery_lowers_kl_on_a_fixed_batch(tmp_path):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    ids = _blocks(make_tokenizer())[:2]
    kls = {}
    for steps in (0, 12):
        cfg = _cfg(bits=2, group_size=32, init="rtn", recovery="ste" if steps else "none", steps=max(steps, 1),
                   heldout_blocks=0, lr=3e-3, weight_lr=3e-3, embeddings="keep")
        ctx = _ctx(tmp_path, parent, f"r{steps}", teacher)
        ctx.training_blocks = lambda ids=ids: ids.repeat(4, 1)  # train on the batch it is scored on
        quantize(parent, cfg, ctx)
        with torch.no_grad():
            kls[steps] = float(forward_kl(load_quantized(ctx.out_dir)(input_ids=ids).logits,
                                          teacher(input_ids=ids).logits, None))
    assert kls[12] < 0.7 * kls[0], kls


@pytest.mark.parametrize("mode", ["ste", "pv"])
def test_resumed_recovery_equals_uninterrupted(tmp_path, mode):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    cfg = _cfg(recovery=mode, steps=6, checkpoint_every=2, pv_max_change=0.05)
    ref_ctx = _ctx(tmp_path, parent, "ref", teacher)
    ref = quantize(parent, cfg, ref_ctx)

    ctx = _ctx(tmp_path, parent, "killed", teacher)
    killed_during_training(lambda: quantize(parent, cfg, ctx), step=5)
    shutil.rmtree(ctx.out_dir)
    ctx.out_dir.mkdir()
    res = quantize(parent, cfg, ctx)
    tr = res.metrics["quantize"]["recovery"]["train"]
    assert tr["resumed_from_step"] == 4
    assert tr["history"] == ref.metrics["quantize"]["recovery"]["train"]["history"]
    if mode == "pv":
        assert tr["codes_changed"] >= 0
    a, b = load_quantized(ref_ctx.out_dir), load_quantized(ctx.out_dir)
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


def test_keeps_initialization_when_recovery_hurts(tmp_path):
    parent = _tiny_parent(tmp_path)
    teacher = _teacher(parent)
    cfg = _cfg(recovery="ste", steps=3, lr=0.5, weight_lr=0.5, heldout_blocks=3)  # absurd lr: recovery must lose
    res = quantize(parent, cfg, _ctx(tmp_path, parent, "bad", teacher)).metrics["quantize"]["recovery"]
    assert res["kl_heldout_recovered"] > res["kl_heldout_init"]
    assert res["kept"] == "initialization"


def test_group_falls_to_a_divisor_of_the_input_size():
    cfg = QuantizeConfig.from_dict({"group_size": 128})
    assert [cfg.group_for(k) for k in (576, 1536, 64, 48, 100)] == [64, 128, 64, 16, 128]  # 100: padded
    parent_plan = QuantizeConfig.from_dict({"group_size": 32})
    assert parent_plan.group_for(576) == 32


def test_bad_configs_rejected():
    from compress.errors import UserError

    for bad in ({"bits": 5}, {"group_size": 48}, {"group_size": 512}, {"bits_overrides": {"(": 4}},
                {"bits_overrides": {"down_proj": 6}}, {"pv_max_change": 0}, {"embeddings": "16"}):
        with pytest.raises(UserError):
            QuantizeConfig.from_dict(bad)


def test_mismatched_pack_overrides_refused(tmp_path):
    from compress.errors import UserError

    parent = _tiny_parent(tmp_path)
    cfg = _cfg(bits_overrides={r"layers\.0\.self_attn\.k_proj": 8})
    with pytest.raises(UserError, match="packed"):
        quantize(parent, cfg, _ctx(tmp_path, parent, "x", _teacher(parent)))


def test_quant_linear_modes_agree_at_start():
    lin = torch.nn.Linear(72, 8)
    q = LinearQuant(4, 32, False)
    s, z = Q.minmax_params(lin.weight, 4, 32, False)
    m = QuantLinear.from_linear(lin, q, Q.quantize(lin.weight, s, z, 4, 32), s, z)
    x = torch.randn(2, 72)
    with torch.no_grad():
        ref = m(x)
    for mode in ("ste", "pv"):
        m.start(mode)
        assert torch.allclose(m(x), ref, atol=1e-6)
        m.freeze()
        assert torch.allclose(m(x), ref, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_latent_starts_inside_its_cell_towards_the_reference(masked):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    q = LinearQuant(4, 32, False)
    w = lin.weight.detach().clone()
    mask = torch.rand(16, 64) > 0.5 if masked else None
    s, z = Q.minmax_params(w, 4, 32, False)
    codes = Q.quantize(w, s, z, 4, 32)
    codes = torch.where(torch.rand(16, 64) < 0.2, (codes.int() + 1).clamp(max=15).to(torch.uint8), codes)  # GPTQ-like moves
    m = QuantLinear.from_linear(lin, q, codes, s, z, mask)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before, w_q = m(x), m.weight.clone()
    codes_before = m.codes.clone()
    m.start("ste", w)
    step = Q.expand(m.scale.detach(), 32, 64)
    off = (m.latent.detach() - Q.dequantize(m.codes, m.scale, m.zero, 32)) / step
    assert off.abs().max() <= 0.49 + 1e-5 and off.abs().max() > 0.45  # moved, never past the cell
    if masked:
        assert (off[~mask] == 0).all()
    keep = mask if masked else torch.ones_like(off, dtype=torch.bool)
    # the latent is nearer the fp weight than the grid point, wherever they differ
    near = (m.latent.detach() - w).abs() <= (w_q - w).abs() + 1e-7
    assert near[keep].all()
    assert (m.latent.detach() - w)[keep].abs().sum() < 0.8 * (w_q - w)[keep].abs().sum()
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-6)  # the same forward: the same codes
    m.freeze()
    assert torch.equal(m.codes, codes_before)  # frozen untrained: the latent rounds back to its codes
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        m.start("ste", w[:, :32])


# ---------------------------------------------------------------- CLI pipeline

def test_cli_quantize_export_pipeline(tiny_dir, tiny_text, tmp_path):
    from compress.tokenizer import TOKENIZER_FILES

    out = tmp_path / "run"
    r = run_cli("model", str(tiny_dir), "--profile", str(PROFILE), "--data", str(tiny_text), "--out", str(out),
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    st = {s["name"]: s for s in rep["stages"]}
    q = st["01-quantize"]
    assert q["parameters"] == st["00-source"]["parameters"]  # counted in weights, not packed bytes
    assert q["weight_bytes"] < 0.45 * st["00-source"]["weight_bytes"]
    assert q["perplexity"] < 1.5 * st["00-source"]["perplexity"]
    onnx = st["02-export_onnx"]
    v = onnx["pass_metrics"]["export"]["validation"]
    assert v["exact_codes"]["max_rel_error"] < 1e-4 and v["exact_codes"]["greedy_equal"]
    assert v["accuracy_level"] == 4 and v["max_rel_error"] < 0.15
    assert v["kl_tol"] == 0.1 and 0 < v["mean_kl"] < 0.01  # judged by distributions at level 4
    # the deployed ONNX is evaluated too, close to the fake-quant model
    assert abs(onnx["perplexity"] / q["perplexity"] - 1) < 0.05
    qc = json.loads((out / "stages" / "01-quantize" / "quantization.json").read_text())
    assert qc["bits"] == 4 and qc["tied_head_quantized"] and len(qc["layers"]) == 15
    # every stage and the export carry the source's tokenizer byte for byte (never re-serialized)
    for stage in ("01-quantize", "02-export_onnx"):
        for name in TOKENIZER_FILES:
            if (tiny_dir / name).is_file():  # (transformers 5 writes no special_tokens_map.json)
                assert (out / "stages" / stage / name).read_bytes() == (tiny_dir / name).read_bytes(), (stage, name)
    # a rerun reuses every stage
    r2 = run_cli("model", str(tiny_dir), "--profile", str(PROFILE), "--data", str(tiny_text), "--out", str(out),
                 "--json", "--quiet")
    assert r2.returncode == 0 and all(s["cached"] for s in json.loads(r2.stdout)["stages"])


def test_cli_rejects_requantizing(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    r = run_cli("model", str(tiny_dir), "--profile", str(PROFILE), "--data", str(tiny_text), "--out", str(out),
                "--quiet", "--set", "quantize.steps=1")
    assert r.returncode == 0, r.stderr[-1000:]
    r = run_cli("model", str(out / "stages" / "01-quantize"), "--profile", str(PROFILE), "--data", str(tiny_text),
                "--out", str(tmp_path / "again"), "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "pass quantize (stage 1) cannot take a quantized model (made by the source); it accepts: hf" in r.stderr
    assert not (tmp_path / "again").exists()  # refused at plan time: nothing written, nothing evaluated
