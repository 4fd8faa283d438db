"""Quantized export: ``com.microsoft.MatMulNBits`` carrying exactly the stored codes.

Every quantized Linear becomes one ``MatMulNBits`` (packed q|k|v and gate|up concatenate
their codes along N): ``B`` is the artifact's packed codes ``(N, kb, group*bits/8)`` (low
bits first, blocks along K, a partial last block zero-padded), ``scales`` its fp32 scales,
``zero_points`` its integer zero points packed the same way (omitted for symmetric codes in
their own width, whose zero point is MatMulNBits' default ``2**(bits-1)``). 3-bit codes run
in 4-bit containers. A quantized tied embedding/head is stored once: ``MatMulNBits`` for the
head and ``GatherBlockQuantized`` for the embedding read the same ``B``.

``accuracy_level`` (from the target: 4 on CPU = int8 activations per block) is written on
every node; the validation runs the graph as deployed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from compress.ops import quant as Q

from .graph import MS, Graph
from .specs import DecoderWeights, LayerWeights

PACKS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def is_quant(module: Any) -> bool:
    return module is not None and hasattr(module, "codes") and hasattr(module, "q")


def nbits_tensors(mods: list) -> dict[str, Any]:
    """Concatenated packed codes, scales and zero points of Linears sharing one format."""
    import torch

    fmt = {(m.q.bits, m.q.group, m.q.sym, m.in_features) for m in mods}
    if len(fmt) != 1:
        raise ValueError(f"packed Linears differ in format: {sorted(fmt)}")
    bits, group, sym, k = fmt.pop()
    with torch.no_grad():
        codes = torch.cat([m.codes for m in mods], dim=0)
        scale = torch.cat([m.scale.detach().float() for m in mods], dim=0)
        zero = torch.cat([m.zero.detach().round() for m in mods], dim=0)
    cb = Q.container_bits(bits)
    tensors = {
        "B": Q.pack_codes(codes, bits, group).numpy(),
        "scales": scale.numpy().reshape(-1).astype(np.float32),
        "bits": cb, "block_size": group, "K": k, "N": int(codes.shape[0]),
    }
    if not (sym and cb == bits):  # MatMulNBits' default zero point is 2**(cb-1)
        tensors["zero_points"] = Q.pack_zero_points(zero, bits).numpy().reshape(-1)
    return tensors


def nbits_linear(fallback, accuracy_level: int, dtype=np.float32):
    """A ``LinearWriter``: MatMulNBits for quantized Linears, ``fallback`` for the others."""
    def write(g: Graph, x: str, layer: LayerWeights | None, key: str, w: np.ndarray, name: str) -> str:
        keys = PACKS.get(key, (key,))
        mods = [layer.modules.get(k) for k in keys] if layer is not None else []
        if not mods or not all(is_quant(m) for m in mods):
            if any(is_quant(m) for m in mods):
                raise ValueError(f"{name}: only some of {keys} are quantized")
            return fallback(g, x, layer, key, w, name)
        t = nbits_tensors(mods)
        t["scales"] = t["scales"].astype(dtype)  # MatMulNBits scales have A's type
        return _matmul_nbits(g, x, t, name, accuracy_level)
    return write


def scales_input(g: Graph, name: str, scales: np.ndarray) -> str:
    """The scales as the graph reads them: fp32 scales that are all fp16 values are stored as fp16
    and cast back (the Cast of an initializer is folded when the session loads: half the bytes on
    disk, the same numbers at run time)."""
    if scales.dtype == np.float32:
        half = scales.astype(np.float16)
        if np.isfinite(half).all() and np.array_equal(half.astype(np.float32), scales):
            stored = g.initializer(f"{name}.scales_fp16", half)
            return g.op("Cast", [stored], f"/{name}/Cast_scales", to=1)
    return g.initializer(f"{name}.scales", scales)


def _matmul_nbits(g: Graph, x: str, t: dict, name: str, accuracy_level: int, b: str | None = None,
                  output: str | None = None, scales: str | None = None, zeros: str | None = None) -> str:
    inputs = [x, b or g.initializer(f"{name}.qweight", t["B"]), scales or scales_input(g, name, t["scales"])]
    if "zero_points" in t:
        inputs.append(zeros or g.initializer(f"{name}.qzeros", t["zero_points"]))
    attrs = dict(K=t["K"], N=t["N"], bits=t["bits"], block_size=t["block_size"], accuracy_level=accuracy_level)
    if output:
        g.node("MatMulNBits", inputs, f"/{name}/MatMulNBits", outputs=[output], domain=MS, **attrs)
        return output
    return g.op("MatMulNBits", inputs, f"/{name}/MatMulNBits", domain=MS, **attrs)


def tied_head_nbits(dw: DecoderWeights, accuracy_level: int, dtype=np.float32):
    """A ``TiedHeadWriter`` for a quantized tied head: one stored ``B`` serves the embedding
    (``GatherBlockQuantized``) and the head (``MatMulNBits``)."""
    head = dw.head_module
    t = nbits_tensors([head])
    t["scales"] = t["scales"].astype(dtype)
    if t["K"] % t["block_size"]:
        raise ValueError(f"embedding group {t['block_size']} must divide hidden size {t['K']}")

    def write(g: Graph, ids: str):
        # One copy of codes, scales and zero points, in MatMulNBits' layout; the embedding reads
        # 2-D views of them (Reshape of initializers, folded at load), which GatherBlockQuantized
        # takes along its last axis with the same packing.
        v, kb = t["N"], t["K"] // t["block_size"]
        b = g.initializer("lm_head.qweight", t["B"])  # (V, kb, blob)
        scales = scales_input(g, "lm_head", t["scales"])
        inputs = [g.op("Reshape", [b, g.const([v, -1])], "/embed_tokens/Reshape_codes"), ids,
                  g.op("Reshape", [scales, g.const([v, kb])], "/embed_tokens/Reshape_scales")]
        zeros = None
        if "zero_points" in t:
            zeros = g.initializer("lm_head.qzeros", t["zero_points"])
            inputs.append(g.op("Reshape", [zeros, g.const([v, -1])], "/embed_tokens/Reshape_zeros"))
        hidden = g.op("GatherBlockQuantized", inputs, "/embed_tokens/GatherBlockQuantized", domain=MS,
                      gather_axis=0, quantize_axis=1, block_size=t["block_size"], bits=t["bits"])

        def head_fn(x: str) -> None:
            _matmul_nbits(g, x, t, "lm_head", accuracy_level, b=b, output="logits", scales=scales, zeros=zeros)
        return hidden, head_fn
    return write


def probe_2bit() -> dict[str, Any]:
    """What this ONNX Runtime does with 2-bit MatMulNBits on the CPU: a tiny graph is run with the
    default kernels and with the opt-in LUT GEMM session option, each checked against numpy."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n, group = 128, 64, 32
    codes = rng.integers(0, 4, (n, k), dtype=np.uint8)
    scale = rng.uniform(0.01, 0.02, (n, k // group)).astype(np.float32)
    zero = np.full((n, k // group), 2, dtype=np.uint8)
    import torch

    packed = Q.pack_codes(torch.from_numpy(codes), 2, group).numpy()
    zp = Q.pack_zero_points(torch.from_numpy(zero.astype(np.float32)), 2).numpy().reshape(-1)
    w = (codes.astype(np.float32) - np.repeat(zero, group, axis=1)) * np.repeat(scale, group, axis=1)
    a = rng.standard_normal((2, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain=MS, K=k, N=n, bits=2,
                            block_size=group, accuracy_level=0)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.reshape(-1), "S"),
                               numpy_helper.from_array(zp, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    ref = a @ w.T
    out: dict[str, Any] = {"onnxruntime": ort.__version__}
    for key, opts in (("default", {}), ("lut_gemm", {"mlas.use_lut_gemm": "1"})):
        so = ort.SessionOptions()
        for kk, v in opts.items():
            so.add_session_config_entry(kk, v)
        try:
            y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                None, {"A": a})[0]
            out[key] = "runs, exact" if np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max() else "runs, WRONG results"
        except Exception as exc:  # an ORT without the kernel
            out[key] = f"fails: {str(exc).splitlines()[0][:120]}"
    return out


def quant_summary(model) -> dict[str, Any] | None:
    """Bits/groups of a fake-quant model's Linears (None if nothing is quantized)."""
    mods = {n: m for n, m in model.named_modules() if is_quant(m)}
    if not mods:
        return None
    fmts: dict[str, int] = {}
    for m in mods.values():
        key = f"{m.q.bits}-bit g{m.q.group} {'sym' if m.q.sym else 'asym'}"
        fmts[key] = fmts.get(key, 0) + 1
    return {"linears": len(mods), "formats": fmts, "bits": sorted({m.q.bits for m in mods.values()})}
