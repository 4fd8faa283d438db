"""The pass platform: formats, plan-time checks, invariants the runner carries and checks,
one path per operation (export / profile share the pipeline's stage ids), the target's threads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from compress import api
from compress.artifact import read_artifact
from compress.config import Config, help_field
from compress.context import PassResult
from compress.errors import UserError
from compress.formats import Format, detect_format, formats, get_format, register_format
from compress.masks import read_masks, write_masks
from compress.registry import register_pass
from conftest import run_cli

TESTS = Path(__file__).parent
DISTILL = str(TESTS / "profiles" / "distill-tiny.yaml")
EXPORT = str(TESTS / "profiles" / "export-tiny.yaml")


# ------------------------------------------------------------------ passes used only here

@dataclass(frozen=True, kw_only=True)
class ProbeConfig(Config):
    SECTION: ClassVar[str] = "test_probe"
    mode: str = help_field("keep", "keep | break_masks | drop_masks | drop_layer | drop_layer_stated")


THREADS_SEEN: list[int] = []


def probe(parent, cfg, ctx) -> PassResult:
    """Writes its parent's model back, damaged as ``mode`` says; records torch's thread count."""
    from compress.models import load_model, save_model
    from compress.tokenizer import copy_tokenizer_files

    THREADS_SEEN.append(torch.get_num_threads())
    model = load_model(parent.path)
    result = PassResult(metrics={"mode": cfg.mode})
    if cfg.mode == "break_masks":
        name, mask = next(iter(read_masks(parent.path).items()))
        with torch.no_grad():
            model.get_submodule(name).weight[~mask] = 1.0
    if cfg.mode == "drop_masks":
        result.drop = ("sparsity",)
    if cfg.mode.startswith("drop_layer"):
        model.model.layers = model.model.layers[:1]
        model.config.num_hidden_layers = 1
        if cfg.mode == "drop_layer_stated":
            result.shape = {**parent.manifest["invariants"]["shape"], "num_layers": 1}
    save_model(model, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)
    return result


PROBE = register_pass("test_probe", config=ProbeConfig, entry="test_platform:probe", summary="test pass",
                      algorithm=1, accepts=("hf",), produces="hf")


def _profile(tmp_path: Path, passes: str, name: str = "p.yaml") -> str:
    path = tmp_path / name
    path.write_text("description: t\ntarget: {name: cpu, threads: 1}\ndata: {seq_len: 32}\n"
                    f"evaluation: {{max_tokens: 256, window: 64}}\npasses: {passes}\n")
    return str(path)


def _sparse_source(tiny_dir: Path, tmp_path: Path, fraction: float = 0.5) -> tuple[Path, dict]:
    """A sparse artifact made by hand: zeros in every decoder Linear, masks and manifest as a pruning pass writes them."""
    from compress.models import load_model, save_model
    from compress.tokenizer import copy_tokenizer_files

    model = load_model(tiny_dir)
    g = torch.Generator().manual_seed(7)
    masks = {}
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in n:
                masks[n] = torch.rand(m.weight.shape, generator=g) >= fraction
                m.weight.mul_(masks[n])
    src = tmp_path / "sparse"
    save_model(model, src)
    copy_tokenizer_files(tiny_dir, src)
    inv = write_masks(src, masks)
    (src / "manifest.json").write_text(json.dumps({"id": "sparse-source-0001", "pass": "handmade", "parent": None,
                                                   "config": {}, "format": "hf", "invariants": {"sparsity": inv}}))
    return src, masks


# ------------------------------------------------------------------------------ formats

def test_format_registry_detects_counts_and_takes_new_formats(tiny_dir, tmp_path):
    assert detect_format(tiny_dir) == "hf" and detect_format(tmp_path) is None
    assert [f.name for f in formats()][:4] == ["onnx", "supernet", "quantized", "hf"]  # most specific marker first
    assert get_format("hf").count(tiny_dir) == sum(p.numel() for p in
                                                   __import__("compress.models").models.load_model(tiny_dir)
                                                   .parameters())
    with pytest.raises(UserError, match="unknown model format 'nope'"):
        get_format("nope")
    fmt = register_format(Format("test_supernet", "a folder with a subnet table", priority=15,
                                 detect=lambda p: (p / "subnets.json").is_file() and (p / "config.json").is_file(),
                                 loader="compress.models:load_hf_model", count=get_format("hf").count,
                                 weight_bytes=get_format("hf").weight_bytes))
    folder = tmp_path / "super"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "subnets.json").write_text("{}")
    assert detect_format(folder) == "test_supernet" and fmt.load(folder) is not None
    with pytest.raises(ValueError, match="already registered"):
        register_format(fmt)


# ------------------------------------------------------------------------- plan checks

@pytest.mark.parametrize("passes, message", [
    ("[quantize, quantize]", "pass quantize (stage 2) cannot take a quantized model (made by stage 1 quantize); "
                             "it accepts: hf"),
    ("[export_onnx, distill]", "pass distill (stage 2) cannot take an onnx model (made by stage 1 export_onnx); "
                               "it accepts: hf"),
    ("[quantize, distill]", "pass distill (stage 2) cannot take a quantized model"),
    ("[export_onnx, export_onnx]", "pass export_onnx (stage 2) cannot take an onnx model"),
])
def test_impossible_orders_are_refused_at_plan_time(tiny_dir, tiny_text, tmp_path, passes, message):
    prof = _profile(tmp_path, passes)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.plan(str(tiny_dir), prof)
    out = tmp_path / "out"
    r = run_cli("model", str(tiny_dir), "--profile", prof, "--data", str(tiny_text), "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not out.exists()  # nothing converted, written or evaluated


def test_plan_records_the_format_chain(tiny_dir):
    p = api.plan(str(tiny_dir), str(TESTS / "profiles" / "quantize-tiny.yaml"))
    assert p.formats == ["hf", "quantized", "onnx"] and p.to_dict()["formats"] == p.formats


# ------------------------------------------------------------------------- invariants

def test_sparse_parent_stays_exactly_sparse_through_distill(tiny_dir, tiny_text, tmp_path):
    src, masks = _sparse_source(tiny_dir, tmp_path)
    p = api.plan(str(src), DISTILL, data=str(tiny_text), eval_data=str(tiny_text))
    rep = api.run(p, tmp_path / "run", quiet=True)
    stage = tmp_path / "run" / "stages" / "01-distill"
    man = read_artifact(stage).manifest
    sp = man["invariants"]["sparsity"]
    assert sp["pattern"] == "unstructured" and sp["modules"] == len(masks) == 14
    assert 0.48 < sp["fraction"] < 0.52 and rep["stages"][1]["invariants"]["sparsity"] == sp
    kept = read_masks(stage)
    assert kept.keys() == masks.keys() and all(torch.equal(kept[n], masks[n]) for n in masks)
    from safetensors.torch import load_file

    before, after = load_file(src / "model.safetensors"), load_file(stage / "model.safetensors")
    changed = 0
    for name, mask in masks.items():
        w = after[f"{name}.weight"]
        assert torch.all(w[~mask] == 0), name  # exactly zero, not small
        changed += int((w[mask] != before[f"{name}.weight"][mask]).sum())
    assert changed > 0.9 * sum(int(m.sum()) for m in masks.values())  # the kept weights did train
    assert man["invariants"]["shape"]["num_layers"] == 2


def test_runner_refuses_a_pass_that_breaks_or_hides_an_invariant(tiny_dir, tiny_text, tmp_path):
    src, _ = _sparse_source(tiny_dir, tmp_path)
    for mode, message in (("break_masks", "keeps the sparsity invariant but"),
                          ("drop_layer", "changed the model's num_layers without stating it")):
        prof = _profile(tmp_path, f"[{{name: test_probe, config: {{mode: {mode}}}}}]", f"{mode}.yaml")
        with pytest.raises(RuntimeError, match=message):
            api.run(api.plan(str(src), prof, eval_data=str(tiny_text)), tmp_path / mode, quiet=True)
        assert not (tmp_path / mode / "stages" / "01-test_probe").exists()
        assert not [p for p in (tmp_path / mode / "stages").iterdir() if p.name.startswith(".")]  # no half-written stage
    # stated changes and dropped invariants are fine, and the manifest says what holds
    prof = _profile(tmp_path, "[{name: test_probe, config: {mode: drop_masks}}]", "drop.yaml")
    api.run(api.plan(str(src), prof, eval_data=str(tiny_text)), tmp_path / "drop", quiet=True)
    stage = tmp_path / "drop" / "stages" / "01-test_probe"
    assert "sparsity" not in read_artifact(stage).manifest["invariants"] and not (stage / "masks.safetensors").exists()
    prof = _profile(tmp_path, "[{name: test_probe, config: {mode: drop_layer_stated}}]", "stated.yaml")
    api.run(api.plan(str(tiny_dir), prof, eval_data=str(tiny_text)), tmp_path / "stated", quiet=True)
    man = read_artifact(tmp_path / "stated" / "stages" / "01-test_probe").manifest
    assert man["invariants"]["shape"]["num_layers"] == 1


def test_target_threads_hold_during_a_pass_and_do_not_leak(tiny_dir, tiny_text, tmp_path):
    before = torch.get_num_threads()
    THREADS_SEEN.clear()
    prof = _profile(tmp_path, "[test_probe]")
    api.run(api.plan(str(tiny_dir), prof, ["target.threads=3"], eval_data=str(tiny_text)), tmp_path / "r", quiet=True)
    assert THREADS_SEEN == [3] and torch.get_num_threads() == before


# --------------------------------------------------------------------- one path per operation

def test_export_command_and_pipeline_share_the_stage(tiny_dir, tiny_text, tmp_path):
    rep = api.run(api.plan(str(tiny_dir), EXPORT, data=str(tiny_text), eval_data=str(tiny_text)),
                  tmp_path / "run", quiet=True)
    stage = rep["stages"][1]
    cfg = read_artifact(tmp_path / "run" / stage["path"]).manifest["config"]
    res = api.export(str(tiny_dir), tmp_path / "exp", greedy_tokens=cfg["greedy_tokens"], quiet=True)
    assert res["id"] == stage["id"] and not res["cached"]
    a, b = read_artifact(tmp_path / "exp").manifest, read_artifact(tmp_path / "run" / stage["path"]).manifest
    assert a["pass_version"] == b["pass_version"] and a["invariants"] == b["invariants"] and a["report"]
    # the export of the pipeline's own source stage is that very stage again
    again = api.export(str(tmp_path / "run" / "stages" / "00-source"), tmp_path / "exp2",
                       greedy_tokens=cfg["greedy_tokens"], quiet=True)
    assert again["id"] == stage["id"]
    prof = api.profile([str(tmp_path / "exp")], target="cpu:1", prompt_tokens=8, new_tokens=2, runs=1, warmup=0,
                       quiet=True)
    assert prof["results"][0]["stage_id"] and prof["results"][0]["system"] == str(tmp_path / "exp")
