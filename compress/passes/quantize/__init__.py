"""``quantize``: group-wise low-bit weights (8/4/3/2-bit) with recovery distillation."""

from ...registry import register_pass
from .config import QuantizeConfig

register_pass(
    "quantize",
    config=QuantizeConfig,
    entry="compress.passes.quantize.run:quantize",
    summary="group-wise int weights (RTN / clip search / GPTQ init, Block-AP, KD recovery: STE or PV)",
    needs_data=True,
    needs_teacher=True,
)
