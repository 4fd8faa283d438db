"""Latency profiling (harness, targets, CLI) and the export/profile passes in a pipeline."""

import csv
import json
from pathlib import Path

import pytest

from compress import api
from compress.errors import UserError
from compress.profiling.harness import ProfileSettings, prompt_ids, summarize
from compress.target import load_target

PROFILE = str(Path(__file__).parent / "profiles" / "export-tiny.yaml")
FAST = ["--prompt-tokens", "8", "--new-tokens", "4", "--runs", "2", "--warmup", "1"]


def test_summarize_numbers():
    raw = {"load_seconds": 1.5, "peak_rss_bytes": 10, "runs": [
        {"prefill": 0.2, "decode": [0.01, 0.01, 0.02, 0.04]},
        {"prefill": 0.1, "decode": [0.01, 0.01, 0.01, 0.01]},
        {"prefill": 0.4, "decode": [0.02, 0.02, 0.02, 0.02]},
    ]}
    s = summarize(raw, ProfileSettings(prompt_tokens=100, new_tokens=5, runs=3))
    assert s["ttft_ms"] == pytest.approx({"median": 200.0, "min": 100.0, "max": 400.0})
    assert s["prefill_tokens_per_second"] == pytest.approx({"median": 500.0, "min": 250.0, "max": 1000.0})
    assert s["decode_tokens_per_second"] == pytest.approx({"median": 50.0, "min": 50.0, "max": 100.0})
    # per-run p50: 15, 10, 20 ms -> median 15; p90: 0.02+0.9*... run 1: 34 ms, run 2: 10, run 3: 20 -> 20
    assert s["token_latency_ms"]["p50"] == pytest.approx(15.0)
    assert s["token_latency_ms"]["p90"] == pytest.approx(20.0)


def test_targets():
    cpu = load_target("cpu:3")
    assert cpu.device == "cpu" and cpu.threads == 3 and cpu.resolved_threads() == 3 and cpu.name == "cpu"
    assert load_target("cpu").threads == 0 and load_target("cpu").resolved_threads() >= 1
    assert load_target("cuda").device == "cuda" and load_target("cuda").precision == "fp16"
    with pytest.raises(UserError, match="unknown target 'tpu'"):
        load_target("tpu")


def test_target_file_is_strict(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("device: cpu\nthreads: 2\nsession_options: {session.intra_op.allow_spinning: '0'}\n")
    t = load_target(str(f))
    assert t.threads == 2 and t.session_options == {"session.intra_op.allow_spinning": "0"}
    f.write_text("device: cpu\nthread: 2\n")
    with pytest.raises(UserError, match="unknown key 'thread'"):
        load_target(str(f))


def test_prompt_has_exact_length(tiny_dir):
    assert len(prompt_ids(tiny_dir, 300)) == 300
    assert prompt_ids(tiny_dir, 10) == prompt_ids(tiny_dir, 300)[:10]


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "onnx"
    return out, api.export(str(tiny_dir), out, quiet=True)


def test_cli_export_json_and_rerun(cli, exported, tiny_dir):
    out, first = exported
    assert first["validation"]["greedy_equal"] and not first["cached"]
    r = cli("export", str(tiny_dir), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["cached"] and again["id"] == first["id"]


def test_cli_export_refusals(cli, exported, tiny_dir, tmp_path):
    out, _ = exported
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("mine")
    r = cli("export", str(tiny_dir), "--out", str(taken))
    assert r.returncode == 2 and r.stderr.startswith("error: --out") and "--force" in r.stderr
    assert (taken / "x.txt").read_text() == "mine"
    r = cli("export", str(out), "--out", str(tmp_path / "again"))
    assert r.returncode == 2 and "pass export_onnx (compress export) cannot take an onnx model" in r.stderr
    assert not (tmp_path / "again").exists()
    r = cli("export", str(tiny_dir), "--out", str(tmp_path / "x"), "--precision", "int3")
    assert r.returncode == 2 and "precision" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_eval_of_export_equals_pytorch(cli, exported, tiny_dir, tiny_text):
    out, _ = exported
    onnx_res = api.evaluate(str(out), str(tiny_text), max_tokens=512, window=64, quiet=True)
    torch_res = api.evaluate(str(tiny_dir), str(tiny_text), max_tokens=512, window=64, quiet=True)
    assert onnx_res["perplexity"] == pytest.approx(torch_res["perplexity"], rel=1e-4)
    assert onnx_res["teacher"] is not None and onnx_res["kl"] < 1e-6 and onnx_res["top1_agreement"] == 1.0


def test_cli_profile_table_json_csv(cli, exported, tiny_dir, tmp_path):
    out, _ = exported
    csv_path = tmp_path / "lat.csv"
    r = cli("profile", str(out), str(tiny_dir), "--target", "cpu:1", *FAST, "--json", "--csv", str(csv_path))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    onnx_row, torch_row = res["results"]
    assert onnx_row["kind"] == "onnx" and torch_row["kind"] == "pytorch" and onnx_row["threads"] == 1
    for row in res["results"]:
        assert row["load_seconds"] > 0 and row["peak_rss_bytes"] > 10e6 and row["disk_bytes"] > 0
        d = row["decode_tokens_per_second"]
        assert 0 < d["min"] <= d["median"] <= d["max"]
        assert row["ttft_ms"]["median"] > 0 and row["token_latency_ms"]["p90"] >= row["token_latency_ms"]["p50"] > 0
        assert row["settings"] == {"prompt_tokens": 8, "new_tokens": 4, "runs": 2, "warmup": 1}
    rows = list(csv.reader(csv_path.open()))
    assert len(rows) == 3 and rows[0][0] == "system" and rows[1][1] == "onnx"
    r = cli("profile", str(out), "--target", "cpu:1", *FAST)
    assert r.returncode == 0 and "decode tok/s" in r.stdout and r.stdout.count("\n") == 3


def test_cli_profile_bad_input(cli, exported, tmp_path):
    out, _ = exported
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = cli("profile", str(out), "--target", "cuda", *FAST)
        assert r.returncode == 2 and r.stderr.startswith("error: target cuda unavailable: ")
        assert r.stderr.count("\n") == 1
    for args, msg in ((["--target", "tpu"], "unknown target"), (["--runs", "0"], "profile_latency.runs: must be at least 1"),
                      ([], "not found")):
        target = [str(tmp_path / "missing")] if msg == "not found" else [str(out)]
        r = cli("profile", *target, *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_pipeline_evaluate_export_profile(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    p = api.plan(str(tiny_dir), PROFILE, data=str(tiny_text), eval_data=str(tiny_text))
    rep = api.run(p, out, quiet=True)
    src, exp, prof = rep["stages"]
    assert exp["format"] == prof["format"] == "onnx" and src["format"] == "hf"
    assert exp["perplexity"] == pytest.approx(src["perplexity"], rel=1e-4)  # the ONNX model itself was evaluated
    assert exp["kl"] < 1e-6 and exp["pass_metrics"]["export"]["validation"]["greedy_equal"]
    assert exp["parameters"] == src["parameters"]
    assert prof["perplexity"] == exp["perplexity"] and prof["eval_seconds"] is None  # same model, not re-run
    systems = [r["kind"] for r in prof["latency"]]
    assert systems == ["onnx", "pytorch"] and prof["latency"][0]["threads"] == 1
    md = (out / "report.md").read_text()
    assert "Latency on target cpu" in md and "decode tok/s" in md and "validated against PyTorch" in md
    again = api.run(p, out, quiet=True)
    assert all(s["cached"] for s in again["stages"])
    assert again["stages"][2]["latency"] == prof["latency"]


def test_pipeline_refuses_onnx_input(exported):
    out, _ = exported
    with pytest.raises(UserError, match="is an ONNX export"):
        api.plan(str(out), PROFILE)


def test_cuda_profile_fails_before_any_work(cli, tiny_dir, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    r = cli("model", str(tiny_dir), "--profile", "gpu-fp16", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.startswith("error: target cuda unavailable: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()
    r = cli("model", str(tiny_dir), "--profile", PROFILE, "--set", "profile_latency.target=tpu", "--dry-run")
    assert r.returncode == 2 and "unknown target 'tpu'" in r.stderr
