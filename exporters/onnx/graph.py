"""A small ONNX graph writer: nodes, typed inputs/outputs, initializers in one external file.

Initializers are streamed to ``model.onnx.data`` as they are added (page-aligned, so ONNX
Runtime can map them), which keeps peak memory at one tensor and has no 2 GB protobuf limit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MS = "com.microsoft"
DATA_FILE = "model.onnx.data"
_ALIGN = 64  # external-data offsets: cache-line aligned (ONNX Runtime maps unaligned offsets itself;
# page alignment cost ~2 KB per tensor, 0.7 MB on a 4-bit 135M model)
_SMALL = 1024  # tensors below this many bytes stay inside model.onnx

NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
    np.dtype("uint8"): TensorProto.UINT8,
    np.dtype("uint8"): TensorProto.UINT8,
}


class Graph:
    """Accumulates a graph; ``save`` writes ``model.onnx`` next to the streamed data file."""

    def __init__(self, folder: Path, name: str = "compress"):
        self.folder = Path(folder)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._data = open(self.folder / DATA_FILE, "wb")
        self._offset = 0
        self._counter = 0

    # ---------------------------------------------------------------- tensors and values

    def initializer(self, name: str, array: np.ndarray, *, scalar: bool = False) -> str:
        array = np.ascontiguousarray(array)  # (at least 1-d)
        if scalar:
            array = array.reshape(())
        if name in self._names:
            raise ValueError(f"duplicate graph name {name}")
        self._names.add(name)
        dtype = NP_TO_ONNX[array.dtype]
        if array.nbytes < _SMALL:
            self.initializers.append(helper.make_tensor(name, dtype, array.shape, array.tobytes(), raw=True))
            return name
        pad = (-self._offset) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(array.tobytes())
        t = TensorProto(name=name, data_type=dtype, dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._offset += array.nbytes
        self.initializers.append(t)
        return name

    def const(self, array, dtype=np.int64, *, scalar: bool = False) -> str:
        """A small constant (inline initializer) with a generated name; ``scalar``: of shape ()."""
        array = np.asarray(array, dtype=dtype)
        self._counter += 1
        return self.initializer(f"const_{self._counter}", array, scalar=scalar)

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self._names.add(name)
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # --------------------------------------------------------------------------- nodes

    def node(self, op: str, inputs: list[str], name: str, *, n_out: int = 1, outputs: list[str] | None = None,
             domain: str = "", **attrs) -> list[str]:
        """Add a node; outputs default to ``name/output_i``. Returns the output names."""
        if outputs is None:
            outputs = [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def op(self, op: str, inputs: list[str], name: str, *, domain: str = "", **attrs) -> str:
        return self.node(op, inputs, name, domain=domain, **attrs)[0]

    # --------------------------------------------------------------------------- output

    def save(self, filename: str = "model.onnx", metadata: dict[str, str] | None = None) -> Path:
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
            producer_name="compress",
        )
        model.ir_version = 10
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, str(v)
        path = self.folder / filename
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        return path

    def abort(self) -> None:
        self._data.close()
