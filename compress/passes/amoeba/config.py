from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...config import Config, help_field
from ...training.section import TrainSection


@dataclass(frozen=True, kw_only=True)
class AmoebaConfig(Config):
    """AmoebaLLM (Tang et al. 2024): one fine-tuning of a supernet whose every depth x width subnet
    is usable, then a measured size / accuracy / latency table of its subnets to pick from."""

    VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "amoeba"

    min_layers: int = help_field(0, "the shallowest subnet's layers (0: 5/8 of the model's, the authors' 20 of 32)")
    keep_last: int = help_field(1, "top layers no subnet drops (the authors' dp_keep_last_layer)")
    widths: tuple[float, ...] = help_field(
        (1.0, 0.875, 0.75, 0.625), "width choices: the share of MLP channels (rounded to 32) and of query heads per "
                                   "key/value group (rounded, at least 1) every layer keeps; the first must be 1")
    depths: tuple[int, ...] = help_field(
        (), "the table's depths (empty: 4 evenly spaced from the model's layers down to min_layers)")
    dp_sequences: int = help_field(256, "calibration sequences of the DP's loss metric (cut from the training blocks)")
    dp_seq_len: int = help_field(128, "tokens per DP calibration sequence")
    dp_loss_stride: int = help_field(4, "the DP's loss on every N-th position of each sequence (the LM head is a "
                                        "fifth of a forward; the layers still see every token)")
    flap_blocks: int = help_field(32, "training blocks FLAP's channel statistics are measured on")
    compensate: bool = help_field(True, "FLAP bias compensation: a dropped channel is replaced by its mean")
    experts: int = help_field(5, "LoRA experts per Linear (the authors' 5)")
    lora_rank: int = help_field(8, "rank of every expert")
    lora_alpha: float = help_field(16.0, "expert scale alpha (scaling alpha / rank)")
    router_hidden: int = help_field(16, "the router's hidden width (the authors' 16)")
    top_k: int = help_field(2, "experts mixed per subnet (the authors' top-2)")
    random_subnets: int = help_field(2, "sandwich rule: random subnets per micro-batch besides the full and the "
                                        "smallest (the authors' 2)")
    ce: float = help_field(1.0, "the full model's cross entropy weight")
    kl: float = help_field(1.0, "the full model's KL to the teacher")
    kd: float = help_field(1.0, "a subnet's loss: kd * KL to the full model's (detached) logits + (1 - kd) * CE "
                                "(the authors' in-place distillation, kd 1)")
    balance: bool = help_field(True, "loss-magnitude balancing: each subnet's loss scaled to the full model's")
    temperature: float = help_field(1.0, "softmax temperature of the KL terms")
    tuning: Literal["lora", "full"] = help_field(
        "lora", "what the sandwich trains: the experts and the router, the base frozen (lora, the authors'), or "
                "also the decoder's Linear weights at base_lr (full: one set of base weights every subnet shares; "
                "a sparse parent's zeros held exactly; the stage then saves its own base weights)")
    base_lr: float = help_field(5e-5, "tuning full: peak learning rate of the base weights (train.lr is the "
                                      "adapters'; same schedule)")
    train: TrainSection = help_field(
        TrainSection(steps=60, lr=2e-4, warmup_steps=5, batch_size=2, schedule="cosine", min_lr_ratio=0.1),
        "sandwich training of the experts and the router (and the base weights under tuning full)")
    heldout_blocks: int = help_field(4, "training blocks held out (the full subnet's KL before / after)")
    latency_points: int = help_field(6, "grid points whose latency is measured (an ONNX export each, the corners "
                                        "and the middle first); the rest are predicted from them")
    latency_bits: Literal["4", "8", "fp32"] = help_field(
        "4", "precision the table's latency and size are measured at: 4 / 8-bit group-wise MatMulNBits "
             "(round-to-nearest: the shapes decide latency, not the values) or fp32")
    latency_group: int = help_field(128, "group size of the table's quantized exports (64 along a 448 / 960 width)")
    prompt_tokens: int = help_field(128, "latency: prompt tokens (TTFT)")
    new_tokens: int = help_field(64, "latency: generated tokens per run")
    runs: int = help_field(5, "latency: timed runs per point and round (median)")
    latency_rounds: int = help_field(3, "latency: rounds, each profiling every measured point once in a fresh "
                                        "worker (the median over rounds: a slow spell of the machine moves one "
                                        "round of every point, not one point)")

    def validate(self) -> None:
        if self.min_layers < 0:
            self._fail("min_layers", "must be >= 0 (0: 5/8 of the model's layers)")
        if self.keep_last < 0:
            self._fail("keep_last", "must be >= 0")
        if not self.widths or self.widths[0] != 1.0:
            self._fail("widths", f"must start with 1.0 (the full width), got {list(self.widths)}")
        if any(not 0 < w <= 1 for w in self.widths) or len(set(self.widths)) != len(self.widths):
            self._fail("widths", f"must be distinct fractions in (0, 1], got {list(self.widths)}")
        if list(self.widths) != sorted(self.widths, reverse=True):
            self._fail("widths", f"must be in decreasing order, got {list(self.widths)}")
        if any(d < 1 for d in self.depths):
            self._fail("depths", "must be positive layer counts")
        for key in ("dp_sequences", "dp_loss_stride", "flap_blocks", "experts", "lora_rank", "router_hidden", "top_k", "runs",
                    "latency_points", "latency_rounds"):
            if getattr(self, key) < 1:
                self._fail(key, "must be at least 1")
        if self.dp_seq_len < 2:
            self._fail("dp_seq_len", "must be at least 2")
        if self.top_k > self.experts:
            self._fail("top_k", f"must be at most experts ({self.experts})")
        if self.random_subnets < 0:
            self._fail("random_subnets", "must be >= 0")
        if not 0 <= self.kd <= 1:
            self._fail("kd", f"must be in [0, 1], got {self.kd}")
        if self.ce + self.kl <= 0:
            self._fail("ce", "the full model needs a loss: ce + kl must be > 0")
        self._nonnegative("ce", "kl", "heldout_blocks")
        if self.base_lr <= 0:
            self._fail("base_lr", "must be > 0")
        if self.lora_alpha <= 0 or self.temperature <= 0:
            self._fail("lora_alpha" if self.lora_alpha <= 0 else "temperature", "must be > 0")
        if self.latency_group < 16 or self.latency_group & (self.latency_group - 1):
            self._fail("latency_group", f"must be a power of two >= 16, got {self.latency_group}")
        if self.prompt_tokens < 1 or self.new_tokens < 2:
            self._fail("prompt_tokens" if self.prompt_tokens < 1 else "new_tokens", "too small")

    def resolved_min_layers(self, num_layers: int) -> int:
        return self.min_layers or max(1, math.ceil(num_layers * 5 / 8))

    def table_depths(self, num_layers: int) -> list[int]:
        lo = self.resolved_min_layers(num_layers)
        if self.depths:
            return sorted(set(self.depths), reverse=True)
        return sorted({round(num_layers - k * (num_layers - lo) / 3) for k in range(4)}, reverse=True)

    def check_dims(self, dims: dict[str, Any]) -> None:
        """Plan time, torch-free: the depths fit the model's layers, and the shallowest subnet keeps
        the layers no subnet drops."""
        n = dims.get("num_layers")
        if not isinstance(n, int):
            return
        lo = self.resolved_min_layers(n)
        if lo > n:
            self._fail("min_layers", f"{lo} exceeds the model's {n} layers")
        if n - lo > n - self.keep_last:
            self._fail("keep_last", f"{self.keep_last} top layers kept leaves fewer than min_layers {lo} to drop from")
        bad = [d for d in self.depths if not lo <= d <= n]
        if bad:
            self._fail("depths", f"{bad} outside min_layers .. layers ({lo} .. {n})")

    def training_sequences(self) -> int:
        """Blocks of training text: for the sandwich, FLAP's statistics and the DP's calibration
        sequences (cut from blocks of the default 512 tokens), besides the held-out ones."""
        dp = -(-self.dp_sequences * self.dp_seq_len // 512)
        return self.heldout_blocks + max(self.train.steps * self.train.batch_size * self.train.grad_accum,
                                         self.flap_blocks, dp)


@dataclass(frozen=True, kw_only=True)
class PickConfig(Config):
    """Take the most accurate subnet of a supernet's table that meets every given budget, as a plain
    dense model (adapters merged, shapes sliced)."""

    VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "pick"

    max_size_mb: float = help_field(0.0, "bytes on disk at the table's precision, MB (0: no limit)")
    max_ms_per_token: float = help_field(0.0, "median decode step, ms (0: no limit)")
    max_ttft_ms: float = help_field(0.0, "time to first token for the table's prompt, ms (0: no limit)")
    max_ppl: float = help_field(0.0, "perplexity on the primary evaluation domain (0: no limit)")
    depth: int = help_field(0, "take this depth (with width) instead of a budget (0: by budget)")
    width: float = help_field(0.0, "take this width fraction (with depth) instead of a budget")
    margin: float = help_field(0.0, "a predicted latency must meet the budget by this share (0.05 = 5 % below) "
                                    "to be tried; the pick is always measured")

    def validate(self) -> None:
        self._nonnegative("max_size_mb", "max_ms_per_token", "max_ttft_ms", "max_ppl", "depth", "width", "margin")
        if (self.depth > 0) != (self.width > 0):
            self._fail("depth", "give depth and width together (or neither, to pick by budget)")
        if self.margin >= 1:
            self._fail("margin", "must be below 1")

    def output_dims(self, dims: dict[str, Any]) -> dict[str, Any]:
        """Picked by budget, the depth and widths are known only when the pass runs (asked: the depth)."""
        out = {k: v for k, v in dims.items() if k not in ("num_layers", "intermediate_size", "num_heads",
                                                           "attention_width")}
        if self.depth:
            out["num_layers"] = self.depth
        return out

    def budgets(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("max_size_mb", "max_ms_per_token", "max_ttft_ms", "max_ppl")
                if getattr(self, k) > 0}
