from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import Config, help_field
from ...training.section import TrainSection


@dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """Distillation fine-tuning from the frozen teacher (the pipeline's input model)."""

    VERSION: ClassVar[int] = 2  # config schema (2: the training fields moved into `train`, threads to the target)
    SECTION: ClassVar[str] = "distill"

    train: TrainSection = help_field(TrainSection(steps=100, lr=2e-5, warmup_steps=10, batch_size=4),
                                     "training: steps, lr, schedule, batch, clipping, bf16, checkpoints, seed")
    ce: float = help_field(0.0, "weight of next-token cross entropy on the data")
    kl: float = help_field(1.0, "weight of forward KL(teacher || student) on logits")
    reverse_kl: float = help_field(0.0, "weight of reverse KL(student || teacher)")
    squarehead: float = help_field(0.0, "weight of SquareHead (normalized per-block MSE, summed)")
    temperature: float = help_field(1.0, "softmax temperature of the KL terms")

    def training_sequences(self) -> int:
        return self.train.steps * self.train.batch_size * self.train.grad_accum

    def validate(self) -> None:
        if self.train.steps < 1:
            self._fail("train.steps", "must be at least 1")
        for key in ("ce", "kl", "reverse_kl", "squarehead"):
            if getattr(self, key) < 0:
                self._fail(key, "must be >= 0")
        if self.ce + self.kl + self.reverse_kl + self.squarehead <= 0:
            self._fail("kl", "at least one of ce, kl, reverse_kl, squarehead must be > 0")
        if self.temperature <= 0:
            self._fail("temperature", "must be > 0")
