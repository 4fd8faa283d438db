"""The pipeline on the tiny model: artifacts, ids, caching, reports, evaluation."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compress import api
from compress.artifact import compute_id, read_artifact, staging_dir
from compress.formats import count_parameters

PROFILE = str(Path(__file__).parent / "profiles" / "distill-tiny.yaml")


def _run(tiny_dir, tiny_text, out, *overrides):
    p = api.plan(str(tiny_dir), PROFILE, list(overrides), data=str(tiny_text), eval_data=str(tiny_text))
    return api.run(p, out, quiet=True)


def test_artifact_id_is_stable_and_sensitive():
    a = compute_id("p", "distill", '{"lr":1}', 1)
    assert a == compute_id("p", "distill", '{"lr":1}', 1)
    assert len({a, compute_id("q", "distill", '{"lr":1}', 1), compute_id("p", "distill", '{"lr":2}', 1),
                compute_id("p", "distill", '{"lr":1}', 2), compute_id("p", "distill", '{"lr":1}', 1, "data=x")}) == 5


def test_staging_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with staging_dir(final) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_run_report_rerun_is_cache_hit(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    rep = _run(tiny_dir, tiny_text, out)
    first = time.perf_counter() - t0
    assert [s["name"] for s in rep["stages"]] == ["00-source", "01-distill"]
    src, dst = rep["stages"]
    assert src["kl"] == 0.0 and src["top1_agreement"] == 1.0
    assert dst["kl"] > 0 and 0 <= dst["top1_agreement"] <= 1
    assert src["parameters"] == dst["parameters"] == count_parameters(tiny_dir)
    assert json.loads((out / "report.json").read_text())["final_stage"]["path"] == "stages/01-distill"
    assert "| 1 | 01-distill |" in (out / "report.md").read_text()
    man = read_artifact(out / "stages" / "01-distill").manifest
    assert man["parent"] == src["id"] and man["teacher"]["id"] == src["id"] and man["pass"] == "distill"
    assert man["config"]["train"]["steps"] == 6 and len(man["metrics"]["train"]["history"]) == 6
    assert not (out / ".work" / dst["id"]).exists()  # checkpoints are removed once the stage is committed

    t0 = time.perf_counter()
    again = _run(tiny_dir, tiny_text, out)
    assert time.perf_counter() - t0 < 0.5 * first
    assert all(s["cached"] for s in again["stages"])
    assert [s["id"] for s in again["stages"]] == [s["id"] for s in rep["stages"]]
    assert again["stages"][1]["perplexity"] == dst["perplexity"]


def test_changed_config_reruns_only_changed_stage(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    rep = _run(tiny_dir, tiny_text, out)
    rep2 = _run(tiny_dir, tiny_text, out, "distill.steps=4")
    assert rep2["stages"][0]["cached"] and not rep2["stages"][1]["cached"]
    assert rep2["stages"][1]["id"] != rep["stages"][1]["id"]
    assert read_artifact(out / "stages" / "01-distill").manifest["config"]["train"]["steps"] == 4


def test_training_data_is_part_of_the_id(tiny_dir, tiny_text, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text()[::-1])
    a = api.plan(str(tiny_dir), PROFILE, data=str(tiny_text), eval_data=str(tiny_text))
    b = api.plan(str(tiny_dir), PROFILE, data=str(other), eval_data=str(tiny_text))
    ra = api.run(a, tmp_path / "a", quiet=True)
    rb = api.run(b, tmp_path / "b", quiet=True)
    assert ra["stages"][1]["id"] != rb["stages"][1]["id"]


def test_run_is_deterministic(tiny_dir, tiny_text, tmp_path):
    a = _run(tiny_dir, tiny_text, tmp_path / "a")
    b = _run(tiny_dir, tiny_text, tmp_path / "b")
    assert a["stages"][1]["perplexity"] == b["stages"][1]["perplexity"]
    from safetensors.torch import load_file

    ta = load_file(tmp_path / "a" / "stages" / "01-distill" / "model.safetensors")
    tb = load_file(tmp_path / "b" / "stages" / "01-distill" / "model.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_distilled_model_reloads_and_keeps_tied_weights(tiny_dir, tiny_text, tmp_path):
    from compress.models import load_model

    _run(tiny_dir, tiny_text, tmp_path / "r")
    m = load_model(tmp_path / "r" / "stages" / "01-distill")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # carried verbatim, never re-serialized
        assert (tmp_path / "r" / "stages" / "01-distill" / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert m.config.head_dim == 16


def test_eval_api_reads_run_folder_and_uses_recorded_teacher(tiny_dir, tiny_text, tmp_path):
    rep = _run(tiny_dir, tiny_text, tmp_path / "r")
    res = api.evaluate(str(tmp_path / "r"), str(tiny_text), max_tokens=512, window=64, quiet=True)
    assert res["perplexity"] == pytest.approx(rep["stages"][1]["perplexity"], rel=1e-9)
    assert res["kl"] == pytest.approx(rep["stages"][1]["kl"], rel=1e-9)
    assert res["teacher"] is not None


def test_example_script_runs(tiny_dir, tiny_text, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "examples" / "evaluate_and_distill.py"
    proc = subprocess.run([sys.executable, str(script), str(tiny_dir), str(tiny_text), str(tmp_path / "ex")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "01-distill" in proc.stdout and (tmp_path / "ex" / "report.json").is_file()


def test_concurrent_run_into_same_folder_is_refused(tiny_dir, tiny_text, tmp_path):
    import fcntl

    from compress.errors import UserError

    out = tmp_path / "run"
    _run(tiny_dir, tiny_text, out)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another compress run"):
            _run(tiny_dir, tiny_text, out)
    assert _run(tiny_dir, tiny_text, out)["stages"][1]["cached"]


def test_report_ends_with_teacher_vs_compressed_table():
    from compress.report import render_markdown, summary_table

    def lat(kind, runtime, decode, prefill):
        return {"kind": kind, "runtime": runtime, "device": "cpu", "threads": 2,
                "decode_tokens_per_second": {"median": decode}, "prefill_tokens_per_second": {"median": prefill}}

    stage = {"parameters": 100, "notes": [], "validation": None, "latency": None}
    report = {
        "profile": "quick-4bit", "model": "m", "training_data": None, "tool_version": "0", "created": "now",
        "total_seconds": 1.0, "evaluation": {"data": "held-out", "max_tokens": 1024, "window": 512},
        "stages": [
            {**stage, "index": 0, "name": "00-source", "pass": "source", "format": "hf", "weight_bytes": 500e6,
             "download_bytes": 400e6, "perplexity": 20.0, "kl": 0.0, "top1_agreement": 1.0},
            {**stage, "index": 1, "name": "01-quantize", "pass": "quantize", "format": "quantized",
             "weight_bytes": 95e6, "perplexity": 24.0, "kl": 0.2, "top1_agreement": 0.8},
            {**stage, "index": 2, "name": "02-export_onnx", "pass": "export_onnx", "format": "onnx",
             "weight_bytes": 100e6, "download_bytes": 80e6, "perplexity": 25.0, "kl": 0.25, "top1_agreement": 0.75},
            {**stage, "index": 3, "name": "03-profile_latency", "pass": "profile_latency", "format": "onnx",
             "changes_model": False,
             "weight_bytes": 100e6, "perplexity": 25.0, "kl": 0.25, "top1_agreement": 0.75,
             "latency": [lat("onnx", "onnxruntime", 190.0, 850.0), lat("pytorch", "pytorch eager", 19.0, 425.0)]},
        ],
    }
    tail = "\n".join(summary_table(report))
    assert "compressed (`02-export_onnx`)" in tail  # the deployed export, not the profiling stage
    assert "| perplexity (held-out) | 20.000 | 25.000 | ×1.250 |" in tail
    assert "geometric mean" not in tail  # no domains recorded: no domain rows
    assert "| weights on disk, MB | 500.0 | 100.0 | ×0.200 |" in tail
    assert "| download (the folder, zstd), MB | 400.0 | 80.0 | ×0.200 |" in tail
    assert "| decode tok/s | 19.0 | 190.0 | ×10.00 |" in tail and "| prefill tok/s | 425.0 | 850.0 | ×2.00 |" in tail
    report["stages"][3]["latency"] = None
    assert render_markdown(report).rstrip().endswith("the compressed model as deployed.")  # printed last, under the prompt
    report["stages"] = report["stages"][:1]  # nothing compressed: no table
    assert "Teacher vs compressed" not in render_markdown(report)


def test_download_bytes_is_the_zstd_size_of_every_file(tmp_path):
    import zstandard

    from compress.formats import download_bytes

    rng = np.random.default_rng(0)
    (tmp_path / "zeros.bin").write_bytes(np.zeros(3 << 20, np.uint8).tobytes())
    (tmp_path / "noise.bin").write_bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    half = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    half[::2] = 0
    (tmp_path / "half.bin").write_bytes(half.tobytes())
    (tmp_path / "sub").mkdir()  # folders are not part of the download
    (tmp_path / "sub" / "x.bin").write_bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
    one_shot = {f.name: len(zstandard.ZstdCompressor(level=3).compress(f.read_bytes()))
                for f in tmp_path.iterdir() if f.is_file()}
    n = download_bytes(tmp_path)
    assert abs(n - sum(one_shot.values())) <= 64  # frame headers only
    assert one_shot["zeros.bin"] < 1000 and one_shot["noise.bin"] > (1 << 20)
    assert 0.55 < one_shot["half.bin"] / (1 << 20) < 0.8  # zeros at every other byte: about half
