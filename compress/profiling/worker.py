"""One profiling measurement, in its own process (so load time and peak memory are its own).

``python -m compress.profiling.worker JSON`` prints one JSON line on stdout: load time,
per-run prefill and decode step times, peak resident memory. An ONNX model is run with
plain ONNX Runtime (torch is never imported); a PyTorch folder with eager PyTorch.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _peak_rss_bytes() -> int:
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


def _run_onnx(args: dict[str, Any]) -> dict[str, Any]:
    from exporters.onnx.runtime import Decoder, RuntimeOptions, StepTimes

    t0 = time.perf_counter()
    dec = Decoder(Path(args["path"]), RuntimeOptions(
        provider=args["device"], threads=args["threads"], session_options=args["session_options"],
        provider_options=args["provider_options"], graph_optimization=args["graph_optimization"]))
    load = time.perf_counter() - t0
    runs = []
    for r in range(args["warmup"] + args["runs"]):
        times = StepTimes()
        dec.generate(args["prompt"], args["new_tokens"], times=times)
        if r >= args["warmup"]:
            runs.append({"prefill": times.prefill_seconds, "decode": times.decode_seconds})
    return {"load_seconds": load, "runs": runs, "runtime": "onnxruntime",
            "providers": dec.session.get_providers()}


def _run_torch(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from compress.errors import UserError
    from compress.models import load_model

    device = args["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("target cuda unavailable: this PyTorch build has no CUDA device")
    torch.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    dtype = torch.float16 if (device == "cuda" and args["precision"] == "fp16") else torch.float32
    model = load_model(Path(args["path"]), dtype=dtype).to(device)
    load = time.perf_counter() - t0
    runs = []
    prompt = torch.tensor([args["prompt"]], device=device)
    with torch.inference_mode():
        for r in range(args["warmup"] + args["runs"]):
            decode = []
            t = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            tok = int(out.logits[0, -1].argmax())  # .item() synchronizes CUDA
            prefill = time.perf_counter() - t
            for _ in range(args["new_tokens"] - 1):
                t = time.perf_counter()
                out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=out.past_key_values,
                            use_cache=True)
                tok = int(out.logits[0, -1].argmax())
                decode.append(time.perf_counter() - t)
            if r >= args["warmup"]:
                runs.append({"prefill": prefill, "decode": decode})
            del out
    return {"load_seconds": load, "runs": runs, "runtime": f"pytorch {torch.__version__} eager ({dtype})".replace(
        "torch.", ""), "providers": [device]}


def main(argv: list[str]) -> int:
    from compress.errors import UserError, one_line

    args = json.loads(argv[0])
    try:
        result = _run_onnx(args) if args["kind"] == "onnx" else _run_torch(args)
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    except Exception as exc:  # reported by the parent as one line
        print(json.dumps({"error": f"{type(exc).__name__}: {one_line(exc)}"}))
        return 1
    result["peak_rss_bytes"] = _peak_rss_bytes()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
