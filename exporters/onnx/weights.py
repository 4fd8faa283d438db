"""Read an export's weights back: how many of each matrix's weights are exactly zero.

A sparse model's zeros must survive quantization and export. In a ``MatMulNBits`` weight a zero
is a code equal to its group's zero point (integer zero points dequantize it to exactly 0; with
no ``zero_points`` input the zero point is ``2^(bits-1)``); in a dense ``MatMul`` it is a 0.0 in
the initializer. Fused projections (q|k|v, gate|up) are counted as the one matrix they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Little-end-first ``bits``-bit fields of each row of ``packed`` (uint8), ``count`` per row."""
    cb = 8 if bits == 8 else (4 if bits in (3, 4) else 2)
    rows = packed.shape[0]
    flat = packed.reshape(rows, -1).astype(np.int32)
    per = 8 // cb
    parts = [(flat >> (cb * i)) & ((1 << cb) - 1) for i in range(per)]
    return np.stack(parts, axis=2).reshape(rows, -1)[:, :count]


def weight_zeros(folder: str | Path, filename: str = "model.onnx") -> list[dict[str, Any]]:
    """Per weight matrix of the graph: ``{"node", "op", "zeros", "weights", "fraction"}``."""
    import onnx
    from onnx import numpy_helper

    folder = Path(folder)
    # external data read here, not by onnx.load: onnx refuses a data file with several hard links,
    # and a pipeline's stages share theirs (the profiling stage links the export's files)
    model = onnx.load(str(folder / filename), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray | None:
        if name not in inits:
            return None
        t = inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location or Path(location).name != location:
            raise ValueError(f"{name}: external data outside the folder ({location!r})")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims)) if len(t.dims) else 1
        with open(folder / location, "rb") as f:
            f.seek(int(info.get("offset", 0)))
            raw = f.read(int(info.get("length", count * dtype.itemsize)))
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(t.dims))

    rows = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
            packed = array(node.input[1])
            if packed is None:
                continue
            kb = -(-k // block)
            codes = _unpack(packed.reshape(n, -1), bits, kb * block)[:, :k]
            zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
            if zp_name is not None and array(zp_name) is not None:
                zp = _unpack(array(zp_name).reshape(n, -1), bits, kb)
            else:
                zp = np.full((n, kb), 1 << (bits - 1), dtype=np.int32)
            zp_full = np.repeat(zp, block, axis=1)[:, :k]
            zeros = int((codes == zp_full).sum())
            rows.append({"node": node.name, "op": "MatMulNBits", "zeros": zeros, "weights": n * k,
                         "fraction": zeros / (n * k)})
        elif node.op_type in ("MatMul", "Gemm"):
            w = array(node.input[1])
            if w is None or w.ndim != 2:
                continue
            zeros = int((w == 0).sum())
            rows.append({"node": node.name, "op": node.op_type, "zeros": zeros, "weights": int(w.size),
                         "fraction": zeros / max(w.size, 1)})
    return rows
