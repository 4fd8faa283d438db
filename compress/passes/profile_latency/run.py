"""Profile the input model (and the eager baseline); pass the model on unchanged."""

from __future__ import annotations

from ...artifact import Artifact, link_model_files
from ...context import PassContext
from ...profiling.harness import ProfileSettings, profile_model
from ...profiling.targets import load_target
from .config import ProfileLatencyConfig

def profile_latency(parent: Artifact, cfg: ProfileLatencyConfig, ctx: PassContext) -> dict:
    target = load_target(cfg.target)
    settings = ProfileSettings(prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens, runs=cfg.runs,
                               warmup=cfg.warmup)
    label = f"{parent.path.name} ({parent.manifest.get('format', 'hf')})"
    rows = [profile_model(parent.path, target, settings, label=label, log=ctx.log)]
    if cfg.eager_baseline and ctx.teacher_path != parent.path:
        rows.append(profile_model(ctx.teacher_path, target, settings, label="input model (PyTorch eager)",
                                  log=ctx.log))
    link_model_files(parent.path, ctx.out_dir)  # the model itself is passed on as is (hard links)
    return {"latency": rows, "target": target.to_dict()}
