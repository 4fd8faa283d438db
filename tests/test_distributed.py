"""Multi-process training under Accelerate (torchrun, gloo on CPU) equals one process with the
same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).parent / "ddp_worker.py")


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
         str(tmp_path / "two.pt"), "2"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, WORKER, str(tmp_path / "one.pt"), "4"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["world"] == 1 and b["world"] == 2
    assert b["history"] == pytest.approx(a["history"], rel=1e-5)
    for k in a["state"]:
        torch.testing.assert_close(b["state"][k], a["state"][k], atol=2e-4, rtol=0)


def test_cli_pipeline_under_torchrun_matches_one_process(tiny_dir, tiny_text, tmp_path):
    """`torchrun -m compress model ...`: rank 0 writes, both ranks train; same model as 1 process."""
    import json

    from safetensors.torch import load_file

    profile = str(Path(__file__).parent / "profiles" / "distill-tiny.yaml")
    common = ["model", str(tiny_dir), "--profile", profile, "--data", str(tiny_text), "--eval-data", str(tiny_text),
              "--set", "distill.squarehead=0", "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "compress",
         *common, "--set", "distill.batch_size=1", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)  # only rank 0 prints
    assert report["processes"] == 2 and report["stages"][-1]["name"] == "01-distill"
    one = subprocess.run([sys.executable, "-m", "compress", *common, "--set", "distill.batch_size=2", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "one" / "stages" / "01-distill" / "model.safetensors")
    b = load_file(tmp_path / "two" / "stages" / "01-distill" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=0)
    assert not (tmp_path / "two" / ".work").exists()
    man = json.loads((tmp_path / "two" / "stages" / "01-distill" / "manifest.json").read_text())
    assert man["metrics"]["train"]["world_size"] == 2  # really trained as two processes


def test_pat_under_torchrun_matches_one_process(tiny_dir, tiny_text, tmp_path):
    """PAT's mask stops receiving gradients at 0.8 G (frozen, binary): DDP must be told that some
    parameters go unused, or the second process waits for a gradient that never comes."""
    import json

    from safetensors.torch import load_file

    profile = str(Path(__file__).parent / "profiles" / "pat-only-tiny.yaml")
    common = ["model", str(tiny_dir), "--profile", profile, "--data", str(tiny_text), "--eval-data", str(tiny_text),
              "--quiet", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "compress",
         *common, "--set", "pat.batch_size=1", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "compress", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    stage = Path("stages") / "01-pat"
    ma, mb = (json.loads((tmp_path / r / stage / "manifest.json").read_text())["metrics"]["pat"] for r in ("one", "two"))
    assert mb["train"]["world_size"] == 2 and ma["train"]["world_size"] == 1 and mb["train"]["steps"] == 20
    assert mb["kept_channels"] == ma["kept_channels"] and len(ma["kept_channels"]) == 32
    assert mb["kept_per_step"] == ma["kept_per_step"] and mb["snapped"] == 0
    a, b = load_file(tmp_path / "one" / stage / "model.safetensors"), load_file(tmp_path / "two" / stage / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=0)
