"""The subnet table: accuracy of every grid point, latency and size measured at some and predicted
at the rest from those (a least-squares fit in the subnet's parameters and depth).

A point's latency is measured as users meet it: the subnet extracted, quantized round-to-nearest
at the table's precision (the kernels' speed depends on the shapes, not on the values), exported
to ONNX (MatMulNBits) and profiled on the target in fresh worker processes, in rounds interleaved with
the other measured points (median over the rounds of each round's median after a warm-up). Its size
is that export's bytes on disk.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

LATENCY_KEYS = ("ms_per_token", "ttft_ms", "decode_tokens_per_second", "peak_rss_mb", "size_mb")
#: each budget (``PickConfig.budgets``) -> the table column it bounds
BUDGET_KEYS = {"max_size_mb": "size_mb", "max_ms_per_token": "ms_per_token", "max_ttft_ms": "ttft_ms",
               "max_ppl": "perplexity"}


def subnet_parameters(config: dict, depth: int, heads: int, intermediate: int, *, bias: bool) -> int:
    """Parameters of a LLaMA subnet of this shape (embedding counted once when tied)."""
    d, v = config["hidden_size"], config["vocab_size"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    attn = d * heads * hd * 2 + d * kv * hd * 2
    mlp = 3 * d * intermediate
    per_layer = attn + mlp + 2 * d + ((heads * hd + 2 * kv * hd + d + 2 * intermediate + d) if bias else 0)
    head = 0 if config.get("tie_word_embeddings") else v * d
    return v * d + head + d + depth * per_layer


def measurement_order(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Which (depth, width index) points to measure first: the four corners, then the rest spread
    out (farthest from those already chosen, in normalized depth x width)."""
    depths = sorted({p[0] for p in points})
    widths = sorted({p[1] for p in points})
    corners = [(depths[-1], widths[0]), (depths[0], widths[-1]), (depths[-1], widths[-1]), (depths[0], widths[0])]
    order = [c for i, c in enumerate(corners) if c in points and c not in corners[:i]]
    span_d, span_w = max(depths[-1] - depths[0], 1), max(widths[-1] - widths[0], 1)
    rest = [p for p in points if p not in order]
    while rest:
        def gap(p):
            return min(((p[0] - q[0]) / span_d) ** 2 + ((p[1] - q[1]) / span_w) ** 2 for q in order) if order else 0
        best = max(rest, key=lambda p: (gap(p), p))
        order.append(best)
        rest.remove(best)
    return order


def _fit(known: list[dict], key: str) -> Callable[[dict], float]:
    """The predictor of ``key`` fitted on ``known``: least squares on ``[1, parameters, depth]``
    (``[1, parameters]`` with fewer than 4 points or a single depth)."""
    use_depth = len(known) >= 4 and len({r["depth"] for r in known}) > 1

    def feats(r):
        return [1.0, r["parameters"] / 1e6] + ([float(r["depth"])] if use_depth else [])
    x = np.array([feats(r) for r in known])
    y = np.array([r[key] for r in known], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return lambda r: float(np.dot(feats(r), coef))


def predict(rows: list[dict], key: str) -> None:
    """Fill ``key`` of the rows that lack it from the measured ones (``_fit``)."""
    known = [r for r in rows if r.get(key) is not None]
    if not known or len(known) == len(rows):
        return
    fit = _fit(known, key)
    for r in rows:
        if r.get(key) is None:
            r[key] = fit(r)


def prediction_error(rows: list[dict], key: str = "ms_per_token") -> dict[str, Any] | None:
    """How far to trust the predicted ``key`` of a table: each measured row predicted from the
    other measured ones (leave-one-out, the fit ``predict`` uses), as relative errors. ``None``
    with fewer than 3 measured rows (nothing left to fit on)."""
    known = [r for r in rows if r.get("latency_measured") and r.get(key) is not None]
    if len(known) < 3:
        return None
    errors = []
    for i, r in enumerate(known):
        guess = _fit(known[:i] + known[i + 1:], key)(r)
        errors.append({"depth": r["depth"], "width": r["width"], "measured": r[key], "predicted": guess,
                       "error": guess / r[key] - 1})
    rel = [abs(e["error"]) for e in errors]
    return {"key": key, "points": len(errors), "median_abs_error": statistics.median(rel), "max_abs_error": max(rel),
            "mean_error": statistics.fmean(e["error"] for e in errors), "per_point": errors}


def export_for_latency(model, tokenizer_src: Path, out: Path, *, bits: str, group: int) -> Path:
    """``model`` (a dense subnet) as the ONNX export a device runs: saved, quantized
    round-to-nearest at ``bits`` (or fp32), exported without validation (nothing here is a
    deliverable: the folder is measured and deleted; a sparse model's masks are left out: the
    kernels are dense)."""
    from exporters.onnx.export import ExportOptions, export_model

    from ...arch import arch_of
    from ...models import save_model
    from ...quantized import quantize_rtn_, save_quantized
    from ...tokenizer import copy_tokenizer_files

    src = out / "model"
    src.mkdir(parents=True)
    if bits == "fp32":
        save_model(model, src)
    else:
        quantize_rtn_(model, arch_of(model).linear_names(model), int(bits), group)
        save_quantized(model, src, {"bits": int(bits), "group_size": group, "sym": False, "init": "rtn",
                                    "embeddings": "8", "recovery": "none"})
    copy_tokenizer_files(tokenizer_src, src)
    onnx = out / "onnx"
    onnx.mkdir()
    export_model(src, onnx, ExportOptions(validate=False))
    shutil.rmtree(src, ignore_errors=True)
    return onnx


def measure_latency(models: list[tuple[str, Callable[[], Any]]], tokenizer_src: Path, target, *, bits: str,
                    group: int, prompt_tokens: int, new_tokens: int, runs: int, rounds: int,
                    log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Latency and size of each ``(label, make_model)`` exported at ``bits`` on ``target``: the
    table's columns, in the order of ``models``.

    Every model is exported first (one in memory at a time), then profiled in ``rounds``
    interleaved rounds (each a fresh worker: a warm-up and ``runs`` timed runs); a point's figures
    are the medians over its rounds. A slow spell of the machine (on a shared VM a 10-second
    stretch can run 20 % slow) then moves one round of every point, not one point's only figure.
    """
    from ...formats import weight_bytes
    from ...profiling.harness import ProfileSettings, profile_model

    tmp = Path(tempfile.mkdtemp(prefix="compress-subnet-"))
    try:
        exports = [(label, export_for_latency(make(), tokenizer_src, tmp / str(k), bits=bits, group=group))
                   for k, (label, make) in enumerate(models)]
        settings = ProfileSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=1)
        seen: list[list[dict]] = [[] for _ in exports]
        for r in range(rounds):
            for (label, onnx), rows in zip(exports, seen):
                rows.append(profile_model(onnx, target, settings, label=f"{label} (round {r + 1}/{rounds})", log=log))
        med = statistics.median
        out = []
        for (_, onnx), rows in zip(exports, seen):
            rss = [row["peak_rss_bytes"] for row in rows if row.get("peak_rss_bytes")]
            out.append({
                "ms_per_token": med(row["token_latency_ms"]["p50"] for row in rows),
                "ttft_ms": med(row["ttft_ms"]["median"] for row in rows),
                "decode_tokens_per_second": med(row["decode_tokens_per_second"]["median"] for row in rows),
                "peak_rss_mb": med(rss) / 1e6 if rss else None,
                "size_mb": weight_bytes(onnx) / 1e6,
                "ms_per_token_rounds": [round(row["token_latency_ms"]["p50"], 4) for row in rows],
                "profile": {k: rows[0][k] for k in ("target", "device", "threads", "runtime") if k in rows[0]}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def feasible(row: dict, budgets: dict[str, float], margin: float = 0.0) -> bool:
    """Whether a table row meets every budget (``max_size_mb``, ``max_ms_per_token``, ``max_ttft_ms``,
    ``max_ppl``); a predicted latency must meet it by ``margin``."""
    for budget, limit in budgets.items():
        key = BUDGET_KEYS[budget]
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        slack = margin if key in ("ms_per_token", "ttft_ms") and not row.get("latency_measured") else 0.0
        if value > limit * (1 - slack):
            return False
    return True


def overshoot(row: dict, budgets: dict[str, float]) -> float:
    """How far a row misses the budgets: the largest relative excess (0 when it meets them)."""
    worst = 0.0
    for budget, limit in budgets.items():
        value = row.get(BUDGET_KEYS[budget])
        if value is None:
            return math.inf
        worst = max(worst, value / limit - 1)
    return worst
