"""The ``pick`` pass: the most accurate subnet of a supernet's table that meets every budget, as a
plain dense model (adapters merged, heads and channels sliced, layers renumbered; a sparse parent's
masks sliced along and kept exactly).

Candidates are tried from the lowest perplexity up; a candidate whose latency was predicted (or
measured on another target than the pass's) is measured first, as the table measures, and taken
only if the measurement meets the budget too, so the pick is always measured on its target. When no point meets the budgets the pass
stops with the closest point named (exit 2).
"""

from __future__ import annotations

import math
from typing import Any

from ...arch import arch_of
from ...artifact import Artifact
from ...context import NewMasks, PassContext, PassResult
from ...errors import UserError
from ...models import load_model, save_model
from ...target import load_target
from ...tokenizer import copy_tokenizer_files
from .config import PickConfig
from .measure import BUDGET_KEYS, feasible, measure_latency, overshoot

BUDGET_NAMES = {"max_size_mb": "size {:.1f} MB", "max_ms_per_token": "{:.2f} ms/token", "max_ttft_ms": "TTFT {:.1f} ms",
                "max_ppl": "perplexity {:.3f}"}


def describe(row: dict, budgets: dict[str, float] | None = None) -> str:
    keys = budgets or BUDGET_NAMES
    vals = [BUDGET_NAMES[k].format(row[BUDGET_KEYS[k]]) for k in keys if row.get(BUDGET_KEYS[k]) is not None]
    return f"depth {row['depth']} width {row['width']} ({', '.join(vals)})"


def choose(rows: list[dict], cfg: PickConfig, measure) -> tuple[dict, list[dict]]:
    """The row to extract (measured), and every measurement made on the way."""
    made = []
    if cfg.depth:
        hit = [r for r in rows if r["depth"] == cfg.depth and math.isclose(r["width"], cfg.width)]
        if not hit:
            pts = ", ".join(f"{r['depth']}x{r['width']}" for r in rows)
            raise UserError(f"pick: depth {cfg.depth} width {cfg.width} is not in the table ({pts})")
        row = hit[0]
        if not row.get("latency_measured"):
            row = {**row, **measure(row), "latency_measured": True}
            made.append(row)
        return row, made
    budgets = cfg.budgets()

    def accuracy(r):
        p = r.get("perplexity")
        return (p if p is not None and not math.isnan(p) else math.inf, -r["parameters"])
    for row in sorted(rows, key=accuracy):
        if not feasible(row, budgets, cfg.margin):
            continue
        if not row.get("latency_measured"):
            row = {**row, **measure(row), "latency_measured": True}
            made.append(row)
            if not feasible(row, budgets):
                continue
        return row, made
    pool = rows + made
    closest = min(pool, key=lambda r: (overshoot(r, budgets), accuracy(r)))
    asked = ", ".join(f"{k} {v:g}" for k, v in budgets.items()) or "none"
    raise UserError(f"pick: no subnet meets the budget ({asked}); closest: {describe(closest, budgets)}"
                    f"{' (measured)' if closest.get('latency_measured') else ' (predicted)'}")


def pick(parent: Artifact, cfg: PickConfig, ctx: PassContext) -> PassResult:
    model = load_model(parent.path)
    net, meta = model.supernet, model.supernet_meta
    metrics = parent.manifest.get("metrics") or {}
    if not metrics.get("subnets"):
        raise UserError(f"pick: {parent.path} has no subnet table in its manifest (not an amoeba stage?)")
    rows = [dict(r) for r in metrics["subnets"]]
    target = ctx.target or load_target("cpu")
    if metrics.get("subnets_target") != target.to_dict():  # timed elsewhere: a guess here, measured before taken
        for r in rows:
            r["latency_measured"] = False
    masks = ctx.parent_masks()

    def measure(row: dict) -> dict[str, Any]:
        sub = net.subnet(row["depth"], row["width_index"])
        ctx.log(f"pick: measuring depth {row['depth']} width {row['width']} on {target.label()}")
        return measure_latency([(f"d{row['depth']}-w{row['width']}", lambda: net.extract(sub)[0])], parent.path,
                               target, bits=meta["latency_bits"], group=meta["latency_group"],
                               prompt_tokens=meta["prompt_tokens"], new_tokens=meta["new_tokens"], runs=meta["runs"],
                               rounds=meta.get("rounds", 1), log=ctx.log)[0]

    row, made = choose(rows, cfg, measure)
    sub = net.subnet(row["depth"], row["width_index"])
    small, small_masks = net.extract(sub, masks)
    save_model(small, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)
    budgets = cfg.budgets()
    how = (f"depth {cfg.depth} width {cfg.width} as asked" if cfg.depth else
           "the most accurate point within " + (", ".join(f"{k} {v:g}" for k, v in budgets.items()) or "no budget"))
    report = [f"Picked subnet {describe(row)}: {how}; {len(made)} latency measurement(s) made "
              f"({meta['latency_bits']}{'-bit' if meta['latency_bits'] != 'fp32' else ''} on {target.label()}). "
              f"{row['parameters'] / 1e6:.1f} M parameters, {sub.depth} layers ({', '.join(map(str, sub.layers))}), "
              f"{small.config.num_attention_heads} heads, MLP {small.config.intermediate_size}."]
    result = PassResult(metrics={"pick": {"row": row, "measured": made, "budgets": budgets}}, report=report,
                        shape=arch_of(small).shape(small.config.to_dict()))
    if masks:
        pattern = ((parent.manifest.get("invariants") or {}).get("sparsity") or {}).get("pattern", "unstructured")
        if ":" in pattern and small.config.intermediate_size != net.intermediate:
            pattern = "unstructured"  # dropped MLP channels cut down_proj's N:M groups along its input
        result.sparsity = NewMasks(small_masks, pattern)
        result.report.append(f"The parent's sparsity is kept exactly: {len(small_masks)} masks sliced with the "
                             "weights, the adapters' deltas masked before the merge.")
    return result
