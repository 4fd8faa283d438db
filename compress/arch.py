"""Model families: what a decoder architecture is, in one place (torch-free to import).

Every pass, the loader and the ONNX exporter ask this registry — never ``model.model.layers``
or a hard-coded list of projection names — so a new family is one :func:`register_arch` call:

- ``layers``: the attribute path of the decoder layer list;
- ``linears``: every Linear of a layer (relative names), in execution order;
- ``pack_groups``: Linears that read the same input and are exported as one packed MatMul
  (they must share one quantization format);
- ``layer_kwargs``: the keyword arguments a layer call needs besides the hidden states
  (captured once and replayed by layer-wise calibration);
- ``biases``: the Linears that carry a bias in this family;
- ``rebuild_rotary``: rotary tables of a model built on the meta device;
- ``residual_writers``: the Linears whose outputs are added to the residual stream (every other
  Linear of a layer reads it, through ``layer_norms``); ``final_norm``: the norm before the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_PACKS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    linears: tuple[str, ...] = LLAMA_LINEARS
    pack_groups: tuple[tuple[str, ...], ...] = LLAMA_PACKS
    layer_kwargs: tuple[str, ...] = ("attention_mask", "position_ids", "position_embeddings", "cache_position")
    biases: tuple[str, ...] = ()  # Linears (relative names) that carry a bias in this family
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "model.norm"

    def residual_readers(self) -> tuple[str, ...]:
        """The Linears of a layer that read the (normed) residual stream."""
        return tuple(n for n in self.linears if n not in self.residual_writers)

    def reader_norms(self) -> dict[str, str]:
        """Each residual reader -> the layer norm in front of it: a pre-norm block's readers of the
        i-th sub-block (those after the i-1-th residual writer, in ``linears`` order) read through
        ``layer_norms[i]``."""
        out, block = {}, 0
        for n in self.linears:
            if n in self.residual_writers:
                block += 1
            else:
                out[n] = self.layer_norms[block]
        return out

    # ---- model access (torch objects, duck-typed)
    def decoder_layers(self, model) -> Any:
        obj = model
        for part in self.layers.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise UserError(f"{type(model).__name__} has no {self.layers}: not a {self.name}-family decoder")
        return obj

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers}.{index}."

    def linear_names(self, model) -> list[str]:
        """Full module names of every decoder Linear, layer by layer."""
        n = len(self.decoder_layers(model))
        return [f"{self.layer_prefix(i)}{rel}" for i in range(n) for rel in self.linears]

    def inner(self, model):
        """The decoder stack without the head (``model.model`` for every family here)."""
        return getattr(model, self.layers.split(".")[0])

    def rebuild_rotary(self, model) -> None:
        """Rotary buffers created on the meta device, rebuilt from a fresh module (transformers 4.x
        keeps ``original_inv_freq`` as an attribute, 5.x as a buffer; both build from the config)."""
        import torch

        for mod in model.modules():
            if hasattr(mod, "inv_freq") and getattr(mod, "inv_freq").is_meta:
                with torch.device("cpu"):
                    fresh = type(mod)(mod.config)
                for name, buf in fresh.named_buffers(recurse=False):
                    mod.register_buffer(name, buf, persistent=False)
                mod.original_inv_freq = fresh.original_inv_freq
                mod.attention_scaling = fresh.attention_scaling

    def shape(self, config: dict) -> dict[str, Any]:
        """The shape invariant of a model of this family, from its ``config.json``."""
        heads = config.get("num_attention_heads")
        return {
            "num_layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size"),
            "intermediate_size": config.get("intermediate_size"),
            "num_heads": heads,
            "num_kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or (config["hidden_size"] // heads if heads else None),
            "vocab_size": config.get("vocab_size"),
        }


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        if t in _ARCHS:
            raise ValueError(f"an architecture spec for model_type {t!r} is already registered")
        _ARCHS[t] = spec
    return spec


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_ARCHS))


def arch_for(model_type: str | None, where: Any = None) -> ArchSpec:
    if model_type not in _ARCHS:
        at = f"{where}: " if where is not None else ""
        raise UserError(f"{at}unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}")
    return _ARCHS[model_type]


def arch_of(model) -> ArchSpec:
    return arch_for(getattr(model.config, "model_type", None), type(model).__name__)


LLAMA = register_arch(ArchSpec("llama", ("llama",)))
#: Qwen2: the LLaMA block with biases on the q/k/v projections.
QWEN2 = register_arch(ArchSpec("qwen2", ("qwen2",), biases=("self_attn.q_proj", "self_attn.k_proj",
                                                             "self_attn.v_proj")))
