"""PAT's Hybrid Sparsification Modules and their materialization (METHODS.md section 1).

One trainable mask over the residual (hidden) channels, shared by every module; 2L + 1 modules:
after the embedding, and after every attention output projection and every MLP down projection
(before the residual add; the family's ``residual_writers`` in :mod:`compress.arch`). Each module is ``HSM(x) = s * m * (x + B A x)``: ``A`` (r x d, Kaiming)
and ``B`` (d x r, zero) start as the identity, ``s`` (d, ones) carries the per-channel scale, ``m``
the shared mask. Because the embedding and every residual update are masked, a pruned channel of
the residual stream is exactly zero and every RMSNorm only sees the kept ones.

Soft mask at optimizer step ``t`` of a schedule of ``G`` steps: ``m = sigmoid(T(t) theta) + b(t)``
with ``T(t) = 1 / (1 - ln max(1, t) / ln G + 1e-6)`` and ``b(t) = max(0.5 - t / G, 0)``: exactly 1
at step 0. From ``0.5 G`` (where ``b`` reaches 0) the count is held at exactly ``d'`` by shifting all of
``theta`` by one constant before each step (:meth:`SharedMask.hold`): measured on SmolLM2, CE and KL
outgrow the count loss as ``T`` sharpens the mask and pull dropped channels back (the count drifted
from 448 to 498, and the snap at 0.8 G then dropped 50 channels at once). From ``0.8 G`` on
``theta`` is detached (the authors), and here the mask is the hard one
(the authors keep the soft mask at ``T(0.8 G)``, binary only where ``theta`` is polarized): the pass
first snaps ``theta`` so that exactly ``d'`` channels are kept (:meth:`SharedMask.snap`), so the last
20 % of the steps tune exactly the model that is materialized. The hard mask keeps channel ``j`` iff
``theta_j > 0``.

With tied embeddings the module after the embedding is a pure mask (no transform, no scale): the
head shares the embedding matrix and is only sliced, so transforming it would change the head.

:func:`materialize` folds each module into its producer (``diag(s) (I + B A)`` into the rows of
``o_proj`` / ``down_proj`` and into the embedding), slices the kept channels out of every
producer and consumer, scales every RMSNorm weight by ``sqrt(d / d')`` (the mean now runs over
``d'`` channels) and its epsilon by ``d / d'`` (so the scaling is exact, not approximate), sets
``hidden_size = d'`` and keeps ``head_dim`` explicit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...arch import arch_of

FREEZE_AT = 0.8  # share of the schedule after which theta is detached and T frozen
HOLD_AT = 0.5  # share of the schedule from which the kept count is held at d' (the bias b(t) is 0 from here)


def mask_temperature(step: int, total: int) -> float:
    """``T(t)``; frozen at ``T(0.8 G)`` from ``0.8 G`` on."""
    t = min(step, FREEZE_AT * total)
    return 1.0 / (1.0 - math.log(max(1.0, t)) / math.log(max(total, 2)) + 1e-6)


def mask_bias(step: int, total: int) -> float:
    return max(0.5 - step / max(total, 1), 0.0)


def ranking(values: torch.Tensor) -> torch.Tensor:
    """Channel indices from the highest value down, ties by channel index (deterministic)."""
    return torch.tensor(sorted(range(values.numel()), key=lambda j: (-float(values[j]), j)), dtype=torch.long)


class SharedMask(nn.Module):
    """The one mask over the ``d`` residual channels (``theta``, init 0)."""

    def __init__(self, hidden: int, total_steps: int):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(hidden))
        self.total = int(total_steps)
        self.step = 0  # the optimizer step, set by the training hook
        self.hard = False  # True: the binary mask theta > 0 (evaluation, materialization)

    def frozen(self) -> bool:
        """From ``0.8 G`` on, ``theta`` is fixed and the mask is binary."""
        return self.step >= FREEZE_AT * self.total

    def forward(self) -> torch.Tensor:
        if self.hard or self.frozen():
            # binary (no gradient to theta): the last 20 % tune the model that is materialized; the
            # authors keep sigma(T(0.8 G) theta), which is binary only where theta is polarized
            return (self.theta.detach() > 0).to(self.theta.dtype)
        return torch.sigmoid(mask_temperature(self.step, self.total) * self.theta) + mask_bias(self.step, self.total)

    def holding(self) -> bool:
        """From ``0.5 G`` on (after ``0.8 G`` theta no longer moves: a no-op but at the first frozen step)."""
        return self.step >= HOLD_AT * self.total

    @torch.no_grad()
    def rank_init(self, scores: torch.Tensor, target: int, spread: float) -> None:
        """theta in the order of ``scores`` (highest first, ties by channel index), evenly spaced over
        ``spread``, the ``target`` best positive and the rest negative: a warm start the mask refines."""
        d = scores.numel()
        pos = torch.arange(d, dtype=self.theta.dtype)
        self.theta.data[ranking(scores)] = spread * (target - 0.5 - pos) / d

    @torch.no_grad()
    def hold(self, target: int) -> float:
        """Shift every ``theta`` by one constant so that exactly ``target`` are >= 0 (the midpoint of
        the ``target``-th and the next largest moves to 0); the ranking and the gaps stay as they are.
        Returns the shift (0 when the count already holds with a margin, or a tie leaves no gap)."""
        top = torch.topk(self.theta.data, min(target + 1, self.theta.numel())).values
        if target >= self.theta.numel() or top[target - 1] == top[target]:
            return 0.0
        tau = float((top[target - 1] + top[target]) / 2)
        if top[target - 1] > 0 > top[target]:  # already exactly target kept, strictly on both sides
            return 0.0
        self.theta.data -= tau
        return tau

    @torch.no_grad()
    def snap(self, target: int) -> int:
        """Make exactly the ``target`` largest ``theta`` positive (the others <= 0), flipping only the
        channels on the wrong side to -+0.5; returns how many were flipped (0 when the count already
        holds). Deterministic (ties by channel index), and idempotent."""
        theta = self.theta.data
        keep = torch.zeros(theta.numel(), dtype=torch.bool)
        keep[ranking(theta)[:target]] = True
        up = keep & (theta <= 0)
        down = ~keep & (theta > 0)
        theta[up] = 0.5
        theta[down] = -0.5
        return int(up.sum() + down.sum())

    def kept(self) -> torch.Tensor:
        """Indices of the kept channels (``theta > 0``), ascending."""
        return torch.nonzero(self.theta.detach() > 0).flatten()

    def losses(self, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, polarization): ``|sum STE(1[theta >= 0]) - D| / D`` and the pull of theta towards
        +-0.5 (mean squared distance over each side)."""
        theta = self.theta
        step = (theta >= 0).to(theta.dtype)
        ste = step + torch.sigmoid(theta) - torch.sigmoid(theta).detach()  # straight-through count
        count = (ste.sum() - target).abs() / target
        pos, neg = theta[theta > 0], theta[theta <= 0]
        polar = theta.new_zeros(())
        if pos.numel():
            polar = polar + ((pos - 0.5) ** 2).mean()
        if neg.numel():
            polar = polar + ((neg + 0.5) ** 2).mean()
        return count, polar


class HSM(nn.Module):
    """``s * m * (x + B A x)``; ``transform=False``: ``m * x`` only (the tied embedding's)."""

    def __init__(self, hidden: int, mask: SharedMask, rank: int = 200, transform: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.mask = [mask]  # shared, not a submodule of every HSM (one parameter, one state)
        self.transform = transform
        if transform:
            r = min(rank, hidden)
            self.A = nn.Parameter(torch.empty(r, hidden))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
            self.B = nn.Parameter(torch.zeros(hidden, r))
            self.scale = nn.Parameter(torch.ones(hidden))

    def matrix(self) -> torch.Tensor:
        """``diag(s) (I + B A)``: what materialization folds into the producer."""
        eye = torch.eye(self.B.shape[0], dtype=self.B.dtype, device=self.B.device)
        return self.scale[:, None] * (eye + self.B @ self.A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask[0]().to(x.dtype)
        if not self.transform:
            return x * m
        y = x + (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype)
        return y * (self.scale.to(x.dtype) * m)

    def identity_loss(self) -> torch.Tensor:
        """``MSE(A A^T, I_r)``: A stays orthonormal, the magnitude moves into ``s``."""
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        return ((self.A @ self.A.t() - eye) ** 2).mean()


class PATModules(nn.Module):
    """The mask and the 2L + 1 HSMs of one decoder (after the embedding, and after each of a
    layer's residual writers, :attr:`ArchSpec.residual_writers`), attached by forward hooks."""

    def __init__(self, model: nn.Module, total_steps: int, rank: int = 200, seed: int = 0):
        super().__init__()
        cfg = model.config
        d = cfg.hidden_size
        arch = arch_of(model)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.mask = SharedMask(d, total_steps)
        g = torch.Generator().manual_seed(seed)  # the same modules on every run: a resumed run equals an uninterrupted one
        self.embed = HSM(d, self.mask, rank, transform=not self.tied, generator=g)
        self.layers = nn.ModuleList(nn.ModuleList(HSM(d, self.mask, rank, generator=g) for _ in arch.residual_writers)
                                    for _ in arch.decoder_layers(model))
        self._handles = []

    def attach(self, model: nn.Module) -> "PATModules":
        def hook(module):
            return lambda _m, _inp, out: module(out)

        arch = arch_of(model)
        self._handles.append(model.get_input_embeddings().register_forward_hook(hook(self.embed)))
        for layer, hsms in zip(arch.decoder_layers(model), self.layers):
            for rel, h in zip(arch.residual_writers, hsms):
                self._handles.append(layer.get_submodule(rel).register_forward_hook(hook(h)))
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def transforms(self) -> list[HSM]:
        return [h for h in (self.embed, *(h for hsms in self.layers for h in hsms)) if h.transform]

    def identity_loss(self) -> torch.Tensor:
        return torch.stack([h.identity_loss() for h in self.transforms()]).sum()


@torch.no_grad()
def materialize(model: nn.Module, pat: PATModules) -> int:
    """Fold ``pat`` into ``model`` and slice it to the kept channels, in place; returns ``d'``.
    The hooks are removed; the model then computes what it computed with the hard mask."""
    idx = pat.mask.kept()
    d, dk = model.config.hidden_size, int(idx.numel())
    if dk == 0:
        raise ValueError("the mask keeps no channel")
    pat.detach_hooks()
    arch = arch_of(model)
    gain = math.sqrt(d / dk)

    def rows(linear: nn.Linear, fold: torch.Tensor) -> None:  # a producer: fold, then keep output rows
        w = fold.float() @ linear.weight.data.float()
        linear.weight = nn.Parameter(w[idx].to(linear.weight.dtype).contiguous())
        if linear.bias is not None:
            b = fold.float() @ linear.bias.data.float()
            linear.bias = nn.Parameter(b[idx].to(linear.bias.dtype))
        linear.out_features = dk

    def cols(linear: nn.Linear) -> None:  # a consumer: input columns
        linear.weight = nn.Parameter(linear.weight.data[:, idx].contiguous())
        linear.in_features = dk

    def norm(module: nn.Module) -> None:
        module.weight = nn.Parameter((module.weight.data.float()[idx] * gain).to(module.weight.dtype))

    emb = model.get_input_embeddings()
    e = emb.weight.data.float()
    if pat.embed.transform:
        e = e @ pat.embed.matrix().float().t()
    new_e = nn.Parameter(e[:, idx].to(emb.weight.dtype).contiguous())
    emb.weight = new_e
    emb.embedding_dim = dk
    for layer, hsms in zip(arch.decoder_layers(model), pat.layers):
        for rel in arch.residual_readers():
            cols(layer.get_submodule(rel))
        for rel, h in zip(arch.residual_writers, hsms):
            rows(layer.get_submodule(rel), h.matrix())
        for rel in arch.layer_norms:
            norm(layer.get_submodule(rel))
    norm(model.get_submodule(arch.final_norm))
    head = model.get_output_embeddings()
    if pat.tied:
        head.weight = new_e  # still tied: the sliced embedding is the head
    else:
        cols(head)
    head.in_features = dk
    cfg = model.config
    cfg.head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    cfg.hidden_size = dk
    cfg.rms_norm_eps = cfg.rms_norm_eps * d / dk  # RMS over d' channels: the same normalization, exactly
    for module in model.modules():  # the norms keep their own epsilon
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = cfg.rms_norm_eps
    return dk
