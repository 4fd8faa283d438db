"""The shape-aware mixture of LoRAs (SMoL; AmoebaLLM, METHODS.md §3).

Every decoder Linear gets ``E`` low-rank experts ``(A_e, B_e)``. One global router reads the
subnet's *shape* - a bitmask of the active layers and a one-hot of the width choice - through
``Linear(L + W, hidden) -> Linear(hidden, E)`` and keeps the top ``k`` logits, softmaxed into the
gates ``g``. Each Linear then adds ``s (sum_e g_e B_e)(sum_e g_e A_e) x``. The gates depend on the
shape only, never on the tokens, so for one subnet the delta is a plain low-rank matrix and merges
into the weight when the subnet is extracted.

Training adds the authors' noisy top-k (``N(0, 1) * softplus(noise logits)``) from a generator the
caller seeds per step, so a resumed run draws the same noise; at evaluation there is no noise (the
authors' code adds it at evaluation too: a subnet's output would then change from call to call).

With a sparse parent the delta is masked (``W + m * delta``), in training as at the merge, so the
extracted subnet is exactly sparse and computes what the supernet trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.lora import HookedAdapters


class Router(nn.Module):
    def __init__(self, num_layers: int, num_widths: int, experts: int, *, hidden: int = 16, top_k: int = 2,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.num_layers, self.num_widths, self.top_k = num_layers, num_widths, min(top_k, experts)
        self.hidden = nn.Linear(num_layers + num_widths, hidden)
        self.gate = nn.Linear(hidden, experts)
        self.noise = nn.Linear(hidden, experts)
        for lin in (self.hidden, self.gate, self.noise):
            bound = 1 / math.sqrt(lin.in_features)
            nn.init.uniform_(lin.weight, -bound, bound, generator=generator)
            nn.init.zeros_(lin.bias)

    def encode(self, layers: tuple[int, ...], width: int) -> torch.Tensor:
        x = torch.zeros(self.num_layers + self.num_widths)
        x[list(layers)] = 1.0
        x[self.num_layers + width] = 1.0
        return x

    def forward(self, layers: tuple[int, ...], width: int, noise: torch.Generator | None = None) -> torch.Tensor:
        """The gates (``E``,) of the subnet; ``noise``: a generator for the training noise (None: none)."""
        h = self.hidden(self.encode(layers, width).to(self.hidden.weight.device))
        logits = self.gate(h)
        if noise is not None:
            eps = torch.randn(logits.shape, generator=noise).to(logits.device)
            logits = logits + eps * F.softplus(self.noise(h))
        top = torch.topk(logits, self.top_k)
        gates = torch.zeros_like(logits)
        return gates.scatter(0, top.indices, torch.softmax(top.values, dim=0))


class MixtureLoRA(nn.Module):
    """``E`` low-rank experts of one Linear: ``A`` (E, r, in) Kaiming-uniform, ``B`` (E, out, r) zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, experts: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        r = max(1, min(rank, in_features, out_features))
        self.A = nn.Parameter(torch.empty(experts, r, in_features))
        for e in range(experts):
            nn.init.kaiming_uniform_(self.A.data[e], a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(experts, out_features, r))
        self.scaling = alpha / r

    def mixed(self, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = gates.to(self.A.dtype)
        return torch.einsum("e,eri->ri", g, self.A), torch.einsum("e,eor->or", g, self.B)

    def delta(self, gates: torch.Tensor) -> torch.Tensor:
        """``s B_mix A_mix`` (out, in): what merging adds to the Linear's weight."""
        a, b = self.mixed(gates)
        return self.scaling * (b @ a)

    def forward(self, x: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # a sparse parent: the delta lives on the kept weights only
            return F.linear(x, (self.delta(gates) * mask).to(x.dtype))
        a, b = self.mixed(gates)
        return ((x @ a.t().to(x.dtype)) @ b.t().to(x.dtype)) * self.scaling


class SMoL(HookedAdapters):
    """The router and one :class:`MixtureLoRA` per named Linear; :meth:`attach` hooks them in.
    Set :attr:`gates` (by :meth:`route`) before every forward."""

    def __init__(self, model: nn.Module, names: list[str], *, num_layers: int, num_widths: int, experts: int,
                 rank: int, alpha: float, router_hidden: int = 16, top_k: int = 2, seed: int = 0,
                 masks: dict[str, torch.Tensor] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = list(names)
        self.router = Router(num_layers, num_widths, experts, hidden=router_hidden, top_k=top_k, generator=g)
        self.experts = nn.ModuleList()
        for name in self.names:
            lin = model.get_submodule(name)
            self.experts.append(MixtureLoRA(lin.in_features, lin.out_features, rank, alpha, experts, g))
        self.masks = {n: masks[n] for n in self.names if masks and n in masks}
        self.gates: torch.Tensor | None = None
        self._handles: list = []

    def route(self, layers: tuple[int, ...], width: int, noise: torch.Generator | None = None) -> torch.Tensor:
        self.gates = self.router(layers, width, noise)
        return self.gates

    def added(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.gates is None:
            raise RuntimeError("SMoL: no subnet routed before the forward")
        mask = self.masks.get(self.names[index])
        return self.experts[index](x, self.gates, None if mask is None else mask.to(x.device))

    @torch.no_grad()
    def deltas(self, layers: tuple[int, ...], width: int) -> dict[str, torch.Tensor]:
        """Per Linear name: the (masked) delta of the subnet, routed without noise."""
        gates = self.router(layers, width, None)
        out = {}
        for name, mix in zip(self.names, self.experts):
            d = mix.delta(gates)
            if name in self.masks:
                d = d * self.masks[name].to(d.dtype)
            out[name] = d
        return out
