"""Latency profiling of exported (ONNX) and eager (PyTorch) models on CPU and CUDA targets."""
