from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...config import Config, help_field
from ...training.section import TrainSection


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(Config):
    """Weight-only group-wise quantization of every decoder Linear, then recovery distillation."""

    VERSION: ClassVar[int] = 4  # config schema (2: the recovery training fields moved into `train`, threads to the
    # target; 3: embed_sym, fp16_scales, group_size falls to a divisor of the input size; 4: block_ap_bf16)
    SECTION: ClassVar[str] = "quantize"

    bits: int = help_field(4, "bits per decoder weight: 8, 4, 3 or 2 (3-bit codes export in 4-bit containers)")
    group_size: int = help_field(
        128, "weights per scale along the input dimension (power of two, 16-256); a Linear whose input size it "
        "does not divide takes the largest power of two >= 16 that does (no zero-padded blocks)")
    sym: bool = help_field(False, "symmetric (zero point 2^(bits-1)) instead of integer zero points")
    bits_overrides: dict[str, Any] = help_field(
        {}, "regex on module names -> bits; {last} is the last layer's index, e.g. "
        "{'layers\\.(0|{last})\\.mlp\\.down_proj$': 4}")
    embeddings: Literal["keep", "8", "4"] = help_field(
        "8", "tied embedding/lm_head: keep fp32, or 8/4-bit (one stored matrix serves both)")
    embed_group_size: int = help_field(32, "group size of the quantized embedding/head (must divide hidden_size)")
    embed_sym: bool = help_field(False, "symmetric codes for the quantized embedding/head (no zero points)")
    fp16_scales: bool = help_field(
        True, "round every scale to an fp16 value at the end, so that the export stores scales in half the bytes")
    init: Literal["rtn", "clip", "gptq"] = help_field(
        "gptq", "initialization: rtn (min-max), clip (grid search on layer output error), gptq (no act-order)")
    calibration_blocks: int = help_field(32, "calibration sequences (of data.seq_len tokens) for clip/gptq/Block-AP")
    gptq_damp: float = help_field(0.01, "GPTQ dampening, fraction of the mean Hessian diagonal")
    gptq_mse_clip: bool = help_field(True, "GPTQ: choose each group's range by weight MSE among the clip shrinks")
    clip_grid: int = help_field(6, "clip search: shrink ratios tried per side (0% .. clip_max_shrink)")
    clip_max_shrink: float = help_field(0.5, "clip search: largest shrink of the range per side")
    block_ap: Literal["auto", "on", "off"] = help_field(
        "auto", "block-wise reconstruction (EfficientQAT Block-AP) before recovery; auto = on below 4 bits")
    block_ap_steps: int = help_field(64, "Block-AP optimizer steps per decoder layer")
    block_ap_lr: float = help_field(3e-4, "Block-AP learning rate of scales and zero points")
    block_ap_weight_lr: float = help_field(
        3e-3, "Block-AP learning rate of the straight-through weights (0 = train scales and zero points only)")
    block_ap_batch: int = help_field(2, "Block-AP sequences per step")
    block_ap_bf16: Literal["auto", "on", "off"] = help_field(
        "auto", "Block-AP matmuls under bf16 autocast: auto = where this machine measured bf16 fast")
    recovery: Literal["ste", "pv", "scales", "none"] = help_field(
        "scales", "end-to-end recovery: scales (codes frozen; scales, zero points, norms trained: EfficientQAT E2E-QP), "
        "ste (+ straight-through weights), pv (PV-Tuning: + capped discrete code updates), none")
    train: TrainSection = help_field(
        TrainSection(steps=100, lr=2e-4, warmup_steps=5, batch_size=2, bf16="off"),
        "recovery training: steps, lr (scales, zero points, norms), schedule, batch, clipping, checkpoints, seed "
        "(bf16 off: a scale step is below bf16's resolution of the weight, measured to undo the recovery)")
    weight_lr: float = help_field(1e-5, "recovery learning rate of the straight-through weights (ste / pv)")
    train_norms: bool = help_field(True, "also train RMSNorm weights during recovery")
    pv_max_change: float = help_field(0.01, "pv: largest fraction of codes re-rounded per step")
    kl: float = help_field(1.0, "weight of forward KL(teacher || student) on logits")
    squarehead: float = help_field(0.0, "weight of SquareHead (per-block normalized MSE)")
    ce: float = help_field(0.0, "weight of next-token cross entropy")
    temperature: float = help_field(1.0, "softmax temperature of the KL term")
    heldout_blocks: int = help_field(4, "sequences held out of recovery to compare KL before/after (keep the better)")

    def validate(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            self._fail("bits", f"must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size < 16 or self.group_size > 256 or self.group_size & (self.group_size - 1):
            self._fail("group_size", f"must be a power of two in 16..256, got {self.group_size}")
        if self.embed_group_size < 16 or self.embed_group_size & (self.embed_group_size - 1):
            self._fail("embed_group_size", f"must be a power of two >= 16, got {self.embed_group_size}")
        for pattern, b in self.bits_overrides.items():
            try:
                re.compile(pattern.replace("{last}", "0"))
            except re.error as exc:
                self._fail("bits_overrides", f"bad regex {pattern!r}: {exc}")
            if b not in (2, 3, 4, 8):
                self._fail("bits_overrides", f"{pattern!r}: bits must be 2, 3, 4 or 8, got {b!r}")
        if self.calibration_blocks < 1:
            self._fail("calibration_blocks", "must be at least 1")
        if not 0 <= self.gptq_damp < 1:
            self._fail("gptq_damp", "must be in [0, 1)")
        if self.clip_grid < 1 or not 0 <= self.clip_max_shrink < 1:
            self._fail("clip_grid" if self.clip_grid < 1 else "clip_max_shrink", "clip_grid >= 1, clip_max_shrink in [0, 1)")
        self._nonnegative("block_ap_steps", "heldout_blocks")
        if not 0 < self.block_ap_lr < 1:
            self._fail("block_ap_lr", "must be in (0, 1)")
        self._nonnegative("block_ap_weight_lr", "weight_lr", "kl", "squarehead", "ce")
        if self.block_ap_batch < 1:
            self._fail("block_ap_batch", "must be at least 1")
        if not 0 < self.pv_max_change <= 1:
            self._fail("pv_max_change", "must be in (0, 1]")
        if self.recovery != "none" and self.train.steps > 0 and self.kl + self.squarehead + self.ce <= 0:
            self._fail("kl", "at least one of kl, squarehead, ce must be > 0")
        if self.temperature <= 0:
            self._fail("temperature", "must be > 0")

    def check_dims(self, dims: dict[str, Any]) -> None:
        """Plan time, torch-free: the quantized embedding/head's groups must divide its hidden size
        (the source's, or what a pruning stage before this one leaves)."""
        d = dims.get("hidden_size")
        if self.embeddings != "keep" and isinstance(d, int) and d % self.embed_group_size:
            self._fail("embed_group_size", f"{self.embed_group_size} does not divide the hidden_size {d} of this "
                                           "stage's input")

    def group_for(self, k: int) -> int:
        """The group of a Linear with ``k`` inputs: ``group_size``, or the largest power of two >= 16
        below it that divides ``k`` (``group_size`` itself when none does: the last block is padded)."""
        from ...quantized import dividing_group

        return dividing_group(self.group_size, k)

    def training_sequences(self) -> int:
        # calibration takes the first training sequences, recovery draws from all of them
        train = self.train.steps * self.train.batch_size * self.train.grad_accum if self.recovery != "none" else 0
        return self.heldout_blocks + max(self.calibration_blocks, train)

    def bits_for(self, name: str, num_layers: int) -> int:
        """Bits of one module: the first matching override (``{last}`` = the last layer's index)."""
        for pattern, b in self.bits_overrides.items():
            if re.search(pattern.replace("{last}", str(num_layers - 1)), name):
                return int(b)
        return self.bits

    def use_block_ap(self, bits: int) -> bool:
        return self.block_ap == "on" or (self.block_ap == "auto" and bits < 4)
