"""Export specs: what a decoder-only architecture looks like to the ONNX graph builder.

A spec reads a Hugging Face model (already loaded in PyTorch) into plain numpy weights
in the layout the graph wants (``(in, out)`` matrices) plus the few numbers the graph
needs. Shapes are read from the weights of each layer, not from the config, so pruned
models (``hidden_size != heads * head_dim``, narrower MLPs, fewer heads or layers,
untied embeddings) export without special cases. Adding a LLaMA-like architecture is a
subclass with a different ``model_types`` tuple, registered with ``register_export``; the layer
list and Linear names come from the family's spec in :mod:`compress.arch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compress.errors import UserError

#: rope variants whose cos/sin tables do not depend on the sequence length (exportable as a cache)
STATIC_ROPE = ("default", "linear", "llama3", None)


@dataclass
class LayerWeights:
    input_norm: np.ndarray  # (d,)
    post_norm: np.ndarray  # (d,)
    q: np.ndarray  # (d, H*hd)
    k: np.ndarray  # (d, KV*hd)
    v: np.ndarray  # (d, KV*hd)
    o: np.ndarray  # (H*hd, d)
    gate: np.ndarray  # (d, I)
    up: np.ndarray  # (d, I)
    down: np.ndarray  # (I, d)
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # q/k/v/o/gate/up/down -> (out,)
    modules: dict[str, Any] = field(default_factory=dict)  # name -> torch Linear (for quantized export)

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate.shape[1]


@dataclass
class DecoderWeights:
    model_type: str
    vocab_size: int
    hidden_size: int
    head_dim: int
    num_heads: int  # per layer: layers[i].q.shape[1] // head_dim (checked equal)
    num_kv_heads: int
    rms_norm_eps: float
    context_length: int
    embed: np.ndarray  # (V, d)
    lm_head: np.ndarray | None  # (V, d); None when tied to ``embed``
    final_norm: np.ndarray  # (d,)
    cos: np.ndarray  # (context_length, hd/2)
    sin: np.ndarray
    layers: list[LayerWeights]
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    head_module: Any = None  # the torch lm_head (a QuantLinear when the tied head is quantized)
    # ``cos``/``sin`` as cos/sin(position x inv_freq) x scaling, when they are exactly that (the graph
    # then computes the tables instead of storing 2 x context_length x hd/2 numbers)
    inv_freq: np.ndarray | None = None
    rope_scaling: float = 1.0

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied(self) -> bool:
        return self.lm_head is None


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


class LlamaExportSpec:
    """LLaMA-like families: RMSNorm, rotary (rotate-half), GQA, SwiGLU MLP, optional biases (Qwen2's q/k/v)."""

    model_types: tuple[str, ...] = ("llama", "qwen2")

    def read(self, model) -> DecoderWeights:
        import torch

        cfg = model.config
        rope = getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if rope_type not in STATIC_ROPE:
            raise UserError(f"rope type {rope_type!r} is not exportable (supported: default, linear, llama3)")
        from compress.arch import arch_of

        arch = arch_of(model)
        inner = arch.inner(model)
        layers = []
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        for i, layer in enumerate(arch.decoder_layers(model)):
            # graph keys q/k/v/o/gate/up/down from the family's Linear names (self_attn.q_proj -> q)
            mods = {rel.rsplit(".", 1)[1].removesuffix("_proj"): layer.get_submodule(rel) for rel in arch.linears}
            w = {k: _np(m.weight).T for k, m in mods.items()}
            bias = {k: _np(m.bias) for k, m in mods.items() if getattr(m, "bias", None) is not None}
            lw = LayerWeights(input_norm=_np(layer.input_layernorm.weight),
                              post_norm=_np(layer.post_attention_layernorm.weight), bias=bias, modules=mods, **w)
            for name in ("q", "k", "o"):
                dim = lw.q.shape[1] if name != "k" else lw.k.shape[1]
                if dim % head_dim:
                    raise UserError(f"layer {i}: {name}_proj width {dim} is not a multiple of head_dim {head_dim}")
            if lw.k.shape != lw.v.shape:
                raise UserError(f"layer {i}: k_proj {lw.k.shape} and v_proj {lw.v.shape} differ")
            layers.append(lw)
        heads = {lw.q.shape[1] // head_dim for lw in layers}
        kv = {lw.k.shape[1] // head_dim for lw in layers}
        if len(heads) > 1 or len(kv) > 1:
            raise UserError(f"per-layer head counts differ ({sorted(heads)} / {sorted(kv)}): "
                            "ONNX Runtime GenAI needs one head count for all layers")
        n_heads, n_kv = heads.pop(), kv.pop()
        if n_heads % n_kv:
            raise UserError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
        ctx = int(getattr(cfg, "max_position_embeddings", 2048))
        with torch.no_grad():
            pos = torch.arange(ctx).unsqueeze(0)
            dummy = torch.zeros(1, 1, head_dim, dtype=torch.float32)
            cos, sin = inner.rotary_emb(dummy, pos)  # (1, ctx, hd), halves repeated
        half = head_dim // 2
        inv_freq, scaling = _rotary_formula(inner.rotary_emb, _np(cos[0, :, :half]), _np(sin[0, :, :half]))
        embed = _np(inner.embed_tokens.weight)
        head = model.get_output_embeddings().weight
        # a quantized tied head is read through the embedding module (``head``), not shared storage
        tied = (getattr(inner.embed_tokens, "head", None) is not None
                or head.data_ptr() == inner.embed_tokens.weight.data_ptr())
        return DecoderWeights(
            model_type=cfg.model_type, vocab_size=embed.shape[0], hidden_size=embed.shape[1], head_dim=head_dim,
            num_heads=n_heads, num_kv_heads=n_kv, rms_norm_eps=float(cfg.rms_norm_eps), context_length=ctx,
            embed=embed, lm_head=None if tied else _np(head), head_module=model.get_output_embeddings(), final_norm=_np(inner.norm.weight),
            cos=_np(cos[0, :, :half]), sin=_np(sin[0, :, :half]), layers=layers,
            bos_token_id=getattr(cfg, "bos_token_id", None), eos_token_id=getattr(cfg, "eos_token_id", None),
            pad_token_id=getattr(cfg, "pad_token_id", None), inv_freq=inv_freq, rope_scaling=scaling,
        )


def _rotary_formula(rotary, cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray | None, float]:
    """``(inv_freq, scaling)`` when the tables equal cos/sin(float32 position x inv_freq) x scaling,
    as ONNX Runtime would compute them in the graph; ``(None, 1.0)`` otherwise."""
    inv = getattr(rotary, "inv_freq", None)
    if inv is None:
        return None, 1.0
    inv = _np(inv).astype(np.float32).reshape(-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    if inv.shape[0] != cos.shape[1]:
        return None, 1.0
    angles = np.arange(cos.shape[0], dtype=np.float32)[:, None] * inv[None, :]
    if (np.abs(np.cos(angles) * np.float32(scaling) - cos).max() > 1e-5
            or np.abs(np.sin(angles) * np.float32(scaling) - sin).max() > 1e-5):
        return None, 1.0
    return inv, scaling


_SPECS: dict[str, LlamaExportSpec] = {}


def register_export(spec: LlamaExportSpec) -> LlamaExportSpec:
    for t in spec.model_types:
        if t in _SPECS:
            raise ValueError(f"an export spec for {t!r} is already registered")
        _SPECS[t] = spec
    return spec


register_export(LlamaExportSpec())


def spec_for(model_type: str) -> LlamaExportSpec:
    if model_type not in _SPECS:
        raise UserError(f"ONNX export does not support model_type {model_type!r} (supported: {', '.join(sorted(_SPECS))})")
    return _SPECS[model_type]
