from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import Config, help_field


@dataclass(frozen=True, kw_only=True)
class ExportOnnxConfig(Config):
    """ONNX export of the current model (decoder with KV cache, GroupQueryAttention, fused norms)."""

    VERSION: ClassVar[int] = 1  # config schema (algorithm versions: registered in __init__.py)
    SECTION: ClassVar[str] = "export_onnx"

    precision: Literal["fp32", "fp16"] = help_field("fp32", "weight and activation precision of the export")
    provider: Literal["cpu", "cuda"] = help_field("cpu", "execution provider named in genai_config.json")
    validation: bool = help_field(True, "compare with PyTorch (logits, greedy tokens); a mismatch fails the export")
    rtol: float = help_field(0.0, "relative logit tolerance (0 = 1e-3 for fp32, 2e-2 for fp16)")
    greedy_tokens: int = help_field(32, "greedy tokens per validation prompt that must equal PyTorch's")
    accuracy_level: int = help_field(
        4, "MatMulNBits accuracy_level of quantized Linears: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations "
        "(fastest on CPU)")

    def validate(self) -> None:
        if self.rtol < 0:
            self._fail("rtol", "must be >= 0")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            self._fail("accuracy_level", f"must be 0..4, got {self.accuracy_level}")
        if not 1 <= self.greedy_tokens <= 512:
            self._fail("greedy_tokens", "must be in 1..512")
