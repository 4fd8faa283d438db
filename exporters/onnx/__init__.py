"""ONNX export of decoder-only LMs with KV cache, fused ONNX Runtime operators and validation.

Modules: ``specs`` (architecture -> weights), ``graph`` (ONNX writer), ``decoder`` (the
graph), ``genai`` (onnxruntime-genai config), ``runtime`` (torch-free ONNX Runtime runner),
``validate`` (ONNX vs PyTorch), ``export`` (orchestration).
"""
