"""``export_onnx``: ONNX export with KV cache, fused ONNX Runtime operators, validated against PyTorch."""

from ...registry import register_pass
from .config import ExportOnnxConfig

register_pass(
    "export_onnx",
    config=ExportOnnxConfig,
    entry="compress.passes.export_onnx.run:export_onnx",
    summary="export to ONNX (+ onnxruntime-genai config), validated: logits vs PyTorch, greedy tokens equal",
    # algorithm 1: first release; 2: position_ids input (optimum, genai), tokenizer files copied verbatim;
    # 3: rotary tables computed in the graph, fp16-valued scales stored as fp16, a quantized tied
    # head's scales and zero points stored once; 4: external data aligned to 64 bytes (was 4096);
    # 5: a residual width the heads do not divide is written to config.json as heads x head_dim
    # (optimum, transformers 5.x), the graph's width beside it
    algorithm=5,
    accepts=("hf", "quantized"),
    produces="onnx",
)
