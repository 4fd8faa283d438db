"""Run the exporter on the input artifact into the stage's temp folder."""

from __future__ import annotations

from ...artifact import Artifact
from ...context import PassContext
from .config import ExportOnnxConfig


def export_onnx(parent: Artifact, cfg: ExportOnnxConfig, ctx: PassContext) -> dict:
    from exporters.onnx.export import ExportOptions, export_model

    opts = ExportOptions(precision=cfg.precision, provider=cfg.provider, validate=cfg.validation,
                         rtol=cfg.rtol or None, greedy_tokens=cfg.greedy_tokens,
                         accuracy_level=cfg.accuracy_level)
    return {"export": export_model(parent.path, ctx.out_dir, opts, log=ctx.log)}
