"""A supernet: one model that runs as any of its depth x width subnets, and extracts each as a
plain dense LLaMA.

- Depth: the subnet's layers run, the others are bypassed (the decoder's layer list is swapped
  for the active layers for the duration of a forward). The key/value cache index of each active
  layer is remapped to its position among them (``sum(active[:i])``), so a bypassed layer takes no
  cache slot: forgetting this is the authors' first pitfall.
- Width (:mod:`.flap`): every layer keeps the same number of query heads per key/value group and
  of MLP channels, each layer its own best; a dropped input channel of ``o_proj`` / ``down_proj``
  is replaced by its calibration mean (a forward pre-hook), i.e. the producer's output is masked,
  never its weights, so the adapters' delta stays in.
- Adapters (:mod:`.smol`): routed by the subnet's shape before every forward.

:meth:`Supernet.extract` writes the same function as a model of the subnet's shape: the layers
kept and renumbered, the adapters merged (masked for a sparse parent), the kept heads and channels
sliced out, the means of the dropped ones folded into ``o_proj`` / ``down_proj`` biases.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ...arch import arch_of
from ...models import config_from_dict
from .dp import DPResult
from .flap import DOWN_PROJ, O_PROJ, LayerWidth, WidthShape, head_channels
from .smol import SMoL


@dataclass(frozen=True)
class Subnet:
    layers: tuple[int, ...]  # the layers kept, ascending
    width: int  # index into the supernet's width choices

    @property
    def depth(self) -> int:
        return len(self.layers)


class Supernet:
    def __init__(self, model: nn.Module, dp: DPResult, widths: list[WidthShape], plan: list[LayerWidth],
                 smol: SMoL | None = None, *, compensate: bool = True):
        self.model, self.dp, self.widths, self.plan, self.smol = model, dp, widths, plan, smol
        self.compensate = compensate
        self.arch = arch_of(model)
        self.inner = self.arch.inner(model)
        self.all_layers = self.arch.decoder_layers(model)
        cfg = model.config
        self.num_layers = len(self.all_layers)
        self.heads = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.intermediate = cfg.intermediate_size
        self._width: int = 0
        self._fills: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        for i, layer in enumerate(self.all_layers):
            for rel in (O_PROJ, DOWN_PROJ):
                self._handles.append(layer.get_submodule(rel).register_forward_pre_hook(
                    lambda _m, args, i=i, rel=rel: self._narrow(i, rel, args)))

    # ---- shapes
    def subnet(self, depth: int, width: int) -> Subnet:
        if not 0 <= width < len(self.widths):
            raise ValueError(f"width index {width} outside 0 .. {len(self.widths) - 1}")
        layers = tuple(range(self.num_layers)) if depth == self.num_layers else self.dp.layers(depth)
        return Subnet(layers, width)

    def full(self) -> Subnet:
        return Subnet(tuple(range(self.num_layers)), 0)

    def kept(self, layer: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query heads, MLP channels) layer ``layer`` keeps at width ``width``."""
        w, p = self.widths[width], self.plan[layer]
        return p.kept_heads(w.heads_per_group), p.kept_channels(w.intermediate)

    def is_full_width(self, width: int) -> bool:
        w = self.widths[width]
        return w.heads_per_group * self.kv == self.heads and w.intermediate == self.intermediate

    def biased(self, width: int) -> bool:
        """Whether a subnet of this width carries the compensation biases (LLaMA's attention / MLP bias)."""
        return self.compensate and not self.is_full_width(width)

    # ---- running as a subnet
    def _fill(self, layer: int, width: int, rel: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, width, rel)
        if key not in self._fills:
            heads, channels = self.kept(layer, width)
            p = self.plan[layer]
            if rel == O_PROJ:
                keep, mean = head_channels(heads, self.head_dim), p.o_mean
            else:
                keep, mean = channels, p.down_mean
            m = torch.zeros(mean.shape[0])
            m[keep] = 1.0
            fill = (1 - m) * mean if self.compensate else torch.zeros_like(mean)
            self._fills[key] = (m, fill)
        return self._fills[key]

    def _narrow(self, layer: int, rel: str, args):
        if self.is_full_width(self._width):
            return None
        m, fill = self._fill(layer, self._width, rel)
        x = args[0]
        return (x * m.to(x.device, x.dtype) + fill.to(x.device, x.dtype), *args[1:])

    @contextlib.contextmanager
    def use(self, sub: Subnet, noise: torch.Generator | None = None) -> Iterator[None]:
        """Run the model as ``sub`` inside the block (routing the adapters; ``noise``: training)."""
        saved_n = self.model.config.num_hidden_layers
        saved_idx = [getattr(layer.self_attn, "layer_idx", None) for layer in self.all_layers]
        saved_types = getattr(self.model.config, "layer_types", None)
        saved_gates = self.smol.gates if self.smol is not None else None
        active = [self.all_layers[i] for i in sub.layers]
        try:
            self.inner.layers = nn.ModuleList(active) if len(active) < self.num_layers else self.all_layers
            self.model.config.num_hidden_layers = len(active)
            if saved_types is not None:
                self.model.config.layer_types = [saved_types[i] for i in sub.layers]
            for j, layer in enumerate(active):  # the KV index remap
                layer.self_attn.layer_idx = j
            self._width = sub.width
            if self.smol is not None:
                self.smol.route(sub.layers, sub.width, noise)
            yield
        finally:
            self.inner.layers = self.all_layers
            self.model.config.num_hidden_layers = saved_n
            if saved_types is not None:
                self.model.config.layer_types = saved_types
            for layer, idx in zip(self.all_layers, saved_idx):
                layer.self_attn.layer_idx = idx
            self._width = 0
            if self.smol is not None:
                self.smol.gates = saved_gates

    def rest(self) -> None:
        """Outside :meth:`use` the model runs as its full subnet (adapters routed without noise)."""
        if self.smol is not None:
            with torch.no_grad():
                full = self.full()
                self.smol.route(full.layers, full.width)

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- extraction
    @torch.no_grad()
    def extract(self, sub: Subnet, masks: dict[str, torch.Tensor] | None = None
                ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """The subnet as a dense model of its own shape, and its sparsity masks (renamed and sliced
        from ``masks``, the parent's)."""
        masks = masks or {}
        w = self.widths[sub.width]
        bias = self.biased(sub.width)
        cfg = self.model.config.to_dict()
        cfg.update(num_hidden_layers=sub.depth, num_attention_heads=w.heads_per_group * self.kv,
                   intermediate_size=w.intermediate, head_dim=self.head_dim, use_cache=True)
        if bias:
            cfg.update(attention_bias=True, mlp_bias=True)
        if cfg.get("layer_types"):
            cfg["layer_types"] = [cfg["layer_types"][i] for i in sub.layers]
        config = config_from_dict(cfg)
        deltas = self.smol.deltas(sub.layers, sub.width) if self.smol is not None else {}
        prefix = self.arch.layers
        state: dict[str, torch.Tensor] = {}
        new_masks: dict[str, torch.Tensor] = {}
        src = self.model.state_dict()
        for name, t in src.items():
            if not name.startswith(prefix + "."):
                state[name] = t.clone()
        for j, i in enumerate(sub.layers):
            old, new = f"{prefix}.{i}.", f"{prefix}.{j}."
            heads, channels = self.kept(i, sub.width)
            cols = {O_PROJ: head_channels(heads, self.head_dim), DOWN_PROJ: channels}
            rows = {"self_attn.q_proj": head_channels(heads, self.head_dim), "mlp.gate_proj": channels,
                    "mlp.up_proj": channels}
            for name, t in src.items():
                if not name.startswith(old):
                    continue
                rel = name[len(old):]
                mod, _, kind = rel.rpartition(".")
                t = t.clone()
                if kind == "weight" and (old + mod) in deltas:
                    t = (t.float() + deltas[old + mod].float()).to(t.dtype)
                mask = masks.get(old + mod) if kind == "weight" else None
                if mod in cols and kind == "weight":
                    if bias:
                        mean = self.plan[i].o_mean if mod == O_PROJ else self.plan[i].down_mean
                        dropped = torch.ones(t.shape[1], dtype=torch.bool)
                        dropped[cols[mod]] = False
                        b = t.float()[:, dropped] @ mean.float()[dropped]
                        prev = src.get(old + mod + ".bias")
                        state[new + mod + ".bias"] = (b + (prev.float() if prev is not None else 0)).to(t.dtype)
                    t = t[:, cols[mod]]
                    mask = mask[:, cols[mod]] if mask is not None else None
                elif mod in rows:
                    t = t[rows[mod]]
                    mask = mask[rows[mod]] if mask is not None else None
                elif kind == "bias" and mod in cols and bias:
                    continue  # folded into the compensation bias above
                state[new + rel] = t
                if mask is not None:
                    new_masks[new + mod] = mask.clone()
            if bias:
                for rel, n in (("self_attn.q_proj", w.heads_per_group * self.kv * self.head_dim),
                               ("self_attn.k_proj", self.kv * self.head_dim),
                               ("self_attn.v_proj", self.kv * self.head_dim),
                               ("mlp.gate_proj", w.intermediate), ("mlp.up_proj", w.intermediate)):
                    state.setdefault(f"{new}{rel}.bias", torch.zeros(n, dtype=state[f"{new}{rel}.weight"].dtype))
        with torch.device("meta"):
            model = type(self.model)(config)
        model.load_state_dict(state, strict=False, assign=True)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"extract: {len(missing)} parameter(s) not written (first: {missing[0]})")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        self.arch.rebuild_rotary(model)
        return model.eval(), new_masks
