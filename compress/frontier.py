"""A subnet table as people read it: markdown rows and the size / accuracy / latency frontier plot
(torch-free: the CLI and the report render it; rows as :mod:`compress.passes.amoeba` measures them)."""

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


def pareto(rows: list[dict], x: str, y: str = "perplexity") -> list[dict]:
    """The rows no other row beats on both ``x`` and ``y`` (lower is better), by ``x``."""
    pts = sorted((r for r in rows if r.get(x) is not None and r.get(y) is not None), key=lambda r: (r[x], r[y]))
    out, best = [], float("inf")
    for r in pts:
        if r[y] < best:
            out.append(r)
            best = r[y]
    return out


def frontier_png(rows: list[dict], path, *, title: str = "") -> None:
    """The size / accuracy / latency frontier: perplexity against ms per token and against size,
    one marker per width, shade by depth, hollow where the latency / size is predicted, the Pareto
    front drawn. Written with matplotlib's Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows}, reverse=True)
    depths = sorted({r["depth"] for r in rows})
    markers = "osD^v<>p*h"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, x, label in ((axes[0], "ms_per_token", "ms per token (median decode step)"),
                         (axes[1], "size_mb", "size on disk, MB")):
        for i, w in enumerate(widths):
            for r in (r for r in rows if r["width"] == w and r.get(x) is not None and r.get("perplexity")):
                shade = plt.cm.viridis(depths.index(r["depth"]) / max(len(depths) - 1, 1))
                measured = r.get("latency_measured")
                ax.scatter(r[x], r["perplexity"], marker=markers[i % len(markers)], s=46,
                           facecolors=shade if measured else "none", edgecolors=shade, linewidths=1.4)
        front = pareto(rows, x)
        ax.plot([r[x] for r in front], [r["perplexity"] for r in front], color="0.4", lw=1, ls="--", zorder=0)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=markers[i % len(markers)], ls="", color="0.3", label=f"width {w}")
               for i, w in enumerate(widths)]
    handles += [plt.Line2D([], [], marker="o", ls="", color=plt.cm.viridis(k / max(len(depths) - 1, 1)),
                           label=f"depth {d}") for k, d in enumerate(depths)]
    handles.append(plt.Line2D([], [], marker="o", ls="", markerfacecolor="none", color="0.3",
                              label="predicted latency / size"))
    axes[1].legend(handles=handles, fontsize=7, loc="upper right", ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    plt.close(fig)
