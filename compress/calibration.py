"""Layer-wise calibration, shared by every pass that compresses one decoder layer at a time
(GPTQ, clip search and Block-AP in ``quantize``; SparseGPT, Wanda and FLAP next).

The decoder layers run one at a time on the calibration sequences, GPTQ's sequential scheme:
each layer sees the inputs produced by the *already compressed* layers before it, so errors are
corrected where they arise. Per layer the caller gets

- ``inputs``: the hidden states (and replayed keyword arguments) entering the layer;
- ``stats(names)``: per Linear, statistics of its inputs — the Hessian proxy ``H = 2 XᵀX / n``,
  the per-channel squared norm ``‖X_j‖²`` (Wanda) and mean / variance (FLAP's fluctuation);
- ``reference``: with ``reference=True``, the outputs the *uncompressed* layer gives on the
  uncompressed path (Block-AP's target), computed before the caller changes the layer.

When the loop body returns, the compressed layer runs on ``inputs`` to make the next layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .arch import ArchSpec, arch_of

LayerInputs = list[tuple[torch.Tensor, dict]]


@dataclass
class LinearStats:
    """Input statistics of one Linear over the calibration tokens (float32)."""

    n: int  # tokens seen
    sum: torch.Tensor  # (in,) Σ x_j
    h: torch.Tensor | None  # (in, in) 2 XᵀX / n, when requested

    @property
    def sq_norm(self) -> torch.Tensor:
        """‖X_j‖² per input channel (Wanda's activation norm, squared)."""
        return torch.diagonal(self.h) * (self.n / 2.0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance of the inputs (FLAP's fluctuation metric)."""
        return (self.sq_norm / max(self.n, 1) - self.mean ** 2).clamp_min(0)


def capture_layer_inputs(model, blocks: torch.Tensor, batch: int, arch: ArchSpec | None = None) -> LayerInputs:
    """The hidden states and keyword arguments the first decoder layer receives, per batch."""
    arch = arch or arch_of(model)
    layer0 = arch.decoder_layers(model)[0]
    captured: LayerInputs = []

    class _Stop(Exception):
        pass

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k in arch.layer_kwargs}
        captured.append((hidden.detach(), kw))
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, blocks.shape[0], batch):
                try:
                    model(input_ids=blocks[i:i + batch], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's output hidden states on every calibration batch (no gradients)."""
    with torch.no_grad():
        outs = []
        for h, kw in inputs:
            y = layer(h, **kw)
            outs.append((y[0] if isinstance(y, tuple) else y).detach())
    return outs


def input_stats(layer, inputs: LayerInputs, names: list[str], hessian: bool = True) -> dict[str, LinearStats]:
    """Per Linear of ``layer`` (relative names): statistics of its inputs on ``inputs``."""
    acc = {n: {"h": None, "n": 0, "sum": None} for n in names}
    handles = []
    for n in names:
        mod = layer.get_submodule(n)

        def hook(m, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = acc[n]
            s = x.sum(0)
            st["sum"] = s if st["sum"] is None else st["sum"] + s
            if hessian:
                h = x.T @ x
                st["h"] = h if st["h"] is None else st["h"] + h
            st["n"] += x.shape[0]
        handles.append(mod.register_forward_hook(hook))
    try:
        run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return {n: LinearStats(n=st["n"], sum=st["sum"], h=None if st["h"] is None else st["h"] * (2.0 / max(st["n"], 1)))
            for n, st in acc.items()}


@dataclass
class LayerStep:
    index: int
    layer: torch.nn.Module
    inputs: LayerInputs  # entering this layer on the compressed path
    reference: list[torch.Tensor] | None  # the uncompressed layer's outputs on the uncompressed path

    def stats(self, names: list[str] | None = None, hessian: bool = True) -> dict[str, LinearStats]:
        return input_stats(self.layer, self.inputs, list(names or []), hessian=hessian)


class LayerwiseCalibration:
    """Iterate a model's decoder layers with their calibration inputs (see the module docstring)."""

    def __init__(self, model, blocks: torch.Tensor, *, batch: int = 4, reference: bool = False,
                 arch: ArchSpec | None = None):
        self.arch = arch or arch_of(model)
        self.model = model
        self.layers = self.arch.decoder_layers(model)
        self.inputs = capture_layer_inputs(model, blocks, batch, self.arch)
        self.fp_inputs = [(h.clone(), kw) for h, kw in self.inputs] if reference else None

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerStep]:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            reference = run_layer(layer, self.fp_inputs) if self.fp_inputs is not None else None
            yield LayerStep(i, layer, self.inputs, reference)
            if i + 1 < n:  # the compressed layer makes the next layer's inputs
                self.inputs = [(y, kw) for y, (_, kw) in zip(run_layer(layer, self.inputs), self.inputs)]
            if self.fp_inputs is not None:
                self.fp_inputs = [(y, kw) for y, (_, kw) in zip(reference, self.fp_inputs)]
        self.inputs, self.fp_inputs = [], None
