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
