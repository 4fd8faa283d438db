"""Quantized models in PyTorch: fake-quant modules and the artifact format.

A quantized artifact (format ``quantized`` in :mod:`compress.formats`) is a Hugging Face folder
whose ``config.json`` is the plain model's, plus ``quantization.json`` (what was quantized, how)
and ``model.safetensors`` holding, for every quantized Linear ``NAME``: ``NAME.qweight`` (packed
codes, MatMulNBits layout ``(N, kb, group*bits/8)``), ``NAME.scales`` (fp32 ``(N, kb)``) and
``NAME.qzeros`` (uint8 ``(N, kb)``), beside the unquantized tensors (norms, biases, an fp32
embedding). Sparsity masks are not stored here but in the folder's ``masks.safetensors``
(:mod:`compress.masks`; format version 1 kept them as ``NAME.mask``, still read).
``load_quantized`` gives a fake-quant model: each Linear computes with
``(codes - zero) * scale`` — exactly what the ONNX export's ``MatMulNBits`` computes.

Training modes of ``QuantLinear``:
- ``frozen``: codes fixed; scale (and zero, through a straight-through round) trainable;
- ``ste``: a latent fp weight is re-rounded every forward with straight-through gradients
  (LSQ / EfficientQAT); ``freeze()`` turns it into codes;
- ``pv``: codes fixed in the forward; a latent buffer collects gradients and a discrete
  step re-rounds at most a capped fraction of codes (PV-Tuning, scalar version).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .formats import QUANT_CONFIG
from .ops import quant as Q

FORMAT = "compress-int-groupwise"
FORMAT_VERSION = 2  # 2: sparsity masks live in masks.safetensors (compress.masks), not beside the codes


@dataclass(frozen=True)
class LinearQuant:
    bits: int
    group: int
    sym: bool

    def to_dict(self) -> dict:
        return asdict(self)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, q: LinearQuant, *, bias: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.q = in_features, out_features, q
        kb = Q.num_groups(in_features, q.group)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(out_features, kb))
        self.zero = nn.Parameter(torch.zeros(out_features, kb), requires_grad=not q.sym)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.register_buffer("mask", mask.bool() if mask is not None else None)
        self.latent: nn.Parameter | None = None
        self.mode = "frozen"
        self._cache: tuple | None = None
        # emulate MatMulNBits accuracy_level 4 (activations rounded to int8 per K block, symmetric)
        self.act_int8 = False

    # --- construction
    @classmethod
    def from_linear(cls, lin: nn.Linear, q: LinearQuant, codes, scale, zero, mask=None) -> "QuantLinear":
        m = cls(lin.in_features, lin.out_features, q, bias=lin.bias, mask=mask)
        m.set_codes(codes, scale, zero)
        return m

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        zero = zero.round().clamp(0, Q.qmax(self.q.bits))
        if self.mask is not None:  # pruned weights sit exactly on the zero point: dequantize to 0
            codes = torch.where(self.mask, codes.to(torch.uint8), Q.expand(zero, self.q.group, self.in_features)
                                .to(torch.uint8))
        self.codes.copy_(codes.to(torch.uint8))
        self.scale.copy_(scale.float())
        self.zero.copy_(zero.float())

    # --- the weight
    def zero_int(self) -> torch.Tensor:
        return Q.round_ste(self.zero.clamp(0, Q.qmax(self.q.bits)))

    def weight_q(self) -> torch.Tensor:
        if not torch.is_grad_enabled() and self.mode == "frozen":
            # inference: dequantize once per (codes, scale, zero) version, not every forward
            key = (self.codes._version, self.scale._version, self.zero._version, id(self.codes), id(self.scale))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self._weight_q())
            return self._cache[1]
        self._cache = None
        return self._weight_q()

    def _weight_q(self) -> torch.Tensor:
        if self.mode == "ste":
            w = Q.fake_quant_ste(self.latent, self.scale, self.zero, self.q.bits, self.q.group)
        else:
            k = self.in_features
            w = (self.codes.float() - Q.expand(self.zero_int(), self.q.group, k)) * Q.expand(self.scale, self.q.group, k)
            if self.mode == "pv":
                w = w + (self.latent - self.latent.detach())  # gradients land on the latent buffer
        if self.mask is not None:
            w = w * self.mask
        return w

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (read-only view for exporters and inspection)."""
        with torch.no_grad():
            return self.weight_q().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_int8:
            x = int8_blockwise(x, self.q.group)
        return F.linear(x, self.weight_q().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # --- training modes
    def start(self, mode: str, reference: torch.Tensor | None = None) -> None:
        """Enter a training mode; ``ste`` and ``pv`` start their latent weight at the current codes.

        ``reference`` (the full-precision weight these codes approximate) moves the latent inside
        each code's rounding cell towards it, by at most 0.49 of a step: the latent still rounds to
        the same codes (the forward is unchanged), but it keeps where the original weight pointed.
        Started exactly on the grid, every latent sits on a rounding boundary's far side from the
        fp weight's intent and the first straight-through steps flip codes at random; measured in
        benchmarks/ste_start_probe.py (16 steps of KL: on the grid 0.209 -> 1.635, in the cell
        0.209 -> 0.191)."""
        if mode not in ("frozen", "ste", "pv"):
            raise ValueError(f"unknown mode {mode}")
        if mode in ("ste", "pv"):
            with torch.no_grad():
                w = Q.dequantize(self.codes, self.scale, self.zero.clamp(0, Q.qmax(self.q.bits)).round(), self.q.group)
                if reference is not None:
                    if reference.shape != w.shape:
                        raise ValueError(f"reference weight {tuple(reference.shape)} does not match {tuple(w.shape)}")
                    half = 0.49 * Q.expand(self.scale.detach().abs(), self.q.group, self.in_features)
                    step = torch.maximum(torch.minimum(reference.float() - w, half), -half)
                    if self.mask is not None:
                        step = step * self.mask
                    w = w + step
            self.latent = nn.Parameter(w)
        self.mode = mode

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the codes the training ended on (the same rounding the forward used) and drop the latent."""
        if self.mode == "ste":
            zero = self.zero.clamp(0, Q.qmax(self.q.bits)).round()
            codes = Q.quantize(self.latent, self.scale, zero, self.q.bits, self.q.group)
            self.set_codes(codes, self.scale, zero)
        else:
            self.zero.copy_(self.zero.clamp(0, Q.qmax(self.q.bits)).round())
        self.latent = None
        self.mode = "frozen"

    @torch.no_grad()
    def pv_step(self, max_fraction: float) -> int:
        """Re-round the codes towards the latent weight, changing at most ``max_fraction`` of
        them (those the latent most clearly wants moved); returns how many changed."""
        zero = self.zero.clamp(0, Q.qmax(self.q.bits)).round()
        target = Q.quantize(self.latent, self.scale, zero, self.q.bits, self.q.group)
        if self.mask is not None:
            target = torch.where(self.mask, target, self.codes)
        changed = target != self.codes
        n = int(changed.sum())
        cap = int(max_fraction * self.codes.numel())
        if n > cap:
            k = self.in_features
            cur = Q.dequantize(self.codes, self.scale, zero, self.q.group)
            pull = ((self.latent - cur).abs() / Q.expand(self.scale, self.q.group, k)).masked_fill(~changed, -1)
            keep = torch.zeros_like(changed).flatten()
            keep[torch.topk(pull.flatten(), cap).indices] = True
            changed = changed & keep.view_as(changed)
            n = cap
        self.codes.copy_(torch.where(changed, target, self.codes))
        return n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.q.bits}, group={self.q.group}, "
                f"sym={self.q.sym}, mode={self.mode}")


def int8_blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of activations per block of ``block`` along the last
    dimension (scale = absmax / 127): what ONNX Runtime's CPU MatMulNBits does at accuracy_level 4."""
    k = x.shape[-1]
    kb = -(-k // block)
    pad = kb * block - k
    xp = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], kb, block)
    scale = xp.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(xp * inv).clamp(-127, 127)
    return (q * scale).reshape(*x.shape[:-1], kb * block)[..., :k].to(x.dtype)


class TiedQuantEmbedding(nn.Module):
    """The input embedding of a model whose tied head is quantized: rows of the head's
    dequantized weight (one stored matrix serves both, as in the ONNX export)."""

    def __init__(self, head: QuantLinear, padding_idx: int | None = None):
        super().__init__()
        self.head = [head]  # a list: not registered as a submodule twice
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.head[0].weight_q())


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def tie_quantized_head(model: nn.Module) -> None:
    """After the tied head became a ``QuantLinear``, make the embedding read it."""
    head = model.get_output_embeddings()
    if isinstance(head, QuantLinear):
        emb = model.get_input_embeddings()
        model.set_input_embeddings(TiedQuantEmbedding(head, getattr(emb, "padding_idx", None)))


def dividing_group(group: int, k: int) -> int:
    """``group``, or the largest power of two >= 16 below it that divides ``k`` (``group`` itself when
    none does: the last block is padded)."""
    g = group
    while g > 16 and k % g:
        g //= 2
    return g if k % g == 0 else group


@torch.no_grad()
def quantize_tied_head_(model: nn.Module, q: LinearQuant) -> None:
    """The tied embedding / head as one min-max quantized ``QuantLinear`` that both read."""
    head = model.get_output_embeddings()
    w = head.weight.detach().float()
    s, z = Q.minmax_params(w, q.bits, q.group, q.sym)
    lin = nn.Linear(head.in_features, head.out_features, bias=False)
    lin.weight = nn.Parameter(w, requires_grad=False)
    qm = QuantLinear.from_linear(lin, q, Q.quantize(w, s, z, q.bits, q.group), s, z)
    qm.scale.requires_grad_(False)
    qm.zero.requires_grad_(False)
    model.set_output_embeddings(qm)
    tie_quantized_head(model)


@torch.no_grad()
def quantize_rtn_(model: nn.Module, linear_names: list[str], bits: int, group: int, *, embed_bits: int | None = 8,
                  embed_group: int = 64) -> None:
    """Round-to-nearest (min-max, asymmetric) group-wise quantization of ``linear_names`` and, where
    tied, the embedding / head (``embed_bits``; None keeps it): the shapes and the format the
    quantize pass writes, at its cheapest initialization. What a latency measurement needs: the
    kernels' speed depends on the shapes, not on the values."""
    for name in linear_names:
        lin = model.get_submodule(name)
        q = LinearQuant(bits, dividing_group(group, lin.in_features), False)
        w = lin.weight.detach().float()
        s, z = Q.minmax_params(w, bits, q.group, q.sym)
        replace_module(model, name, QuantLinear.from_linear(lin, q, Q.quantize(w, s, z, bits, q.group), s, z))
    if embed_bits is not None and getattr(model.config, "tie_word_embeddings", False):
        d = model.get_output_embeddings().in_features
        quantize_tied_head_(model, LinearQuant(embed_bits, dividing_group(embed_group, d), True))


# ---------------------------------------------------------------- artifact I/O

def save_quantized(model: nn.Module, path: Path, info: dict[str, Any]) -> None:
    """Write config.json, model.safetensors (codes packed) and quantization.json."""
    from safetensors.torch import save_file

    path = Path(path)
    mods = quant_modules(model)
    for n, m in mods.items():
        if m.mode != "frozen" or m.latent is not None:
            raise RuntimeError(f"{n}: freeze() before saving")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for n, m in mods.items():
        tensors[f"{n}.qweight"] = Q.pack_codes(m.codes, m.q.bits, m.q.group).contiguous()
        tensors[f"{n}.scales"] = m.scale.detach().float().contiguous()
        tensors[f"{n}.qzeros"] = m.zero.detach().round().to(torch.uint8).contiguous()
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach().float().contiguous()
        layers[n] = {**m.q.to_dict(), "in_features": m.in_features, "out_features": m.out_features,
                     "masked": m.mask is not None}
    skip = set()
    for n in mods:
        skip.update({f"{n}.weight", f"{n}.bias", f"{n}.scale", f"{n}.zero", f"{n}.codes", f"{n}.mask"})
    tied_quant = isinstance(model.get_input_embeddings(), TiedQuantEmbedding)
    for k, v in model.state_dict().items():
        if k in skip or (tied_quant and k.endswith("embed_tokens.weight")):
            continue
        if k in tensors:
            continue
        tensors[k] = v.detach().float().contiguous()
    # tied fp weights appear under two names: store one
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")
    from .models import save_config

    save_config(model.config, path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / QUANT_CONFIG).write_text(json.dumps(
        {"format": FORMAT, "version": FORMAT_VERSION, "tied_head_quantized": tied_quant, **info, "layers": layers},
        indent=2))


def load_quantized(path: Path, *, dtype: torch.dtype = torch.float32, **_: Any) -> nn.Module:
    """The fake-quant PyTorch model of a quantized artifact, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    from .untrusted import read_json

    qc = read_json(path / QUANT_CONFIG)
    if qc.get("format") != FORMAT or int(qc.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"unsupported quantization format {qc.get('format')} v{qc.get('version')}")
    from .models import load_config

    config = load_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(path / "model.safetensors"))
    from .masks import read_masks

    masks = read_masks(path)
    for name, spec in qc["layers"].items():
        q = LinearQuant(int(spec["bits"]), int(spec["group"]), bool(spec["sym"]))
        k, n = int(spec["in_features"]), int(spec["out_features"])
        mask = masks.get(name)
        if f"{name}.mask" in tensors:  # format version 1
            mask = Q.unpack_codes(tensors.pop(f"{name}.mask"), 2, k).bool()
        elif spec.get("masked") and mask is None:
            raise ValueError(f"{name} is masked but {path} has no mask for it")
        m = QuantLinear(k, n, q, bias=tensors.pop(f"{name}.bias", None), mask=mask)
        codes = Q.unpack_codes(tensors.pop(f"{name}.qweight"), q.bits, k)
        m.set_codes(codes, tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.qzeros").float())
        replace_module(model, name, m)
    if qc.get("tied_head_quantized"):
        tie_quantized_head(model)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    quant_names = set(qc["layers"])
    really_missing = [k for k in missing if k.rsplit(".", 1)[0] not in quant_names
                      and not (k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False))]
    if really_missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {really_missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False) and not qc.get("tied_head_quantized"):
        model.tie_weights()
    from .arch import arch_of

    arch_of(model).rebuild_rotary(model)  # rotary buffers were created on the meta device
    model.to(dtype)
    for m in quant_modules(model).values():
        m.scale.data = m.scale.data.float()
        m.zero.data = m.zero.data.float()
    model.eval()
    return model
