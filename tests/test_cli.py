"""The command line: every bad input ends with exit 2, one line, no traceback, no output folder."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

PROFILE = str(Path(__file__).parent / "profiles" / "distill-tiny.yaml")


def _assert_bad_input(proc, *, contains=""):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert contains.lower() in lines[0].lower(), lines[0]
    assert proc.stdout == ""


def test_import_cli_does_not_import_torch():
    code = "import sys, compress.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("model", "eval", "profiles", "passes"):
        assert word in proc.stdout


def test_passes_and_profiles_json():
    passes = json.loads(run_cli("passes", "list", "--json").stdout)
    distill = next(p for p in passes if p["name"] == "distill")
    assert distill["config"]["train.steps"]["default"] == 100 and distill["accepts"] == ["hf"]
    pick = next(p for p in passes if p["name"] == "pick")
    assert pick["accepts"] == ["supernet"] and pick["produces"] == "hf"
    profiles = json.loads(run_cli("profiles", "list", "--json").stdout)
    assert "baseline" in [p["name"] for p in profiles]
    shown = json.loads(run_cli("profiles", "show", "baseline", "--json").stdout)
    assert shown["evaluation"]["window"] == 512


def test_dry_run_prints_resolved_pipeline_and_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("model", str(tiny_dir), "--profile", PROFILE, "--set", "distill.lr=3e-4", "--dry-run", "--json",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["passes"][0]["config"]["train"]["lr"] == 3e-4 and plan["passes"][0]["config"]["train"]["steps"] == 6
    assert not out.exists()


def test_default_profile_compresses_and_baseline_only_evaluates(tiny_dir, tmp_path):
    """A newcomer's first command quantizes, exports and profiles; `--profile baseline` is today's evaluation."""
    default = json.loads(run_cli("model", str(tiny_dir), "--dry-run", "--json", "--out", str(tmp_path / "o")).stdout)
    assert default["profile"] == "quick-4bit"
    assert [p["name"] for p in default["passes"]] == ["quantize", "export_onnx", "profile_latency"]
    assert default["passes"][0]["config"]["bits"] == 4 and default["passes"][2]["config"]["eager_baseline"] is True
    base = json.loads(run_cli("model", str(tiny_dir), "--profile", "baseline", "--dry-run", "--json",
                              "--out", str(tmp_path / "o")).stdout)
    assert base["passes"] == []


@pytest.fixture
def bad_inputs(tmp_path, tiny_dir):
    corrupt_st = tmp_path / "corrupt_st"
    shutil.copytree(tiny_dir, corrupt_st)
    data = (corrupt_st / "model.safetensors").read_bytes()
    (corrupt_st / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage_st = tmp_path / "garbage_st"
    shutil.copytree(tiny_dir, garbage_st)
    (garbage_st / "model.safetensors").write_bytes(b"\xff" * 64)
    bert = tmp_path / "bert"
    shutil.copytree(tiny_dir, bert)
    cfg = json.loads((bert / "config.json").read_text())
    cfg["model_type"] = "bert"
    (bert / "config.json").write_text(json.dumps(cfg))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 40)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"hello world")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad_profile = tmp_path / "bad.yaml"
    bad_profile.write_text("passes: [{name: distill, config: {stepz: 1}}]\n")
    return locals()


CASES = {
    "missing model": (lambda b: ["model", "no/such/path"], "model not found"),
    "truncated safetensors": (lambda b: ["model", str(b["corrupt_st"])], "corrupt safetensors"),
    "garbage safetensors": (lambda b: ["model", str(b["garbage_st"])], "corrupt safetensors"),
    "unsupported architecture": (lambda b: ["model", str(b["bert"])], "unsupported architecture 'bert'"),
    "pickled weights": (lambda b: ["model", str(b["pickled"])], "pickled weights"),
    "corrupt gguf": (lambda b: ["model", str(b["bad_gguf"])], "corrupt GGUF"),
    "not a gguf": (lambda b: ["model", str(b["not_gguf"])], "not a GGUF file"),
    "not a model file": (lambda b: ["model", str(b["a_file"])], "not a model"),
    "unknown profile": (lambda b: ["model", str(b["tiny_dir"]), "--profile", "nope"], "unknown profile"),
    "bad profile key": (lambda b: ["model", str(b["tiny_dir"]), "--profile", str(b["bad_profile"])], "unknown key 'stepz'"),
    "bad override syntax": (lambda b: ["model", str(b["tiny_dir"]), "--set", "nodot"], "bad override"),
    "bad override key": (lambda b: ["model", str(b["tiny_dir"]), "--set", "evaluation.nope=1"], "unknown key 'nope'"),
    "bad override value": (lambda b: ["model", str(b["tiny_dir"]), "--set", "evaluation.window=wide"], "expected an integer"),
    "out-of-range value": (lambda b: ["model", str(b["tiny_dir"]), "--set", "evaluation.window=1"], "must be at least 2"),
    "missing data": (lambda b: ["model", str(b["tiny_dir"]), "--data", "no/such.txt"], "data not found"),
    "bad data type": (lambda b: ["model", str(b["tiny_dir"]), "--eval-data", str(b["bad_profile"])], "unsupported data file"),
    "unknown option": (lambda b: ["model", "--bogus"], "no such option"),
    "eval missing model": (lambda b: ["eval", "no/such/path"], "model not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_output(case, bad_inputs, tmp_path):
    args, msg = CASES[case]
    out = tmp_path / "out"
    proc = run_cli(*args(bad_inputs), "--out", str(out)) if args(bad_inputs)[0] == "model" else run_cli(*args(bad_inputs))
    _assert_bad_input(proc, contains=msg)
    assert not out.exists()


def test_out_is_a_file_or_foreign_folder(tiny_dir, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    _assert_bad_input(run_cli("model", str(tiny_dir), "--out", str(f)), contains="not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    _assert_bad_input(run_cli("model", str(tiny_dir), "--out", str(foreign)), contains="not a compress output")
    assert (foreign / "keep.txt").read_text() == "mine"


def test_corrupt_jsonl_data_is_one_line(tiny_dir, tiny_text, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    out = tmp_path / "out"
    proc = run_cli("model", str(tiny_dir), "--profile", PROFILE, "--data", str(bad), "--eval-data", str(tiny_text),
                   "--out", str(out), "--quiet")
    _assert_bad_input(proc, contains="bad.jsonl:2")
    assert not out.exists()


def test_disk_full_is_one_line(monkeypatch, tmp_path):
    import errno

    from compress import artifact
    from compress.errors import UserError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact.os, "fsync", full)
    with pytest.raises(UserError, match="no space left on device"):
        artifact.atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_model_json_and_eval_json(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("model", str(tiny_dir), "--profile", PROFILE, "--data", str(tiny_text), "--eval-data",
                   str(tiny_text), "--out", str(out), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds only the JSON
    assert proc.stderr == ""
    assert report["stages"][-1]["name"] == "01-distill"
    proc = run_cli("eval", str(out), "--data", str(tiny_text), "--max-tokens", "512", "--window", "64", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["perplexity"] == pytest.approx(report["stages"][-1]["perplexity"], rel=1e-9)
    text = run_cli("eval", str(tiny_dir), "--data", str(tiny_text), "--max-tokens", "512", "--window", "64", "-q")
    assert text.returncode == 0 and "perplexity" in text.stdout


def test_ctrl_c_exits_130_with_one_line_and_resumes(tiny_dir, tiny_text, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "compress", "model", str(tiny_dir), "--profile", PROFILE, "--data", str(tiny_text),
            "--eval-data", str(tiny_text), "--out", str(out), "--quiet", "--set", "distill.steps=3000",
            "--set", "distill.checkpoint_every=20"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [stderr.strip()], stderr
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert ckpt.exists(), sorted(str(p) for p in out.rglob("*"))
    assert not (out / "stages" / "01-distill").exists()
    assert not [p for p in (out / "stages").iterdir() if ".tmp-" in p.name], list((out / "stages").iterdir())


def _wait_for_checkpoint(out: Path, proc, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((out / ".work").glob("*/checkpoint.pt")) if (out / ".work").exists() else []
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def test_error_raised_while_unwinding_ctrl_c_is_still_an_interruption(monkeypatch, capsys):
    """torch's cleanup can replace the KeyboardInterrupt by its own error: exit 130 all the same."""
    import signal as _signal

    from compress import cli as cli_mod

    def fake_app(**_):
        try:
            cli_mod._interrupt(_signal.SIGINT, None)
        except KeyboardInterrupt:
            raise RuntimeError("!dynamicLayerStack.empty() INTERNAL ASSERT FAILED") from None

    monkeypatch.setattr(cli_mod, "app", fake_app)
    assert cli_mod.main([]) == 130
    assert capsys.readouterr().err.startswith("error: interrupted")
    monkeypatch.setattr(cli_mod, "app", lambda **_: (_ for _ in ()).throw(RuntimeError("boom")))
    assert cli_mod.main([]) == 1  # the flag is reset per call: a real crash stays a crash
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
