"""Profile models the way a device user feels them: load, first token, prefill, decode.

Each model is measured in its own worker process (``compress.profiling.worker``), so load
time and peak resident memory belong to that model alone: warm-up runs, then ``runs``
timed runs of greedy decoding (a fixed English prompt of exactly ``prompt_tokens`` tokens,
exactly ``new_tokens`` new tokens, EOS ignored); medians with min–max.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..formats import ONNX_CONFIG, detect_format, weight_bytes
from ..errors import UserError
from ..target import TargetConfig

PROMPT_TEXT = (
    "The history of computing is a story of making machines smaller, cheaper and closer to the people "
    "who use them. Room-sized mainframes gave way to minicomputers, then to personal computers on every "
    "desk, and finally to phones that fit in a pocket yet hold more power than the machines that guided "
    "the first missions to the moon. Language models are following the same path. The first large "
    "models ran only in data centers on racks of accelerators, but careful engineering now lets useful "
    "models answer questions on a laptop or a phone, without a network connection, while keeping the "
    "user's data on the device. "
)


@dataclass(frozen=True)
class ProfileSettings:
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 5
    warmup: int = 1

    def check(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            raise UserError("profile: prompt tokens must be >= 1 and new tokens >= 2")
        if self.runs < 1 or self.warmup < 0:
            raise UserError("profile: runs must be >= 1 and warmup >= 0")


def model_kind(path: Path) -> str:
    """``onnx`` (an export), ``pytorch`` (a HF folder / artifact), else a UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    if detect_format(path) == "onnx":
        return "onnx"
    if (path / "config.json").is_file():
        return "pytorch"
    raise UserError(f"{path} is neither an ONNX export ({ONNX_CONFIG}) nor a model folder (config.json)")


def model_context(path: Path) -> int | None:
    """The longest sequence a model folder declares it handles (config.json's
    ``max_position_embeddings``, or an export's ``context_length``); None where it says nothing."""
    from ..untrusted import read_json

    path = Path(path)
    if (path / "config.json").is_file():
        n = read_json(path / "config.json").get("max_position_embeddings")
    elif (path / "genai_config.json").is_file():
        n = (read_json(path / "genai_config.json").get("model") or {}).get("context_length")
    else:
        return None
    return n if isinstance(n, int) and n > 0 else None


def prompt_ids(path: Path, n: int) -> list[int]:
    """Exactly ``n`` tokens of the fixed prompt text, with the model's own tokenizer."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise UserError(f"{path}: no tokenizer.json to build the profiling prompt with")
    tok = Tokenizer.from_file(str(file))
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    return ids[:n]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(raw: dict[str, Any], settings: ProfileSettings) -> dict[str, Any]:
    runs = raw["runs"]
    ttft = [r["prefill"] for r in runs]
    decode_tps = [len(r["decode"]) / sum(r["decode"]) for r in runs]
    return {
        "load_seconds": raw["load_seconds"],
        "ttft_ms": _spread([t * 1000 for t in ttft]),
        "prefill_tokens_per_second": _spread([settings.prompt_tokens / t for t in ttft]),
        "decode_tokens_per_second": _spread(decode_tps),
        "token_latency_ms": {
            "p50": statistics.median(_percentile(r["decode"], 0.5) * 1000 for r in runs),
            "p90": statistics.median(_percentile(r["decode"], 0.9) * 1000 for r in runs),
        },
        "peak_rss_bytes": raw["peak_rss_bytes"],
    }


def profile_model(path: Path, target: TargetConfig, settings: ProfileSettings, *, label: str | None = None,
                  log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Measure one model folder on ``target`` in a fresh worker process."""
    settings.check()
    path = Path(path).resolve()
    kind = model_kind(path)
    context = model_context(path)
    if context is not None and settings.prompt_tokens + settings.new_tokens > context:
        raise UserError(f"a profiling run of {settings.prompt_tokens} prompt + {settings.new_tokens} new tokens "
                        f"exceeds the model's context of {context} tokens")
    if kind == "onnx":
        from exporters.onnx.runtime import check_provider

        check_provider(target.device)
    args = {
        "kind": kind, "path": str(path), "device": target.device, "threads": target.resolved_threads(),
        "precision": target.precision, "session_options": target.session_options,
        "provider_options": target.provider_options, "graph_optimization": target.graph_optimization,
        "prompt": prompt_ids(path, settings.prompt_tokens), "new_tokens": settings.new_tokens,
        "runs": settings.runs, "warmup": settings.warmup,
    }
    log(f"profiling {label or path.name} ({kind}) on {target.label()}: {settings.warmup} warm-up + "
        f"{settings.runs} runs of {settings.prompt_tokens} prompt + {settings.new_tokens} new tokens")
    # the arguments go on stdin: a long prompt's ids would overflow the command line (E2BIG)
    proc = subprocess.run([sys.executable, "-m", "compress.profiling.worker", "-"], input=json.dumps(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "COMPRESS_PARENT_PID": str(os.getpid())})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        raw = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"profiling {path} failed (exit {proc.returncode}): {tail}") from None
    if "error" in raw:
        raise UserError(raw["error"] if proc.returncode == 2 else f"profiling {path} failed: {raw['error']}")
    return {
        "system": label or path.name,
        "path": str(path),
        "kind": kind,
        "runtime": raw["runtime"],
        "providers": raw["providers"],
        "target": target.name,
        "device": target.device,
        "threads": target.resolved_threads(),
        "settings": asdict(settings),
        "disk_bytes": weight_bytes(path),
        **summarize(raw, settings),
    }
