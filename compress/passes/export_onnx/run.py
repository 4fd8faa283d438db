"""Run the exporter on the input artifact into the stage's temp folder."""

from __future__ import annotations

from ...artifact import Artifact, validation_line
from ...context import PassContext, PassResult
from .config import ExportOnnxConfig


def export_onnx(parent: Artifact, cfg: ExportOnnxConfig, ctx: PassContext) -> PassResult:
    from exporters.onnx.export import ExportOptions, export_model

    opts = ExportOptions(precision=cfg.precision, provider=cfg.provider, validate=cfg.validation,
                         rtol=cfg.rtol or None, greedy_tokens=cfg.greedy_tokens,
                         accuracy_level=cfg.accuracy_level)
    result = export_model(parent.path, ctx.out_dir, opts, log=ctx.log)
    v = result.get("validation")
    report = ([f"Export validated against PyTorch ({v.get('provider', 'cpu')}): {validation_line(v)}."] if v else
              ["Export not validated (validation: false)."])
    if result.get("consumer_config"):
        report.append(f"{result['consumer_config']['note']}.")  # starts with the file's name, as spelled
    # the deployed folder carries no mask file (nothing trains after an export): sparsity is not an
    # invariant of an ONNX stage, though its weights keep the zeros they were given
    return PassResult(metrics={"export": result}, report=report, drop=("sparsity",))
