"""The run report: ``report.json`` (machine-readable) and ``report.md`` (a table)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .artifact import atomic_write_json, atomic_write_text


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _kl(v: float | None) -> float | None:
    """KL is >= 0; float round-off on identical models gives -1e-8, shown as 0."""
    return None if v is None else max(v, 0.0)


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# compress report — profile `{report['profile']}`",
        "",
        f"- model: {report['model']}",
        f"- evaluation data: {report['evaluation']['data']} — first {report['evaluation']['max_tokens']} tokens, "
        f"{report['evaluation']['window']}-token windows",
        f"- training data: {report['training_data'] or 'not used'}",
        f"- compress {report['tool_version']}, {report['created']}, total {report['total_seconds']:.1f} s",
        "",
        "| # | stage | parameters | weights MB | on disk MB | perplexity | × teacher | KL | top-1 agree | pass s | eval s | cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["stages"][0].get("perplexity") if report["stages"] else None
    for s in report["stages"]:
        ratio = s["perplexity"] / base if base and s.get("perplexity") else None
        lines.append(
            f"| {s['index']} | {s['name']} | {s['parameters']:,} | {_mb(s['weight_bytes'])} | {_mb(s.get('disk_bytes'))} | "
            f"{_fmt(s.get('perplexity'), '.3f')} | {_fmt(ratio, '.3f')} | {_fmt(_kl(s.get('kl')), '.4f')} | "
            f"{_fmt(s.get('top1_agreement'), '.3f')} | {_fmt(s.get('pass_seconds'), '.1f')} | "
            f"{_fmt(s.get('eval_seconds'), '.1f')} | {'yes' if s.get('cached') else 'no'} |"
        )
    for s in report["stages"]:
        v = s.get("validation")
        if v:
            from .artifact import validation_line

            lines += ["", f"Export `{s['name']}` validated against PyTorch ({v.get('provider', 'cpu')}): "
                      f"{validation_line(v)}."]
        if s.get("latency"):
            from .profiling.output import render_markdown as latency_table

            first = s["latency"][0]
            st = first["settings"]
            lines += ["", f"## Latency — stage `{s['name']}`, target {first['target']} "
                      f"({first['device']}, {first['threads']} threads)", "",
                      f"{st['prompt_tokens']} prompt + {st['new_tokens']} new tokens, greedy; median of {st['runs']} "
                      f"runs after {st['warmup']} warm-up (min–max).", ""]
            lines += latency_table(s["latency"])
    notes = [n for s in report["stages"] for n in s.get("notes", [])]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / "report.json", report)
    atomic_write_text(Path(out) / "report.md", render_markdown(report))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["now", "render_markdown", "write_report"]
