"""Every script in examples/ runs, on the tiny model, as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROFILES = Path(__file__).resolve().parent / "profiles"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_compress_from_the_python_api(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "run"
    p = _run(str(EXAMPLES / "compress_cpu_4bit.py"), str(tiny_dir), "--profile", str(PROFILES / "quantize-tiny.yaml"),
             "--out", str(out), "--data", str(tiny_text), "--eval-data", str(tiny_text))
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    last = report["stages"][-1]
    assert f"deployable model: {out}/{last['path']}" in p.stdout
    assert f"perplexity {last['perplexity']:8.3f}" in p.stdout


def test_export_for_a_device_and_run_it_from_text(tiny_dir, tmp_path):
    out = tmp_path / "onnx"
    p = _run(str(EXAMPLES / "export_and_run.py"), str(tiny_dir), str(out), "quick brown")
    assert p.returncode == 0, p.stderr
    assert "validated" in p.stdout and (out / "genai_config.json").is_file()
    runtime = "onnxruntime-genai" if "onnxruntime-genai" in p.stdout else "onnxruntime:"
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith(runtime))
    assert "'quick brown' ->" in line and len(line.split("->", 1)[1].strip()) > 2  # generated text, not empty


def test_build_step_gates_on_the_json_report_and_passes_exit_codes_through(tiny_dir, tiny_text, tmp_path):
    script = str(EXAMPLES / "build_step.py")
    prof = str(PROFILES / "quantize-tiny.yaml")
    common = ["--profile", prof, "--data", str(tiny_text), "--eval-data", str(tiny_text)]
    ok = _run(script, str(tiny_dir), str(tmp_path / "a"), *common, "--max-ratio", "100")
    assert ok.returncode == 0, ok.stderr
    ratio = float(ok.stdout.split("perplexity x")[1].split()[0])
    strict = _run(script, str(tiny_dir), str(tmp_path / "a"), *common, "--max-ratio", str(ratio * 0.5))
    assert strict.returncode == 3  # the same (cached) run, gated tighter: the build fails
    bad = _run(script, str(tiny_dir), str(tmp_path / "b"), "--profile", "no-such-profile")
    assert bad.returncode == 2 and "bad input" in bad.stderr and "no-such-profile" in bad.stderr
