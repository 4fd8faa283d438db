"""``quantize``: group-wise low-bit weights (8/4/3/2-bit) with recovery distillation."""

from ...registry import register_pass
from .config import QuantizeConfig

register_pass(
    "quantize",
    config=QuantizeConfig,
    entry="compress.passes.quantize.run:quantize",
    summary="group-wise int weights (RTN / clip search / GPTQ init, Block-AP, KD recovery: STE or PV)",
    # algorithm 1: first release; 2: Block-AP rolls a layer back when its calibration error does not drop
    # (aa15d6f); 3: the parent's tokenizer files copied verbatim, sparsity masks in masks.safetensors;
    # 4: groups fall to a divisor of the input size, scales rounded to fp16 values (fp16_scales);
    # 5: Block-AP under bf16 autocast where measured fast (block_ap_bf16: auto);
    # 6: straight-through latents start inside their rounding cell towards the parent's weights
    algorithm=6,
    accepts=("hf",),
    produces="quantized",
    uses=("data", "teacher"),
)
