from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...config import Config, help_field
from ...training.section import TrainSection


@dataclass(frozen=True, kw_only=True)
class PATConfig(Config):
    """Pruning-aware tuning of the hidden dimension (PAT; Liu et al. 2024): one shared trainable
    mask over the residual channels learned while the model is tuned, then the model is sliced to
    ``hidden`` channels."""

    VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "pat"

    hidden: int = help_field(448, "d': residual channels kept (a multiple of 32, below the model's hidden_size and "
                                  "at least its key/value width)")
    method: Literal["pat", "magnitude", "activation"] = help_field(
        "pat", "pat: the channels are learned while the model is tuned; magnitude / activation: the prune-then-tune "
               "baselines - channels chosen one-shot (their share of the weights that write and read them / of the "
               "residual stream's energy on the calibration sequences), the model sliced, then tuned with the same "
               "losses for the same steps")
    mask_init: Literal["zero", "magnitude", "activation"] = help_field(
        "activation", "pat: where theta starts. activation (default) / magnitude: ranked by that baseline's one-shot "
                      "channel scores, theta spread over mask_init_spread so that the top d' start kept (the mask is "
                      "then within 2 % of 1 at step 0, not exactly 1) and tuning refines the ranking; zero: the "
                      "authors' (every channel equal, the ranking learned from nothing: measured on SmolLM2 at "
                      "576 -> 448 with 100 steps, x1.886 the teacher's perplexity against x1.216 from activation)")
    mask_init_spread: float = help_field(0.1, "magnitude / activation mask_init: theta spans this range, in rank order")
    calibration_blocks: int = help_field(16, "activation (method or mask_init): sequences the residual energy is "
                                             "measured on")
    tuning: Literal["full", "lora"] = help_field(
        "full", "full: every weight of the model is tuned; lora: the decoder Linears get low-rank adapters "
                "(folded in when the model is sliced), the rest stays frozen")
    lora_rank: int = help_field(20, "lora: adapter rank (the authors' 20)")
    lora_alpha: float = help_field(4.0, "lora: adapter scale alpha (scaling alpha / rank; the authors' 4)")
    rank: int = help_field(200, "rank of each HSM's transform B A (the authors' 200)")
    train: TrainSection = help_field(
        TrainSection(steps=200, lr=5e-5, warmup_steps=10, batch_size=4, schedule="cosine", min_lr_ratio=0.1),
        "tuning: steps (the mask schedule's G), lr of the model's weights, schedule, batch, bf16, checkpoints")
    mask_lr: float = help_field(
        0.01, "learning rate of the mask logits theta; with Adam theta moves about mask_lr per step, so it is "
              "scaled to the step budget (the authors' 5e-5 over 10,000 steps covers the same +-0.5)")
    hsm_lr: float = help_field(1e-3, "learning rate of the HSM transforms and scales")
    count: float = help_field(
        10.0, "weight of the count loss |#kept - d'| / d' (the authors' 10: against the polarization it pulls as "
              "hard per channel at 576 -> 448 as at 4096 -> 3072; its balance against CE is measured by "
              "benchmarks/pat.py --balance)")
    polarization: float = help_field(1.0, "weight of the polarization of theta towards +-0.5 (the authors' 1)")
    identity: float = help_field(1.0, "weight of the identity loss MSE(A A^T, I), summed over the HSMs (the authors' 1)")
    ce: float = help_field(1.0, "weight of next-token cross entropy (the authors' loss)")
    kl: float = help_field(1.0, "weight of forward KL(teacher || student) on logits")
    squarehead: float = help_field(0.0, "weight of SquareHead (normalized per-block MSE to the teacher)")
    temperature: float = help_field(1.0, "softmax temperature of the KL term")
    heldout_blocks: int = help_field(4, "sequences held out of training to report the pruned model's KL")

    def validate(self) -> None:
        if self.hidden < 32 or self.hidden % 32:
            self._fail("hidden", f"must be a positive multiple of 32 (MatMulNBits blocks run along it), got "
                                 f"{self.hidden}")
        if self.train.steps < 10:
            self._fail("train.steps", f"the mask schedule needs at least 10 steps, got {self.train.steps}")
        for key in ("lora_rank", "rank", "calibration_blocks"):
            if getattr(self, key) < 1:
                self._fail(key, "must be at least 1")
        if self.lora_alpha <= 0:
            self._fail("lora_alpha", "must be > 0")
        if not 0 < self.mask_init_spread <= 1:
            self._fail("mask_init_spread", f"must be in (0, 1], got {self.mask_init_spread}")
        for key in ("mask_lr", "hsm_lr"):
            if not 0 < getattr(self, key) < 10:
                self._fail(key, f"must be in (0, 10), got {getattr(self, key)}")
        self._nonnegative("count", "polarization", "identity", "ce", "kl", "squarehead", "heldout_blocks")
        if self.count <= 0:
            self._fail("count", "must be > 0: without it the mask has no reason to drop a channel")
        if self.ce + self.kl + self.squarehead <= 0:
            self._fail("ce", "at least one of ce, kl, squarehead must be > 0")
        if self.temperature <= 0:
            self._fail("temperature", "must be > 0")

    def check_dims(self, dims: dict[str, Any]) -> None:
        """Plan time, torch-free: d' below the model's hidden size and not below its key/value width
        (with fewer residual channels than k/v outputs every head's keys and values lose rank)."""
        d = dims.get("hidden_size")
        if isinstance(d, int) and self.hidden >= d:
            self._fail("hidden", f"must be below the model's hidden_size {d}, got {self.hidden}")
        kv = dims.get("kv_width")
        if isinstance(kv, int) and self.hidden < kv:
            self._fail("hidden", f"{self.hidden} is too small for the heads: at least the key/value width "
                                 f"{kv} (num_key_value_heads x head_dim)")

    def output_dims(self, dims: dict[str, Any]) -> dict[str, Any]:
        """The input sizes the next stage sees: q/k/v and gate/up now read ``hidden`` channels."""
        return {**dims, "hidden_size": self.hidden}

    def training_sequences(self) -> int:
        return self.heldout_blocks + self.train.steps * self.train.batch_size * self.train.grad_accum
