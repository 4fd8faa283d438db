"""The training section every training pass embeds (``train:`` in its config), torch-free.

A pass declares ``train: TrainSection = help_field(TrainSection(steps=..., lr=...), "...")``
with its own defaults; profiles and ``--set`` reach every field as ``<pass>.train.<key>``
(or ``<pass>.<key>`` where unambiguous). :meth:`TrainSection.settings` is the one place it
maps onto the loop's :class:`compress.training.loop.TrainSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import Config, help_field


@dataclass(frozen=True, kw_only=True)
class TrainSection(Config):
    """Optimizer steps, schedule, batching, clipping, precision, checkpoints and data order."""

    SECTION: ClassVar[str] = "train"

    steps: int = help_field(100, "optimizer steps")
    lr: float = help_field(2e-5, "peak learning rate (AdamW)")
    schedule: Literal["cosine", "linear", "constant"] = help_field(
        "cosine", "after warm-up: cosine or linear decay to lr * min_lr_ratio, or constant")
    warmup_steps: int = help_field(10, "linear warm-up steps")
    min_lr_ratio: float = help_field(0.1, "the decay ends at lr * min_lr_ratio")
    batch_size: int = help_field(4, "sequences per micro-batch (per process)")
    grad_accum: int = help_field(1, "micro-batches per optimizer step")
    max_grad_norm: float = help_field(1.0, "gradient clipping norm (0 = off)")
    weight_decay: float = help_field(0.0, "AdamW weight decay")
    bf16: Literal["auto", "on", "off"] = help_field("auto", "bf16 autocast: auto = where the hardware has fast bf16")
    checkpoint_every: int = help_field(25, "save a resumable checkpoint every N steps (0 = never)")
    seed: int = help_field(0, "data-order seed")

    def validate(self) -> None:
        if self.steps < 0:
            self._fail("steps", "must be >= 0")
        if not 0 < self.lr < 1:
            self._fail("lr", f"must be in (0, 1), got {self.lr}")
        if self.warmup_steps < 0:
            self._fail("warmup_steps", "must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            self._fail("min_lr_ratio", "must be in [0, 1]")
        if self.batch_size < 1 or self.grad_accum < 1:
            self._fail("batch_size" if self.batch_size < 1 else "grad_accum", "must be at least 1")
        for key in ("max_grad_norm", "weight_decay", "checkpoint_every"):
            if getattr(self, key) < 0:
                self._fail(key, "must be >= 0")

    def settings(self, loss: Any) -> tuple[Any, str]:
        """``(TrainSettings, why bf16 is on/off)`` for the shared loop (imports torch)."""
        from ..hardware import resolve_bf16
        from .loop import TrainSettings

        bf16, why = resolve_bf16(self.bf16)
        return TrainSettings(
            steps=self.steps, lr=self.lr, schedule=self.schedule, warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio, batch_size=self.batch_size, grad_accum=self.grad_accum,
            max_grad_norm=self.max_grad_norm, weight_decay=self.weight_decay, seed=self.seed,
            checkpoint_every=self.checkpoint_every, bf16=bf16, loss=loss,
        ), why
