"""Profiling results as a terminal table, markdown (for reports) and CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..artifact import atomic_write_text

COLUMNS = ("system", "kind", "target", "load s", "TTFT ms", "prefill tok/s", "decode tok/s",
           "p50 ms", "p90 ms", "peak RSS MB", "disk MB")


def row(r: dict[str, Any]) -> list[str]:
    def spread(d: dict[str, float], fmt: str) -> str:
        return f"{d['median']:{fmt}} ({d['min']:{fmt}}–{d['max']:{fmt}})"

    return [
        r["system"], r["kind"], f"{r['device']}:{r['threads']}" if r["device"] == "cpu" else r["device"],
        f"{r['load_seconds']:.2f}", spread(r["ttft_ms"], ".1f"), spread(r["prefill_tokens_per_second"], ".1f"),
        spread(r["decode_tokens_per_second"], ".2f"), f"{r['token_latency_ms']['p50']:.2f}",
        f"{r['token_latency_ms']['p90']:.2f}", f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['disk_bytes'] / 1e6:.1f}",
    ]


def render_table(results: list[dict[str, Any]]) -> str:
    """Aligned plain-text table; ratios to the first row's decode/prefill when there are several."""
    cols = list(COLUMNS)
    rows = [row(r) for r in results]
    if len(results) > 1:
        base = results[0]
        cols += ["decode ×", "prefill ×"]
        for r, cells in zip(results, rows):
            cells += [f"{r['decode_tokens_per_second']['median'] / base['decode_tokens_per_second']['median']:.2f}",
                      f"{r['prefill_tokens_per_second']['median'] / base['prefill_tokens_per_second']['median']:.2f}"]
    widths = [max(len(c), *(len(x[i]) for x in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in rows]
    return "\n".join(lines)


def render_markdown(results: list[dict[str, Any]]) -> list[str]:
    cols = list(COLUMNS)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return lines


def csv_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = ["system", "kind", "runtime", "device", "threads", "prompt_tokens", "new_tokens", "runs",
              "load_seconds", "ttft_ms_median", "ttft_ms_min", "ttft_ms_max", "prefill_tps_median",
              "prefill_tps_min", "prefill_tps_max", "decode_tps_median", "decode_tps_min", "decode_tps_max",
              "token_latency_p50_ms", "token_latency_p90_ms", "peak_rss_bytes", "disk_bytes", "path"]
    out = []
    for r in results:
        s = r["settings"]
        out.append([
            r["system"], r["kind"], r["runtime"], r["device"], r["threads"], s["prompt_tokens"], s["new_tokens"],
            s["runs"], r["load_seconds"], *(r["ttft_ms"][k] for k in ("median", "min", "max")),
            *(r["prefill_tokens_per_second"][k] for k in ("median", "min", "max")),
            *(r["decode_tokens_per_second"][k] for k in ("median", "min", "max")),
            r["token_latency_ms"]["p50"], r["token_latency_ms"]["p90"], r["peak_rss_bytes"], r["disk_bytes"], r["path"],
        ])
    return header, out


def write_csv(path: str | Path, results: list[dict[str, Any]]) -> None:
    header, rows = csv_rows(results)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())
