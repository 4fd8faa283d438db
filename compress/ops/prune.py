"""One-shot pruning math: magnitude, Wanda, SparseGPT, N:M patterns and OWL per-layer ratios.

Every function returns a boolean mask (``True`` = weight kept, the convention of
:mod:`compress.masks`) of the weight's shape, and SparseGPT also the updated weights. Sparsity
is exact: an unstructured mask of a (N, K) tensor at fraction ``s`` prunes exactly
``round(s * N * K)`` weights (ties broken by position, never by ``<=`` on a threshold, which
over-prunes on ties); an ``N:M`` mask keeps exactly N of every M consecutive input weights.

- magnitude: the smallest ``|W|`` in the whole tensor;
- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||`` compared within each output row;
- SparseGPT (Frantar & Alistarh 2023, the authors' ``fasterprune``): columns in blocks of 128,
  the mask of each block chosen adaptively by ``w^2 / [H^-1]_jj^2`` over the block, every pruned
  weight's error spread over the not-yet-processed columns through the Cholesky factor of
  ``H^-1`` (the OBS update), dampening ``damp * mean(diag H)``;
- OWL (Yin et al. 2024): per-layer sparsity from each layer's share of outlier Wanda scores
  (``> M x`` the layer's mean score), spread over ``target +- lambda`` around the target.
"""

from __future__ import annotations

import torch


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for ``unstructured``, else ``(n, m)``: at most N of every M inputs kept."""
    if pattern == "unstructured":
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def pruned_count(numel: int, sparsity: float) -> int:
    return int(round(sparsity * numel))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask keeping all but the ``k`` lowest entries of ``scores`` (any shape; stable ties)."""
    flat = scores.reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat.double(), stable=True).indices
        keep[order[:k]] = False
    return keep.view(scores.shape)


def _rowwise_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D ``scores``: keep all but the ``k`` lowest."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores.double(), dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input dimension."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"in_features {k} is not a multiple of {m}")
    g = scores.reshape(rows, k // m, m).double()
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, torch.sort(g, dim=2, descending=True, stable=True).indices[..., :n], True)
    return keep.reshape(rows, k)


def magnitude_mask(w: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured") -> torch.Tensor:
    scores = w.detach().abs().float()
    nm = parse_pattern(pattern)
    if nm:
        return n_m_mask(scores, *nm)
    return _lowest(scores, pruned_count(scores.numel(), sparsity))


def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` (``sq_norm``: per input channel ``||X_j||^2`` over the calibration tokens)."""
    return w.detach().abs().float() * sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float = 0.5,
               pattern: str = "unstructured") -> torch.Tensor:
    """Wanda: the lowest scores of each output row (its comparison group), or N:M groups."""
    scores = wanda_scores(w, sq_norm)
    nm = parse_pattern(pattern)
    if nm:
        return n_m_mask(scores, *nm)
    return _rowwise_lowest(scores, pruned_count(w.shape[1], sparsity))


def _hinv_cholesky(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian (dead inputs' columns zeroed in ``w``)."""
    h = h.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True), dead


def sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured", *,
              damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one Linear: ``(updated weights, mask)``. ``h`` is the layer-input Hessian
    proxy ``2 X^T X / n`` (K, K). Unstructured: exactly ``round(sparsity * N * K)`` weights pruned,
    split over the column blocks in proportion to their width (cumulative rounding)."""
    w = w.detach().double().clone()
    rows, k = w.shape
    hinv, _ = _hinv_cholesky(h, w, damp)
    nm = parse_pattern(pattern)
    if nm and k % nm[1]:
        raise ValueError(f"in_features {k} is not a multiple of {nm[1]}")
    if nm and block % nm[1]:
        block = max(block // nm[1], 1) * nm[1]
    keep = torch.ones(rows, k, dtype=torch.bool)
    total = pruned_count(rows * k, sparsity) if nm is None else 0
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        d = torch.diag(hinv1)
        if nm is None:  # the block's share of the tensor's exact count
            count = round(total * b1 / k) - round(total * b0 / k)
            keep1 = _lowest(w1 ** 2 / d.unsqueeze(0) ** 2, count)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            if nm is not None and i % nm[1] == 0:
                seg = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                keep1[:, i:i + nm[1]] = n_m_mask(seg, nm[0], nm[1])
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
        keep[:, b0:b1] = keep1
    w[~keep] = 0
    return w.float(), keep


def outlier_ratio(scores: torch.Tensor, m: float = 5.0) -> float:
    """Share of a layer's Wanda scores above ``m`` times their mean (OWL's layerwise outlier distribution)."""
    return float((scores > m * scores.mean()).double().mean())


def owl_sparsities(outliers: list[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL: per-layer sparsity, layers with more outliers pruned less. The outlier ratios are scaled
    to ``[0, 2 lam]``, centred on the target's density, and the result is clipped to [0, 0.99]; the
    mean stays the target (before clipping)."""
    if not outliers:
        return []
    lo, hi = min(outliers), max(outliers)
    if hi - lo <= 0 or lam == 0:
        return [target] * len(outliers)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in outliers]
    mean = sum(scaled) / len(scaled)
    density = [x - mean + (1 - target) for x in scaled]
    return [min(max(1 - d, 0.0), 0.99) for d in density]


def mask_sparsity(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.double().mean()) if mask.numel() else 0.0


def check_fraction(mask: torch.Tensor, sparsity: float) -> bool:
    """The mask prunes exactly ``round(sparsity * numel)`` weights."""
    return int((~mask).sum()) == pruned_count(mask.numel(), sparsity)
