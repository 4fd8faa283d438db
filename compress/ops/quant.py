"""Group-wise integer weight quantization: pure tensor math, no I/O.

Conventions (those of ONNX Runtime's ``com.microsoft.MatMulNBits``, so codes export 1:1):

- a weight ``W`` is ``(N, K)`` = (out_features, in_features); groups run along **K**,
  ``kb = ceil(K / group)`` groups per row, the last one partial when ``group`` does not
  divide ``K``;
- ``scale`` and ``zero`` are ``(N, kb)``; codes ``q`` are integers in ``[0, 2**bits - 1]``;
  ``W ≈ (q - zero) * scale`` with an **integer** zero point (symmetric: ``zero = 2**(bits-1)``,
  MatMulNBits' default);
- packing is low bits first, one block of ``group`` codes per ``(n, block)`` row.

3-bit codes travel in 4-bit containers (MatMulNBits has no 3-bit kernel): the values are
exactly the 3-bit ones, the bytes those of 4-bit.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def container_bits(bits: int) -> int:
    """Bits per stored code: MatMulNBits runs 2, 4 and 8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}")
    return 4 if bits == 3 else bits


def qmax(bits: int) -> int:
    return (1 << bits) - 1


def num_groups(k: int, group: int) -> int:
    return math.ceil(k / group)


def expand(x: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """(N, kb) per-group values -> (N, K) per-weight values."""
    return x.repeat_interleave(group, dim=1)[:, :k]


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, kb, group); a partial last group is padded with its own first value,
    which changes neither its minimum nor its maximum."""
    n, k = w.shape
    kb = num_groups(k, group)
    pad = kb * group - k
    if pad:
        fill = w[:, (kb - 1) * group:(kb - 1) * group + 1].expand(n, pad)
        w = torch.cat([w, fill], dim=1)
    return w.reshape(n, kb, group)


def minmax_params(w: torch.Tensor, bits: int, group: int, sym: bool,
                  shrink_max: torch.Tensor | float = 1.0, shrink_min: torch.Tensor | float = 1.0):
    """Scale and (integer) zero point per group from the group's range.

    Asymmetric: the range [min, max] (widened to include 0, so a zero weight stays exactly
    zero) maps onto [0, 2**bits - 1]. Symmetric: ``absmax / (2**(bits-1) - 1)``, zero
    ``2**(bits-1)``. ``shrink_*`` scale the range (clipping search), per group or scalar.
    """
    g = grouped(w.detach().float(), group)
    top = qmax(bits)
    if sym:
        amax = g.abs().amax(dim=2) * shrink_max
        scale = (amax / max((1 << (bits - 1)) - 1, 1)).clamp_min(1e-10)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    hi = g.amax(dim=2).clamp_min(0) * shrink_max
    lo = g.amin(dim=2).clamp_max(0) * shrink_min
    scale = ((hi - lo) / top).clamp_min(1e-10)
    zero = torch.round(-lo / scale).clamp(0, top)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Integer codes (uint8, (N, K)) of ``w`` on the grid (scale, zero)."""
    k = w.shape[1]
    q = torch.round(w.float() / expand(scale, group, k)) + expand(zero, group, k)
    return q.clamp(0, qmax(bits)).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    k = q.shape[1]
    return (q.float() - expand(zero, group, k)) * expand(scale, group, k)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def fake_quant_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding: gradients reach ``w``, ``scale``
    and ``zero`` (LSQ / EfficientQAT's ``UniformAffineQuantizer``)."""
    k = w.shape[1]
    s = expand(scale, group, k)
    z = round_ste(expand(zero, group, k).clamp(0, qmax(bits)))
    q = torch.clamp(round_ste(w / s) + z, 0, qmax(bits))
    return (q - z) * s


# ---------------------------------------------------------------- packing (MatMulNBits layout)

def pack_codes(q: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """(N, K) codes -> (N, kb, group * cbits / 8) uint8, low bits first, the last block
    zero-padded. ``bits`` is the code width; it is stored in its container width."""
    cb = container_bits(bits)
    n, k = q.shape
    kb = num_groups(k, group)
    full = torch.zeros(n, kb * group, dtype=torch.uint8)
    full[:, :k] = q.to(torch.uint8)
    per = 8 // cb
    full = full.reshape(n, kb * group // per, per).to(torch.int32)
    out = torch.zeros(full.shape[:2], dtype=torch.int32)
    for i in range(per):
        out |= full[:, :, i] << (cb * i)
    return out.to(torch.uint8).reshape(n, kb, group * cb // 8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: (N, kb, blob) uint8 -> (N, K) uint8 codes."""
    cb = container_bits(bits)
    n = packed.shape[0]
    flat = packed.reshape(n, -1).to(torch.int32)
    per = 8 // cb
    parts = [(flat >> (cb * i)) & ((1 << cb) - 1) for i in range(per)]
    return torch.stack(parts, dim=2).reshape(n, -1)[:, :k].to(torch.uint8)


def pack_zero_points(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, kb) integer zero points -> MatMulNBits' packed uint8 (N, ceil(kb * cbits / 8))."""
    cb = container_bits(bits)
    n, kb = zero.shape
    per = 8 // cb
    width = math.ceil(kb / per)
    full = torch.zeros(n, width * per, dtype=torch.int32)
    full[:, :kb] = zero.round().to(torch.int32)
    full = full.reshape(n, width, per)
    out = torch.zeros(n, width, dtype=torch.int32)
    for i in range(per):
        out |= full[:, :, i] << (cb * i)
    return out.to(torch.uint8)


def unpack_zero_points(packed: torch.Tensor, bits: int, kb: int) -> torch.Tensor:
    cb = container_bits(bits)
    flat = packed.to(torch.int32)
    per = 8 // cb
    parts = [(flat >> (cb * i)) & ((1 << cb) - 1) for i in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)[:, :kb].to(torch.uint8)


# ---------------------------------------------------------------- GPTQ (no act-order)

def mse_params(w: torch.Tensor, bits: int, group: int, sym: bool, shrinks: list[float]):
    """Per (row, group) the range shrink (both sides alike) whose grid has the least squared
    weight error: MSE clipping of min-max scales."""
    best = None
    gw = grouped(w, group)
    for a in shrinks:
        s, z = minmax_params(w, bits, group, sym, shrink_max=a, shrink_min=a)
        q = torch.clamp(torch.round(gw / s[..., None]) + z[..., None], 0, qmax(bits))
        err = ((q - z[..., None]) * s[..., None] - gw).pow(2).sum(dim=2)
        if best is None:
            best = (err, s, z)
        else:
            better = err < best[0]
            best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2]))
    return best[1], best[2]


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, sym: bool, *,
         damp: float = 0.01, block: int = 128, mask: torch.Tensor | None = None,
         shrinks: list[float] | None = None):
    """GPTQ (Frantar et al.) in natural column order, group-wise scales fixed from the
    error-updated weights at each group's first column (min-max, or the best of ``shrinks``
    by weight MSE); returns (codes, scale, zero).

    ``mask`` (N, K bool, True = kept) keeps pruned weights at exactly zero: they are
    quantized to the zero point and their error is not propagated.
    """
    w = w.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    kb = num_groups(k, group)
    scale = torch.zeros(n, kb)
    zero = torch.zeros(n, kb)
    q = torch.zeros(n, k, dtype=torch.uint8)
    top = qmax(bits)
    block = max(block // group, 1) * group  # groups never straddle blocks
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                gi = col // group
                if shrinks:
                    s, z = mse_params(w1[:, i:i + group], bits, group, sym, shrinks)
                else:
                    s, z = minmax_params(w1[:, i:i + group], bits, group, sym)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            gi = col // group
            wc = w1[:, i]
            qc = torch.clamp(torch.round(wc / scale[:, gi]) + zero[:, gi], 0, top)
            if mask is not None:
                qc = torch.where(mask[:, col], qc, zero[:, gi])
            q[:, col] = qc.to(torch.uint8)
            deq = (qc - zero[:, gi]) * scale[:, gi]
            e = (wc - deq) / hinv1[i, i]
            if mask is not None:
                e = torch.where(mask[:, col], e, torch.zeros_like(e))
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return q, scale, zero


def clip_search(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, sym: bool, grid: int, max_shrink: float,
                mask: torch.Tensor | None = None):
    """Per (row, group): the range shrink (max side, min side) minimizing the group's output
    error δᵀ H_gg δ (δ = W − Ŵ over the group), over a ``grid`` × ``grid`` set of shrinks.
    Returns ``(codes, scale, zero)``."""
    import torch.nn.functional as F

    n, k = w.shape
    g = group
    kb = num_groups(k, g)
    pad = kb * g - k
    hp = F.pad(h, (0, pad, 0, pad))
    hb = torch.stack([hp[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(kb)])  # (kb, g, g)
    wg = F.pad(w, (0, pad)).reshape(n, kb, g)
    best_err = torch.full((n, kb), float("inf"))
    best_s = torch.zeros(n, kb)
    best_z = torch.zeros(n, kb)
    ratios = [1 - max_shrink * i / max(grid - 1, 1) for i in range(grid)] if grid > 1 else [1.0]
    pairs = [(a, a) for a in ratios] if sym else [(a, b) for a in ratios for b in ratios]
    for a, b in pairs:
        s, z = minmax_params(w, bits, g, sym, shrink_max=a, shrink_min=b)
        codes = quantize(w, s, z, bits, g)
        deq = dequantize(codes, s, z, g)
        d = wg - F.pad(deq, (0, pad)).reshape(n, kb, g)
        if mask is not None:
            d = d * F.pad(mask.float(), (0, pad)).reshape(n, kb, g)
        err = torch.einsum("nkg,kgh,nkh->nk", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return quantize(w, best_s, best_z, bits, g), best_s, best_z


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Relative layer-output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for inputs with Hessian proxy ``h``."""
    d = w - w_hat
    return float(torch.einsum("nk,kj,nj->", d, h, d) / torch.einsum("nk,kj,nj->", w, h, w).clamp_min(1e-20))
