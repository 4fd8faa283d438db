"""Exporters: turn a compress artifact into a runtime format (ONNX first)."""
