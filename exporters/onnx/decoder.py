"""The decoder graph: the same fused operators ONNX Runtime GenAI's builder emits.

Per layer: ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one kernel),
one packed QKV ``MatMul``, ``GroupQueryAttention`` with the rotary embedding and KV-cache
append fused in (``do_rotary``, cos/sin caches), the output projection, a second fused
norm, one packed gate|up ``MatMul`` and SwiGLU. I/O names follow the GenAI convention
(``input_ids``, ``attention_mask``, ``past_key_values.N.key``, ``logits``, ``present.N.key``)
so one export runs in plain ONNX Runtime and in ``onnxruntime-genai``.

Layout choices (``LayoutOptions``) were measured, not guessed: see BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnx import TensorProto

from .graph import MS, Graph
from .specs import DecoderWeights, LayerWeights


@dataclass(frozen=True)
class LayoutOptions:
    pack_qkv: bool = True  # one MatMul for q|k|v (GQA takes the packed tensor)
    pack_gate_up: bool = True  # one MatMul for gate|up, then Split
    silu: str = "quickgelu"  # "quickgelu" (one fused kernel, alpha=1 is SiLU) or "sigmoid" (Sigmoid*Mul)
    # tied embeddings: "shared" stores one (d, V) matrix that the lm_head MatMul reads and the embedding
    # gathers columns of (smallest on disk); "separate" stores the (V, d) embedding and a (d, V) copy
    lm_head: str = "shared"
    # a position_ids input (what Hugging Face loops such as optimum's ORTModelForCausalLM expect)
    position_ids: bool = True


#: How a Linear becomes graph nodes: (graph, x, layer_weights, key, weight (in, out), name) -> output.
#: The default writes a dense MatMul; quantized exports swap in MatMulNBits.
LinearWriter = Callable[[Graph, str, "LayerWeights | None", str, np.ndarray, str], str]


def dense_linear(dtype: np.dtype) -> LinearWriter:
    def write(g: Graph, x: str, layer: LayerWeights | None, key: str, w: np.ndarray, name: str) -> str:
        return g.op("MatMul", [x, g.initializer(f"{name}.weight", w.astype(dtype))], f"/{name}/MatMul")
    return write


#: A quantized tied embedding/head: ``(graph, input_ids) -> (hidden, head)`` where ``head(x)``
#: writes the ``logits`` output from the final hidden state.
TiedHeadWriter = Callable[[Graph, str], "tuple[str, Callable[[str], None]]"]


def build_decoder(g: Graph, dw: DecoderWeights, *, dtype=np.float32, layout: LayoutOptions = LayoutOptions(),
                  linear: LinearWriter | None = None, tied_head: TiedHeadWriter | None = None) -> None:
    dtype = np.dtype(dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    linear = linear or dense_linear(dtype)
    hd, kvh = dw.head_dim, dw.num_kv_heads

    ids = g.input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
    # Rotary positions of this call's tokens, GroupQueryAttention's optional input 9: a one-token step is
    # rotated at its position_ids; a multi-token call at position_ids[:, 0] + 0, 1, 2, ... (consecutive
    # positions, which is what Hugging Face loops such as optimum's ORTModelForCausalLM and
    # onnxruntime-genai feed; tests/test_consumers.py checks that the input is used).
    position_ids = g.input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]) \
        if layout.position_ids else ""
    pasts = []
    for i in range(dw.num_layers):
        pasts.append((
            g.input(f"past_key_values.{i}.key", elem, ["batch_size", kvh, "past_sequence_length", hd]),
            g.input(f"past_key_values.{i}.value", elem, ["batch_size", kvh, "past_sequence_length", hd]),
        ))
    g.output("logits", elem, ["batch_size", "sequence_length", dw.vocab_size])
    for i in range(dw.num_layers):
        g.output(f"present.{i}.key", elem, ["batch_size", kvh, "total_sequence_length", hd])
        g.output(f"present.{i}.value", elem, ["batch_size", kvh, "total_sequence_length", hd])

    # GroupQueryAttention wants, per batch row, the index of the last valid token
    # (seqlens_k = sum(mask) - 1, int32) and the total length (int32 scalar).
    one = g.const([1])
    total = g.op("ReduceSum", [mask, one], "/mask/ReduceSum", keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [total, one], "/mask/Sub")], "/mask/seqlens_k", to=TensorProto.INT32)
    shape = g.op("Shape", [mask], "/mask/Shape")
    total_len = g.op("Cast", [g.op("Gather", [shape, g.const(1)], "/mask/Gather", axis=0)],
                     "/mask/total_len", to=TensorProto.INT32)
    cos, sin = _rotary_tables(g, dw, dtype)

    head_fn = None
    if tied_head is not None:
        if not dw.tied:
            raise ValueError("a quantized tied head needs tied embeddings")
        hidden, head_fn = tied_head(g, ids)
    elif dw.tied and layout.lm_head == "shared":
        # (d, V) serves the lm_head MatMul; the embedding gathers columns: (d, b, s) -> (b, s, d)
        embed = g.initializer("lm_head.weight", np.ascontiguousarray(dw.embed.T).astype(dtype))
        cols = g.op("Gather", [embed, ids], "/embed_tokens/Gather", axis=1)
        hidden = g.op("Transpose", [cols], "/embed_tokens/Transpose", perm=[1, 2, 0])
    else:
        embed = g.initializer("model.embed_tokens.weight", dw.embed.astype(dtype))
        hidden = g.op("Gather", [embed, ids], "/embed_tokens/Gather", axis=0)
    eps = dw.rms_norm_eps
    residual = hidden
    x = g.op("SimplifiedLayerNormalization", [hidden, g.initializer("model.layers.0.input_layernorm.weight",
             dw.layers[0].input_norm.astype(dtype))], "/layers.0/input_layernorm", axis=-1, epsilon=eps,
             stash_type=1)

    def add_bias(y: str, layer: LayerWeights, keys: tuple[str, ...], name: str) -> str:
        if not all(k in layer.bias for k in keys):
            if any(k in layer.bias for k in keys):
                raise ValueError(f"{name}: bias on only some of {keys}")
            return y
        b = np.concatenate([layer.bias[k] for k in keys]).astype(dtype)
        return g.op("Add", [y, g.initializer(f"{name}.bias", b)], f"/{name}/Add")

    def skip_norm(res: str, y: str, weight: np.ndarray, name: str) -> tuple[str, str]:
        out = g.node("SkipSimplifiedLayerNormalization", [res, y, g.initializer(f"{name}.weight", weight.astype(dtype))],
                     f"/{name}", outputs=[f"/{name}/output_0", "", "", f"/{name}/output_3"], domain=MS, epsilon=eps)
        return out[0], out[3]

    for i, lw in enumerate(dw.layers):
        p = f"model.layers.{i}"
        # attention
        if layout.pack_qkv:
            w = np.concatenate([lw.q, lw.k, lw.v], axis=1)
            qkv = add_bias(linear(g, x, lw, "qkv", w, f"{p}.attn.qkv_proj"), lw, ("q", "k", "v"),
                           f"{p}.attn.qkv_proj")
            q_in, k_in, v_in = qkv, "", ""
        else:
            q_in, k_in, v_in = (add_bias(linear(g, x, lw, k, getattr(lw, k), f"{p}.attn.{k}_proj"), lw, (k,),
                                         f"{p}.attn.{k}_proj") for k in ("q", "k", "v"))
        attn = g.node(
            "GroupQueryAttention",
            [q_in, k_in, v_in, pasts[i][0], pasts[i][1], seqlens_k, total_len, cos, sin]
            + ([position_ids] if position_ids else []),
            f"/{p}/attn/GroupQueryAttention",
            outputs=[f"/{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            domain=MS, num_heads=lw.num_heads // hd, kv_num_heads=kvh, scale=float(hd) ** -0.5,
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        )[0]
        o = add_bias(linear(g, attn, lw, "o", lw.o, f"{p}.attn.o_proj"), lw, ("o",), f"{p}.attn.o_proj")
        x, residual = skip_norm(residual, o, lw.post_norm, f"{p}.post_attention_layernorm")
        # MLP
        inter = lw.intermediate
        if layout.pack_gate_up:
            gu = linear(g, x, lw, "gate_up", np.concatenate([lw.gate, lw.up], axis=1), f"{p}.mlp.gate_up_proj")
            gu = add_bias(gu, lw, ("gate", "up"), f"{p}.mlp.gate_up_proj")
            gate, up = g.node("Split", [gu, g.const([inter, inter])], f"/{p}/mlp/Split", n_out=2, axis=-1)
        else:
            gate = add_bias(linear(g, x, lw, "gate", lw.gate, f"{p}.mlp.gate_proj"), lw, ("gate",), f"{p}.mlp.gate_proj")
            up = add_bias(linear(g, x, lw, "up", lw.up, f"{p}.mlp.up_proj"), lw, ("up",), f"{p}.mlp.up_proj")
        if layout.silu == "quickgelu":
            act = g.op("QuickGelu", [gate], f"/{p}/mlp/act_fn", domain=MS, alpha=1.0)
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"/{p}/mlp/act_fn/Sigmoid")], f"/{p}/mlp/act_fn/Mul")
        y = g.op("Mul", [act, up], f"/{p}/mlp/Mul")
        y = add_bias(linear(g, y, lw, "down", lw.down, f"{p}.mlp.down_proj"), lw, ("down",), f"{p}.mlp.down_proj")
        next_norm = dw.layers[i + 1].input_norm if i + 1 < dw.num_layers else dw.final_norm
        next_name = f"model.layers.{i + 1}.input_layernorm" if i + 1 < dw.num_layers else "model.norm"
        x, residual = skip_norm(residual, y, next_norm, next_name)

    if head_fn is not None:
        head_fn(x)
    elif dw.tied and layout.lm_head == "shared":
        g.node("MatMul", [x, embed], "/lm_head/MatMul", outputs=["logits"])
    else:
        head = dw.embed if dw.tied else dw.lm_head
        g.node("MatMul", [x, g.initializer("lm_head.weight", np.ascontiguousarray(head.T).astype(dtype))],
               "/lm_head/MatMul", outputs=["logits"])


def _rotary_tables(g: Graph, dw: DecoderWeights, dtype) -> tuple[str, str]:
    """GroupQueryAttention's cos/sin caches: computed from ``inv_freq`` (32 numbers; ONNX Runtime
    folds the constant subgraph when the session loads) where the model's tables are exactly
    cos/sin(position x inv_freq) x scaling, else stored (2 x context x hd/2 numbers)."""
    if dw.inv_freq is None:
        return g.initializer("cos_cache", dw.cos.astype(dtype)), g.initializer("sin_cache", dw.sin.astype(dtype))
    pos = g.op("Range", [g.const(0.0, np.float32, scalar=True), g.const(float(dw.context_length), np.float32, scalar=True),
                         g.const(1.0, np.float32, scalar=True)], "/rotary/Range")
    col = g.op("Unsqueeze", [pos, g.const([1])], "/rotary/Unsqueeze")
    angles = g.op("Mul", [col, g.initializer("rotary.inv_freq", dw.inv_freq.reshape(1, -1))], "/rotary/Mul")
    out = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, [angles], f"/rotary/{fn}")
        if dw.rope_scaling != 1.0:
            t = g.op("Mul", [t, g.const(dw.rope_scaling, np.float32)], f"/rotary/{fn}_scaling")
        if dtype != np.float32:
            t = g.op("Cast", [t], f"/rotary/{fn}_cast", to=TensorProto.FLOAT16)
        out.append(t)
    return out[0], out[1]

