from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import Config, help_field


@dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """Distillation fine-tuning from the frozen teacher (the pipeline's input model)."""

    VERSION: ClassVar[int] = 2  # 2: the parent's tokenizer files are copied verbatim (were re-saved)
    SECTION: ClassVar[str] = "distill"

    steps: int = help_field(100, "optimizer steps")
    lr: float = help_field(2e-5, "peak learning rate (AdamW)")
    warmup_steps: int = help_field(10, "linear warm-up steps")
    min_lr_ratio: float = help_field(0.1, "cosine decay ends at lr * min_lr_ratio")
    batch_size: int = help_field(4, "sequences per micro-batch (per process)")
    grad_accum: int = help_field(1, "micro-batches per optimizer step")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm (0 = off)")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    ce: float = help_field(0.0, "weight of next-token cross entropy on the data")
    kl: float = help_field(1.0, "weight of forward KL(teacher || student) on logits")
    reverse_kl: float = help_field(0.0, "weight of reverse KL(student || teacher)")
    squarehead: float = help_field(0.0, "weight of SquareHead (normalized per-block MSE, summed)")
    temperature: float = help_field(1.0, "softmax temperature of the KL terms")
    checkpoint_every: int = help_field(25, "save a resumable checkpoint every N steps (0 = never)")
    seed: int = help_field(0, "data-order seed")
    bf16: Literal["auto", "on", "off"] = help_field("auto", "bf16 autocast: auto = where the hardware has fast bf16")
    threads: int = help_field(0, "torch threads (0 = all cores)")

    def validate(self) -> None:
        if self.steps < 1:
            self._fail("steps", "must be at least 1")
        if not 0 < self.lr < 1:
            self._fail("lr", f"must be in (0, 1), got {self.lr}")
        if self.warmup_steps < 0:
            self._fail("warmup_steps", "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            self._fail("min_lr_ratio", "must be in [0, 1]")
        if self.batch_size < 1 or self.grad_accum < 1:
            self._fail("batch_size" if self.batch_size < 1 else "grad_accum", "must be at least 1")
        for key in ("ce", "kl", "reverse_kl", "squarehead", "max_grad_norm", "weight_decay"):
            if getattr(self, key) < 0:
                self._fail(key, "must be >= 0")
        if self.ce + self.kl + self.reverse_kl + self.squarehead <= 0:
            self._fail("kl", "at least one of ce, kl, reverse_kl, squarehead must be > 0")
        if self.temperature <= 0:
            self._fail("temperature", "must be > 0")
        if self.checkpoint_every < 0 or self.threads < 0:
            self._fail("checkpoint_every" if self.checkpoint_every < 0 else "threads", "must be >= 0")
