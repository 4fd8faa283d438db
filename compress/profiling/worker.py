"""One profiling measurement, in its own process (so load time and peak memory are its own).

``python -m compress.profiling.worker -`` (arguments as JSON on stdin) prints one JSON line on stdout: load time,
per-run prefill and decode step times, peak resident memory. An ONNX model is run with
plain ONNX Runtime (torch is never imported); a PyTorch folder with eager PyTorch. The
runners are importable so benchmarks time exactly what ``compress profile`` times.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    ``VmHWM`` first: ``ru_maxrss`` survives ``execve`` on Linux, so in a worker started by a
    big parent it would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class OnnxRunner:
    """Greedy decoding of an export with plain ONNX Runtime (``exporters.onnx.runtime``)."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0, session_options: dict | None = None,
                 provider_options: dict | None = None, graph_optimization: str = "all", **_: Any):
        from exporters.onnx.runtime import Decoder, RuntimeOptions

        self.decoder = Decoder(Path(path), RuntimeOptions(
            provider=device, threads=threads, session_options=dict(session_options or {}),
            provider_options=dict(provider_options or {}), graph_optimization=graph_optimization))
        self.runtime = "onnxruntime"
        self.providers = self.decoder.session.get_providers()

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        from exporters.onnx.runtime import StepTimes

        times = StepTimes()
        self.decoder.generate(prompt, new_tokens, times=times)
        return {"prefill": times.prefill_seconds, "decode": times.decode_seconds}


class TorchRunner:
    """Greedy decoding with the Hugging Face model in eager PyTorch (its own KV cache)."""

    def __init__(self, path: Path, *, device: str = "cpu", threads: int = 0, precision: str = "fp32", **_: Any):
        import torch

        from compress.errors import UserError
        from compress.models import load_model

        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("target cuda unavailable: this PyTorch build has no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        dtype = torch.float16 if (device == "cuda" and precision == "fp16") else torch.float32
        self.model = load_model(Path(path), dtype=dtype).to(device)
        self.runtime = f"pytorch {torch.__version__} eager ({str(dtype).replace('torch.', '')})"
        self.providers = [device]

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        torch, device = self.torch, self.device
        decode = []
        from ..models import forward_with_cache

        with torch.inference_mode():
            t = time.perf_counter()
            logits, cache = forward_with_cache(self.model, torch.tensor([prompt], device=device))
            tok = int(logits[0, -1].argmax())  # int() synchronizes CUDA
            prefill = time.perf_counter() - t
            for _ in range(new_tokens - 1):
                t = time.perf_counter()
                logits, cache = forward_with_cache(self.model, torch.tensor([[tok]], device=device), cache)
                tok = int(logits[0, -1].argmax())
                decode.append(time.perf_counter() - t)
        return {"prefill": prefill, "decode": decode}


def measure(args: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    opts = {k: v for k, v in args.items() if k not in ("kind", "path", "prompt", "new_tokens", "runs", "warmup")}
    runner = (OnnxRunner if args["kind"] == "onnx" else TorchRunner)(Path(args["path"]), **opts)
    load = time.perf_counter() - t0
    runs = []
    for r in range(args["warmup"] + args["runs"]):
        res = runner.run(args["prompt"], args["new_tokens"])
        if r >= args["warmup"]:
            runs.append(res)
    return {"load_seconds": load, "runs": runs, "runtime": runner.runtime, "providers": runner.providers,
            "peak_rss_bytes": peak_rss_bytes()}


def _die_with_parent() -> None:
    """A worker never outlives the command that started it (Linux: the kernel sends SIGKILL when
    the parent dies; elsewhere a thread watches the parent's pid)."""
    import os
    import signal
    import threading

    parent = int(os.environ.get("COMPRESS_PARENT_PID") or os.getppid())
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the guard was set
        os._exit(1)


def main(argv: list[str]) -> int:
    from compress.errors import UserError, one_line

    _die_with_parent()
    args = json.loads(sys.stdin.read() if not argv or argv[0] == "-" else argv[0])
    try:
        result = measure(args)
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    except Exception as exc:  # reported by the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {one_line(exc)}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
