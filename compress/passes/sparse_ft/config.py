from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...config import Config, help_field
from ...training.section import TrainSection


@dataclass(frozen=True, kw_only=True)
class SparseFTConfig(Config):
    """One-shot pruning of every decoder Linear, then sparse fine-tuning with the masks fixed
    (SquareHead distillation from the teacher; Kurtic et al. 2023)."""

    VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "sparse_ft"

    method: Literal["sparsegpt", "wanda", "magnitude"] = help_field(
        "sparsegpt", "one-shot pruning: sparsegpt (OBS updates of the kept weights), wanda (|W| x ||X|| per output "
        "row), magnitude (|W| per tensor)")
    sparsity: float = help_field(
        0.5, "fraction of each decoder Linear's weights set to zero (0.1-0.9); with an N:M pattern it must be 1 - N/M")
    pattern: str = help_field("unstructured", "unstructured, or N:M (at most N of every M consecutive inputs kept: 2:4, 4:8)")
    ratios: Literal["uniform", "owl"] = help_field(
        "uniform", "per-layer sparsity: uniform, or owl (layers with more outlier activations pruned less; "
        "unstructured only)")
    owl_lambda: float = help_field(0.08, "owl: the per-layer sparsity spreads over sparsity +- owl_lambda")
    owl_m: float = help_field(5.0, "owl: a Wanda score above owl_m x the layer mean counts as an outlier")
    calibration_blocks: int = help_field(32, "calibration sequences (of data.seq_len tokens) for sparsegpt/wanda/owl")
    damp: float = help_field(0.01, "sparsegpt dampening, fraction of the mean Hessian diagonal")
    block_size: int = help_field(128, "sparsegpt: columns per block (the mask of each block is chosen on its updated weights)")
    train: TrainSection = help_field(
        TrainSection(steps=100, lr=3e-5, warmup_steps=5, batch_size=4, schedule="linear"),
        "sparse fine-tuning with the masks fixed (steps 0: one-shot only); the authors' rates: 3e-5 up to 50 %, "
        "1e-4 at 60 %, 8e-5 at 70 %, 1e-4 above and for N:M")
    ce: float = help_field(1.0, "weight of next-token cross entropy (the authors' 1)")
    kl: float = help_field(0.0, "weight of forward KL(teacher || student) on logits (the authors' 0)")
    squarehead: float = help_field(1.0, "weight of SquareHead: per-block normalized MSE to the teacher, summed over blocks")
    temperature: float = help_field(1.0, "softmax temperature of the KL term")
    heldout_blocks: int = help_field(4, "sequences held out of training to report KL before/after fine-tuning")

    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = (int(x) for x in self.pattern.split(":"))
        return n, m

    def validate(self) -> None:
        from ...masks import check_pattern

        try:
            check_pattern(self.pattern)
        except ValueError as exc:
            self._fail("pattern", str(exc).replace("sparsity pattern ", ""))
        nm = self.n_m()
        if not 0.1 <= self.sparsity <= 0.9 and nm is None:
            self._fail("sparsity", f"must be in 0.1..0.9, got {self.sparsity}")
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                self._fail("sparsity", f"pattern {self.pattern} prunes {implied:g} of the weights; sparsity "
                                       f"{self.sparsity:g} contradicts it (set sparsity={implied:g})")
            if self.ratios == "owl":
                self._fail("ratios", "owl sets per-layer fractions; an N:M pattern fixes them (use uniform)")
            if nm[1] > 256:
                self._fail("pattern", f"M of at most 256, got {nm[1]}")
        if not 0 <= self.owl_lambda < min(self.sparsity, 1 - self.sparsity) + 1e-12 and self.ratios == "owl":
            self._fail("owl_lambda", f"must be in [0, {min(self.sparsity, 1 - self.sparsity):g}) at sparsity {self.sparsity:g}")
        if self.owl_m <= 0:
            self._fail("owl_m", "must be > 0")
        if self.calibration_blocks < 1:
            self._fail("calibration_blocks", "must be at least 1")
        if not 0 <= self.damp < 1:
            self._fail("damp", "must be in [0, 1)")
        if self.block_size < 1:
            self._fail("block_size", "must be at least 1")
        self._nonnegative("ce", "kl", "squarehead", "heldout_blocks")
        if self.train.steps > 0 and self.ce + self.kl + self.squarehead <= 0:
            self._fail("ce", "at least one of ce, kl, squarehead must be > 0")
        if self.temperature <= 0:
            self._fail("temperature", "must be > 0")

    def check_dims(self, dims: dict[str, Any]) -> None:
        """Plan time, torch-free: an N:M pattern must divide every pruned Linear's input size."""
        nm = self.n_m()
        if nm is None:
            return
        from ...sources import LINEAR_INPUTS

        for what in LINEAR_INPUTS:
            k = dims.get(what)
            if isinstance(k, int) and k % nm[1]:
                self._fail("pattern", f"{self.pattern} needs input sizes that are multiples of {nm[1]}; the model's "
                                      f"{what} is {k}")

    def training_sequences(self) -> int:
        train = self.train.steps * self.train.batch_size * self.train.grad_accum
        return self.heldout_blocks + max(self.calibration_blocks, train)
