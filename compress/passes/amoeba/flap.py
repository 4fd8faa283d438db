"""Width: which attention heads and MLP channels a narrower subnet keeps (FLAP, An et al. 2024, as
AmoebaLLM uses it; METHODS.md §3), at uniform per-layer widths.

Per decoder layer, on the calibration sequences, the inputs of ``o_proj`` (the heads' outputs)
and of ``down_proj`` (the MLP's channels) give each input channel ``j`` FLAP's fluctuation score
``var(x_j) * ||W[:, j]||^2``; a head scores the mean over its ``head_dim`` channels. The authors
then standardize per layer and cut at one global threshold, which gives every layer its own width:
a LLaMA config (one ``num_attention_heads``, one ``intermediate_size``) and ONNX Runtime GenAI
cannot express that, so here every layer keeps the same number of channels, each layer its own
best ones. Heads are kept as an equal number of query heads per key/value group (the key/value
heads all stay), so grouped-query attention stays consistent and every subnet is a plain LLaMA.

Bias compensation: a dropped input channel is replaced by its calibration mean, i.e. the
producer gains ``b = W[:, dropped] mean(x_dropped)``; applied as an input pre-hook while the
supernet trains, folded into ``o_proj`` / ``down_proj`` biases when a subnet is extracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...arch import arch_of
from ...calibration import LayerwiseCalibration

O_PROJ, DOWN_PROJ = "self_attn.o_proj", "mlp.down_proj"


@dataclass(frozen=True)
class WidthShape:
    """One width choice as shapes: query heads kept per key/value group, MLP channels kept."""

    fraction: float
    heads_per_group: int
    intermediate: int


def width_shape(fraction: float, *, num_heads: int, num_kv_heads: int, intermediate: int,
                multiple: int = 32) -> WidthShape:
    """The shapes of width ``fraction``: MLP channels rounded to ``multiple`` (MatMulNBits blocks run
    along ``down_proj``'s input), at least one query head per group."""
    per_group = num_heads // num_kv_heads
    hpg = min(per_group, max(1, round(per_group * fraction)))
    inter = min(intermediate, max(multiple, int(round(intermediate * fraction / multiple)) * multiple))
    return WidthShape(fraction, hpg, inter)


@dataclass
class LayerWidth:
    """One layer's FLAP ranking and the means its dropped channels are replaced by."""

    head_order: torch.Tensor  # (num_kv_heads, heads_per_group): query heads of each group, best first
    channel_order: torch.Tensor  # (intermediate,): MLP channels, best first
    o_mean: torch.Tensor  # (num_heads * head_dim,): mean input of o_proj
    down_mean: torch.Tensor  # (intermediate,): mean input of down_proj
    head_scores: torch.Tensor  # (num_heads,)
    channel_scores: torch.Tensor  # (intermediate,)

    def kept_heads(self, hpg: int) -> torch.Tensor:
        """Query heads kept with ``hpg`` per group, grouped by key/value head, ascending within a group."""
        return torch.sort(self.head_order[:, :hpg], dim=1).values.reshape(-1)

    def kept_channels(self, n: int) -> torch.Tensor:
        return torch.sort(self.channel_order[:n]).values


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The o_proj input channels of ``heads`` (in order)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@torch.no_grad()
def flap_widths(model, blocks: torch.Tensor, *, batch: int = 4) -> list[LayerWidth]:
    """Every layer's FLAP ranking on ``blocks`` (the model unchanged: each layer sees the
    full model's hidden states)."""
    arch = arch_of(model)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = []
    for step in LayerwiseCalibration(model, blocks, batch=batch, arch=arch):
        stats = step.stats([O_PROJ, DOWN_PROJ], hessian=True)
        o_w = step.layer.get_submodule(O_PROJ).weight.float()
        d_w = step.layer.get_submodule(DOWN_PROJ).weight.float()
        o_score = stats[O_PROJ].variance * o_w.pow(2).sum(0)
        d_score = stats[DOWN_PROJ].variance * d_w.pow(2).sum(0)
        head_scores = o_score.reshape(heads, hd).mean(1)
        per_group = head_scores.reshape(kv, heads // kv)
        order = torch.argsort(per_group, dim=1, descending=True, stable=True) + \
            torch.arange(kv)[:, None] * (heads // kv)
        out.append(LayerWidth(order, torch.argsort(d_score, descending=True, stable=True),
                              stats[O_PROJ].mean.clone(), stats[DOWN_PROJ].mean.clone(), head_scores, d_score))
    return out
