from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import Config, help_field


@dataclass(frozen=True, kw_only=True)
class ProfileLatencyConfig(Config):
    """Latency profile of the input model on a target (the model is passed on unchanged)."""

    VERSION: ClassVar[int] = 2  # config schema (2: `target` defaults to the pipeline's)
    SECTION: ClassVar[str] = "profile_latency"

    target: str = help_field("", "target: empty = the pipeline's target; else cpu, cpu:THREADS, cuda or a .yaml")
    prompt_tokens: int = help_field(128, "prompt length, tokens")
    new_tokens: int = help_field(128, "generated tokens per run")
    runs: int = help_field(5, "timed runs (median, min–max reported)")
    warmup: int = help_field(1, "untimed warm-up runs")
    eager_baseline: bool = help_field(True, "also profile the pipeline's input model in PyTorch eager")

    def validate(self) -> None:
        if self.prompt_tokens < 1:
            self._fail("prompt_tokens", "must be at least 1")
        if self.new_tokens < 2:
            self._fail("new_tokens", "must be at least 2")
        if self.runs < 1:
            self._fail("runs", "must be at least 1")
        if self.warmup < 0:
            self._fail("warmup", "must be >= 0")
        if self.target:
            from ...target import load_target

            load_target(self.target)  # an unknown target or a bad target file fails when the profile loads

    def preflight(self) -> None:
        if self.target:
            from ...target import load_target

            load_target(self.target).preflight()
