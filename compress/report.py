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


def _worst(s: dict) -> str:
    return "—" if s.get("ratio_worst") is None else f"{s['ratio_worst']:.3f} ({s['worst_domain']})"


def domain_table(stage: dict) -> list[str]:
    """Per held-out domain: the teacher and this stage on the same windows, ratio, KL, agreement."""
    summary = {"geomean_ratio": stage.get("ratio_geomean"), "worst_ratio": stage.get("ratio_worst"),
               "worst_domain": stage.get("worst_domain")}
    return domain_rows(stage.get("domains") or {}, summary, f"`{stage['name']}` perplexity")


def domain_rows(doms: dict, summary: dict, model: str = "perplexity") -> list[str]:
    """The domain table shared by the report and ``compress eval``."""
    if not doms:
        return []
    lines = [f"| domain | tokens | teacher perplexity | {model} | × teacher | KL | top-1 agree |",
             "|---|---|---|---|---|---|---|"]
    for name, d in doms.items():
        ratio = d["perplexity"] / d["teacher_perplexity"] if d.get("teacher_perplexity") else None
        lines.append(f"| {name} | {d.get('tokens') or '—'} | {_fmt(d.get('teacher_perplexity'), '.3f')} | "
                     f"{_fmt(d.get('perplexity'), '.3f')} | {_fmt(ratio, '.3f')} | {_fmt(_kl(d.get('kl')), '.4f')} | "
                     f"{_fmt(d.get('top1_agreement'), '.3f')} |")
    if summary.get("geomean_ratio") is not None:
        lines.append(f"| **geometric mean** | | | | **{summary['geomean_ratio']:.3f}** | | |")
        lines.append(f"| **worst** ({summary['worst_domain']}) | | | | **{summary['worst_ratio']:.3f}** | | |")
    return lines


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# compress report — profile `{report['profile']}`",
        "",
        f"- model: {report['model']}",
        f"- evaluation: first {report['evaluation']['max_tokens']} tokens of each held-out domain, "
        f"{report['evaluation']['window']}-token windows; perplexity, KL and top-1 columns are on the first: "
        f"{report['evaluation']['data']}",
        *[f"  - {n}: {label}" for n, label in (report["evaluation"].get("domain_labels") or {}).items()],
        f"- training data: {report['training_data'] or 'not used'}",
        f"- compress {report['tool_version']}, {report['created']}, total {report['total_seconds']:.1f} s",
        "",
        "| # | stage | parameters | weights MB | on disk MB | download MB (zstd) | perplexity | × teacher | KL | "
        "top-1 agree | × teacher, geo-mean of domains | worst domain × | pass s | eval s | cached |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["stages"][0].get("perplexity") if report["stages"] else None
    for s in report["stages"]:
        ratio = s["perplexity"] / base if base and s.get("perplexity") else None
        lines.append(
            f"| {s['index']} | {s['name']} | {s['parameters']:,} | {_mb(s['weight_bytes'])} | {_mb(s.get('disk_bytes'))} | "
            f"{_mb(s.get('download_bytes'))} | "
            f"{_fmt(s.get('perplexity'), '.3f')} | {_fmt(ratio, '.3f')} | {_fmt(_kl(s.get('kl')), '.4f')} | "
            f"{_fmt(s.get('top1_agreement'), '.3f')} | {_fmt(s.get('ratio_geomean'), '.3f')} | "
            f"{_worst(s)} | {_fmt(s.get('pass_seconds'), '.1f')} | "
            f"{_fmt(s.get('eval_seconds'), '.1f')} | {'yes' if s.get('cached') else 'no'} |"
        )
    for s in report["stages"]:
        if s.get("report"):  # each pass renders its own section
            lines += ["", f"## Stage `{s['name']}`", "", *s["report"]]
        if s.get("subnets"):
            lines += ["", f"![size / accuracy / latency frontier of the subnets]({frontier_file(s)})"]
    notes = [n for s in report["stages"] for n in s.get("notes", [])]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    lines += summary_table(report)
    return "\n".join(lines) + "\n"


def summary_rows(report: dict[str, Any]) -> dict[str, Any] | None:
    """Teacher vs the compressed model, side by side: the first stage against the last evaluated one
    (the deployed ONNX model when the pipeline exports), with the latency rows measured in the run."""
    stages = report.get("stages") or []
    evaluated = [s for s in stages[1:] if s.get("perplexity") is not None]
    if not stages or not evaluated:
        return None
    teacher = stages[0]
    # the deployed model: the last evaluated export (a profiling stage passes the same model on)
    made = [s for s in evaluated if s.get("changes_model", True)] or evaluated
    onnx = [s for s in made if s.get("format") == "onnx"]
    final = (onnx or made)[-1]
    rows = [s for st in stages for s in (st.get("latency") or [])]
    fast = next((r for r in rows if r.get("kind") == "onnx"), None)
    slow = next((r for r in rows if r.get("kind") == "pytorch"), None)
    return {"teacher": teacher, "compressed": final, "teacher_latency": slow, "compressed_latency": fast}


def summary_table(report: dict[str, Any]) -> list[str]:
    rows = summary_rows(report)
    if rows is None:
        return []
    t, c = rows["teacher"], rows["compressed"]
    tl, cl = rows["teacher_latency"], rows["compressed_latency"]

    def ratio(a: float | None, b: float | None, spec: str = ".3f") -> str:
        return "—" if not a or b is None else f"×{b / a:{spec}}"

    def tps(r: dict | None, key: str) -> float | None:
        return None if r is None else r[key]["median"]

    def runtime(r: dict | None) -> str:
        return "—" if r is None else f"{r['runtime']}, {r['device']}:{r['threads']}"

    doms = domain_table(c)
    lines = ["", "## Teacher vs compressed", "",
             f"| | teacher (`{t['name']}`) | compressed (`{c['name']}`) | compressed / teacher |", "|---|---|---|---|",
             f"| perplexity ({report['evaluation'].get('primary') or report['evaluation'].get('data')}) | "
             f"{_fmt(t.get('perplexity'), '.3f')} | "
             f"{_fmt(c.get('perplexity'), '.3f')} | {ratio(t.get('perplexity'), c.get('perplexity'))} |",
             *([f"| perplexity ×, geometric mean of {len(c['domains'])} held-out domains | | | "
                f"×{c['ratio_geomean']:.3f} |",
                f"| perplexity ×, worst domain ({c['worst_domain']}) | | | ×{c['ratio_worst']:.3f} |"]
               if c.get("ratio_geomean") is not None else []),
             f"| KL to the teacher (nats/token) | 0 | {_fmt(_kl(c.get('kl')), '.4f')} | |",
             f"| top-1 agreement | 1.000 | {_fmt(c.get('top1_agreement'), '.3f')} | |",
             f"| weights on disk, MB | {_mb(t.get('weight_bytes'))} | {_mb(c.get('weight_bytes'))} | "
             f"{ratio(t.get('weight_bytes'), c.get('weight_bytes'))} |",
             f"| download (the folder, zstd), MB | {_mb(t.get('download_bytes'))} | {_mb(c.get('download_bytes'))} | "
             f"{ratio(t.get('download_bytes'), c.get('download_bytes'))} |"]
    if tl or cl:
        lines += [
            f"| decode tok/s | {_fmt(tps(tl, 'decode_tokens_per_second'), '.1f')} | "
            f"{_fmt(tps(cl, 'decode_tokens_per_second'), '.1f')} | "
            f"{ratio(tps(tl, 'decode_tokens_per_second'), tps(cl, 'decode_tokens_per_second'), '.2f')} |",
            f"| prefill tok/s | {_fmt(tps(tl, 'prefill_tokens_per_second'), '.1f')} | "
            f"{_fmt(tps(cl, 'prefill_tokens_per_second'), '.1f')} | "
            f"{ratio(tps(tl, 'prefill_tokens_per_second'), tps(cl, 'prefill_tokens_per_second'), '.2f')} |",
            f"| runtime | {runtime(tl)} | {runtime(cl)} | |",
        ]
    ev = report["evaluation"]
    tokens = c.get("eval_tokens") or ev["max_tokens"]
    if doms:
        lines += ["", "Held-out domains (none used for calibration or training), the compressed model against the "
                  "teacher on the same windows:", "", *doms]
    lines += ["", f"Perplexity and KL: up to {ev['max_tokens']} tokens of each domain ({tokens} of the first, "
              f"{ev['data']}), never trained on; KL over the teacher's {c.get('kl_topk') or 'k'} most likely tokens at "
              "each position plus "
              "the rest of the vocabulary as one bucket (a lower bound of the full KL). "
              "Latency: median of the timed runs of this run, one process per system; the teacher runs as it was "
              "given (PyTorch eager), the compressed model as deployed."]
    return lines


def frontier_file(stage: dict) -> str:
    return f"frontier-{stage['name']}.png"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report.json``, ``report.md`` and, per supernet stage, its frontier plot (PNG)."""
    for s in report["stages"]:
        if s.get("subnets"):
            from .artifact import atomic_output
            from .frontier import frontier_png

            with atomic_output(Path(out) / frontier_file(s)) as tmp:
                frontier_png(s["subnets"], tmp, title=f"{report['model']}: subnets of {s['name']}")
    atomic_write_json(Path(out) / "report.json", report)
    atomic_write_text(Path(out) / "report.md", render_markdown(report))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["now", "render_markdown", "summary_rows", "summary_table", "write_report"]
