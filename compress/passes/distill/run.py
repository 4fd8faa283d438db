"""Distillation fine-tuning of the whole model from the teacher, via the shared loop."""

from __future__ import annotations

from ...artifact import Artifact
from ...context import PassContext, PassResult
from ...models import load_model, save_model
from ...tokenizer import copy_tokenizer_files
from ...training.loop import LossWeights
from .config import DistillConfig


def distill(parent: Artifact, cfg: DistillConfig, ctx: PassContext) -> PassResult:
    settings, why = cfg.train.settings(LossWeights.of(cfg))
    ctx.log(f"distill: {settings.steps} steps, bf16 {'on' if settings.bf16 else 'off'} ({why})")
    blocks = ctx.training_blocks()
    teacher = ctx.load_teacher() if settings.loss.needs_teacher else None
    student = load_model(parent.path)
    summary = ctx.train(student, teacher, blocks, settings)
    save_model(student, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    summary["bf16_reason"] = why
    summary["training_blocks"] = int(blocks.shape[0])
    t = summary
    lines = [f"Distilled {t['steps']} steps: loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}"
             + (f", {t['train_tokens_per_second']:.0f} tokens/s" if t.get("train_tokens_per_second") else "") + "."]
    return PassResult(metrics={"train": summary}, report=lines)
