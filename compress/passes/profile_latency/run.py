"""Profile the input model (and the eager baseline); the runner passes the model on unchanged."""

from __future__ import annotations

from ...artifact import Artifact
from ...context import PassContext, PassResult
from ...formats import detect_format
from ...profiling.harness import ProfileSettings, profile_model
from ...profiling.output import render_markdown as latency_table
from ...target import load_target
from .config import ProfileLatencyConfig


def profile_latency(parent: Artifact, cfg: ProfileLatencyConfig, ctx: PassContext) -> PassResult:
    target = load_target(cfg.target) if cfg.target else (ctx.target or load_target("cpu"))
    settings = ProfileSettings(prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens, runs=cfg.runs,
                               warmup=cfg.warmup)
    label = parent.manifest.get("label") or f"{parent.path.name} ({detect_format(parent.path)})"
    rows = [profile_model(parent.path, target, settings, label=label, log=ctx.log)]
    if cfg.eager_baseline and ctx.teacher_path.resolve() != parent.path.resolve():
        rows.append(profile_model(ctx.teacher_path, target, settings, label="input model (PyTorch eager)",
                                  log=ctx.log))
    first = rows[0]
    report = [f"Latency on target {first['target']} ({first['device']}, {first['threads']} threads): "
              f"{settings.prompt_tokens} prompt + {settings.new_tokens} new tokens, greedy; median of {settings.runs} "
              f"runs after {settings.warmup} warm-up (min–max).", "", *latency_table(rows)]
    return PassResult(metrics={"latency": rows, "target": target.to_dict()}, report=report, latency=rows)
