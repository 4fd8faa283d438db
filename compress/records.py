"""Run records: one row per stage for report.json, built from the stage's manifest and its
evaluation — nothing here knows a pass: what a pass wants said, it put in its manifest
(``report`` lines, ``latency`` rows, ``invariants``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import __version__
from .artifact import read_artifact
from .formats import count_parameters, download_bytes, weight_bytes
from .report import now


def stage_record(out: Path, d: Path, index: int, metrics: dict, cached: bool) -> dict[str, Any]:
    man = read_artifact(d).manifest
    pass_metrics = man.get("metrics") or {}
    return {
        "index": index,
        "name": d.name,
        "pass": man.get("pass"),
        "format": man.get("format", "hf"),
        "id": man["id"],
        "path": str(d.relative_to(out)),
        "parameters": man.get("parameters") or count_parameters(d),
        "weight_bytes": weight_bytes(d),
        "disk_bytes": sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
        "download_bytes": download_bytes(d),  # the folder's files, zstd-compressed one by one
        "perplexity": metrics.get("perplexity"),
        "kl": metrics.get("kl"),
        "top1_agreement": metrics.get("top1_agreement"),
        "kl_topk": metrics.get("kl_topk"),  # the teacher's top-k the KL is taken over (+ one tail bucket)
        "eval_tokens": metrics.get("tokens"),
        "eval_seconds": metrics.get("eval_seconds"),
        # every held-out domain: perplexity, the teacher's on the same windows, KL, agreement
        "domains": {n: {k: r.get(k) for k in ("perplexity", "teacher_perplexity", "kl", "top1_agreement", "tokens")}
                    for n, r in (metrics.get("domains") or {}).items()},
        "ratio_geomean": (metrics.get("summary") or {}).get("geomean_ratio"),
        "ratio_worst": (metrics.get("summary") or {}).get("worst_ratio"),
        "worst_domain": (metrics.get("summary") or {}).get("worst_domain"),
        "pass_seconds": pass_metrics.get("pass_seconds"),
        "cached": cached,
        "changes_model": man.get("changes_model", True),
        "invariants": man.get("invariants") or {},
        "notes": list(man.get("notes") or []),
        "subnets": pass_metrics.get("subnets"),  # a supernet's table (the report plots its frontier)
        "report": list(man.get("report") or []),
        "latency": man.get("latency"),
        "metrics": metrics,
        "pass_metrics": pass_metrics,  # what the pass measured (e.g. export validation), as its manifest has it
    }


def build_report(*, profile: str, model: str, source_id: str, evaluation: dict, training_data: str | None,
                 target: dict, processes: int, records: list[dict], seconds: float) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "created": now(),
        "profile": profile,
        "model": model,
        "source_id": source_id,
        "target": target,
        "evaluation": evaluation,
        "training_data": training_data,
        "processes": processes,
        "stages": records,
        "final_stage": {"path": records[-1]["path"], "id": records[-1]["id"]},
        "total_seconds": seconds,
    }
