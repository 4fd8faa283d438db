"""Low-rank adapters on frozen Linears (Hu et al. 2021), attached by forward hooks and folded back.

``y = W x + (alpha / r) B A x``: ``A`` (r x in, Kaiming), ``B`` (out x r, zero), so an adapter
starts as the identity of its Linear. Adapters are hooks, not module replacements: the model keeps
its own classes (and its state-dict names), other hooks on the same Linear (a pass's output
transform) see the adapted output when registered after the adapter's, and :meth:`Adapters.fold`
writes ``W + (alpha / r) B A`` into each Linear and removes the hooks. No dropout: a pass's run is a
pure function of its data order, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        r = max(1, min(rank, in_features, out_features))
        self.A = nn.Parameter(torch.empty(r, in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(out_features, r))
        self.scaling = alpha / r

    def delta(self) -> torch.Tensor:
        """``(alpha / r) B A``: what folding adds to the Linear's weight."""
        return self.scaling * (self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)) * self.scaling


class HookedAdapters(nn.Module):
    """Something added to the output of each named Linear (``names``) by a forward hook: a subclass
    says what (:meth:`added`); :meth:`attach` hooks it in, :meth:`detach_hooks` takes it out."""

    names: list[str]

    def added(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attach(self, model: nn.Module):
        for i, name in enumerate(self.names):
            self._handles.append(model.get_submodule(name).register_forward_hook(
                lambda _m, inp, out, i=i: out + self.added(i, inp[0])))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Adapters(HookedAdapters):
    """One :class:`LoRA` per named Linear of ``model``; :meth:`attach` hooks them in."""

    def __init__(self, model: nn.Module, names: list[str], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        self.names = list(names)
        self.adapters = nn.ModuleList()
        g = torch.Generator().manual_seed(seed)  # the same adapters on every run (resume equals uninterrupted)
        for name in self.names:
            lin = model.get_submodule(name)
            self.adapters.append(LoRA(lin.in_features, lin.out_features, rank, alpha, g))
        self._handles: list = []

    def added(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[index](x)

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """``W += (alpha / r) B A`` into every adapted Linear; the hooks are removed."""
        self.detach_hooks()
        for name, lora in zip(self.names, self.adapters):
            lin = model.get_submodule(name)
            lin.weight.data = (lin.weight.data.float() + lora.delta().float()).to(lin.weight.dtype)
