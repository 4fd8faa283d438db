"""Batched text generation for the teacher's own training text.

``transformers``' ``generate`` spends most of a CPU decode step outside the model at the batch
sizes data generation uses: its dynamic KV cache concatenates the whole cache every step (O(L^2)
copies), and rows that already ended keep being computed until the longest one ends. This loop
calls the model's own forward (so any architecture ``transformers`` runs works) with a KV cache
that grows by doubling, drops finished rows from the batch, and samples with a seeded
``torch.Generator`` (temperature + nucleus). Measured on SmolLM2-135M, 2 threads, 32 prompts x
256 tokens: see ``benchmarks/generation.py``.

Change what the loop emits for the same inputs and you must bump ``GENERATION_VERSION`` (it keys
the self-data cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

GENERATION_VERSION = 1


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer whose buffers grow by doubling: ``keys``/``values`` are
        views of the filled part, so the rest of ``transformers`` reads it as a ``DynamicLayer``."""

        def update(self, key_states, value_states, *args, **kwargs):
            n_new = key_states.shape[-2]
            if not getattr(self, "is_initialized", False) or getattr(self, "_kbuf", None) is None:
                self.dtype, self.device = key_states.dtype, key_states.device
                self._kbuf = self._vbuf = None
                self._len = 0
                self.is_initialized = True
            need = self._len + n_new
            if self._kbuf is None or need > self._kbuf.shape[-2]:
                cap = max(need + 64, 2 * (self._kbuf.shape[-2] if self._kbuf is not None else 0))
                kb = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
                vb = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
                if self._len:
                    kb[..., : self._len, :] = self._kbuf[..., : self._len, :]
                    vb[..., : self._len, :] = self._vbuf[..., : self._len, :]
                self._kbuf, self._vbuf = kb, vb
            self._kbuf[..., self._len : need, :] = key_states
            self._vbuf[..., self._len : need, :] = value_states
            self._len = need
            self.keys = self._kbuf[..., :need, :]
            self.values = self._vbuf[..., :need, :]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if getattr(self, "_kbuf", None) is not None:
                self._kbuf = self._kbuf[indices]
                self._vbuf = self._vbuf[indices]
                self.keys = self._kbuf[..., : self._len, :]
                self.values = self._vbuf[..., : self._len, :]

    return GrowingLayer


def new_cache(model):
    """A KV cache for ``model``: doubling buffers when every layer attends to the full context,
    else ``transformers``' own per-layer-type cache (sliding windows keep their semantics)."""
    from transformers.cache_utils import DynamicCache

    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    sliding = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
    if any(t != "full_attention" for t in types) or (sliding and getattr(cfg, "layer_types", None) is None):
        return DynamicCache(config=model.config)
    cache = DynamicCache()
    layer = _growing_layer_class()
    cache.layers = [layer() for _ in range(cfg.num_hidden_layers)]
    if hasattr(cache, "layer_class_to_replicate"):
        cache.layer_class_to_replicate = None
    return cache


def next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
    """One token per row of ``logits`` ``(B, V)``: argmax, or a draw from the temperature-scaled
    distribution cut to its nucleus (the fewest most likely tokens whose mass reaches ``top_p``)."""
    import torch

    if not sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass of the strictly more likely tokens
        sp = sp.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
             eos_ids: Sequence[int], sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, on_step: Callable[[int], None] | None = None,
             ) -> list[list[int]]:
    """New tokens for each row of a left-padded batch, up to and including the first EOS (or
    ``max_new_tokens``). Rows that end leave the batch; the others go on."""
    import torch

    with torch.no_grad():
        return _generate(model, input_ids, attention_mask, max_new_tokens, eos_ids, sample, temperature, top_p,
                         generator, on_step)


def _generate(model, input_ids, attention_mask, max_new_tokens, eos_ids, sample, temperature, top_p, generator,
              on_step) -> list[list[int]]:
    import torch

    model.eval()
    batch = input_ids.shape[0]
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), dtype=torch.long)
    out: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch)  # original row of each live row
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ids = input_ids
    from .models import cache_argument

    cache, key = new_cache(model), cache_argument(type(model))
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{key: cache},
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        tok = next_tokens(logits, temperature=temperature, top_p=top_p, generator=generator, sample=sample)
        for r, t in zip(rows.tolist(), tok.tolist()):
            out[r].append(t)
        done = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if on_step:
            on_step(step)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        ids = tok.unsqueeze(-1)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, mask, positions, ids = rows[keep], mask[keep], positions[keep], ids[keep]
    return out
