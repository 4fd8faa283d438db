"""The subnet table as people read it (torch-free: the CLI renders it)."""

from __future__ import annotations


def table_markdown(rows: list[dict]) -> list[str]:
    head = ("| depth | width | params (M) | size MB | perplexity | KL | top-1 | ms/token | TTFT ms | decode tok/s "
            "| peak MB |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        star = "" if r.get("latency_measured") else "*"

        def f(key, fmt):
            v = r.get(key)
            return "n/a" if v is None else format(v, fmt)
        out.append(f"| {r['depth']} | {r['width']} | {r['parameters'] / 1e6:.1f} | {f('size_mb', '.1f')}{star} | "
                   f"{f('perplexity', '.3f')} | {f('kl', '.4f')} | {f('top1_agreement', '.3f')} | "
                   f"{f('ms_per_token', '.2f')}{star} | {f('ttft_ms', '.1f')}{star} | "
                   f"{f('decode_tokens_per_second', '.1f')}{star} | {f('peak_rss_mb', '.0f')}{star} |")
    return out
