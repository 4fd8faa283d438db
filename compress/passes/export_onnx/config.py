from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ...config import Config, help_field


@dataclass(frozen=True, kw_only=True)
class ExportOnnxConfig(Config):
    """ONNX export of the current model (decoder with KV cache, GroupQueryAttention, fused norms)."""

    VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "export_onnx"

    precision: Literal["fp32", "fp16"] = help_field("fp32", "weight and activation precision of the export")
    provider: Literal["cpu", "cuda"] = help_field("cpu", "execution provider named in genai_config.json")
    validation: bool = help_field(True, "compare with PyTorch (logits, greedy tokens); a mismatch fails the export")
    rtol: float = help_field(0.0, "relative logit tolerance (0 = 1e-3 for fp32, 2e-2 for fp16)")
    greedy_tokens: int = help_field(32, "greedy tokens per validation prompt that must equal PyTorch's")

    def validate(self) -> None:
        if self.rtol < 0:
            self._fail("rtol", "must be >= 0")
        if not 1 <= self.greedy_tokens <= 512:
            self._fail("greedy_tokens", "must be in 1..512")
