"""``profile_latency``: latency table of the current model (and optionally the eager baseline)."""

from ...registry import register_pass
from .config import ProfileLatencyConfig

register_pass(
    "profile_latency",
    config=ProfileLatencyConfig,
    entry="compress.passes.profile_latency.run:profile_latency",
    summary="measure load time, TTFT, prefill/decode tokens/s, p50/p90, peak memory on a target",
    algorithm=1,
    accepts=("hf", "quantized", "onnx"),
    produces=None,
    uses=("target",),
    changes_model=False,
)
