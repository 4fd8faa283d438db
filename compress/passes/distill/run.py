"""Distillation fine-tuning of the whole model from the teacher, via the shared loop."""

from __future__ import annotations

from ...artifact import Artifact
from ...context import PassContext
from ...hardware import resolve_bf16
from ...models import load_model, save_model
from ...tokenizer import copy_tokenizer_files
from ...training.loop import LossWeights, TrainSettings, train
from .config import DistillConfig


def settings_from(cfg: DistillConfig) -> tuple[TrainSettings, str]:
    bf16, why = resolve_bf16(cfg.bf16)
    return TrainSettings(
        steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
        weight_decay=cfg.weight_decay, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
        bf16=bf16, threads=cfg.threads,
        loss=LossWeights(ce=cfg.ce, kl=cfg.kl, reverse_kl=cfg.reverse_kl, squarehead=cfg.squarehead,
                         temperature=cfg.temperature),
    ), why


def distill(parent: Artifact, cfg: DistillConfig, ctx: PassContext) -> dict:
    settings, why = settings_from(cfg)
    ctx.log(f"distill: {cfg.steps} steps, bf16 {'on' if settings.bf16 else 'off'} ({why})")
    blocks = ctx.training_blocks()
    teacher = ctx.load_teacher() if settings.loss.needs_teacher else None
    student = load_model(parent.path)
    summary = train(
        student, teacher, blocks, settings, work_dir=ctx.work_dir, fingerprint=ctx.artifact_id,
        progress=ctx.progress, log=ctx.log,
    )
    save_model(student, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    summary["bf16_reason"] = why
    summary["training_blocks"] = int(blocks.shape[0])
    return {"train": summary}
