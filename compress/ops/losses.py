"""Distillation losses as pure functions (METHODS.md section 2).

Conventions: ``logits`` are ``(B, T, V)`` for positions ``0..T-1`` of ``input_ids``;
position ``t`` predicts token ``t+1``. ``mask`` is ``(B, T)`` with 1 for real tokens
and 0 for padding. Every token-level loss is a mean over the positions that
predict a real token from a real token.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def prediction_mask(mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """``(B, T-1)`` float mask of positions whose input and target are real tokens."""
    if mask is None:
        return torch.ones(shape[0], shape[1] - 1)
    m = mask.to(torch.float32)
    return m[:, 1:] * m[:, :-1]


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.to(values.device, values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy (mean NLL over predicted real tokens)."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return _masked_mean(nll.view(targets.shape), prediction_mask(mask, input_ids.shape))


def softmax_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p || q) of softmax(logits / T) over the last dimension, in at least float32
    (float64 logits stay float64)."""
    dtype = torch.promote_types(p_logits.dtype, torch.float32)
    logp = F.log_softmax(p_logits.to(dtype) / temperature, dim=-1)
    logq = F.log_softmax(q_logits.to(dtype) / temperature, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_teacher || p_student), scaled by T^2, mean over predicting positions."""
    kl = softmax_kl(teacher_logits[:, :-1], student_logits[:, :-1], temperature)
    return temperature**2 * _masked_mean(kl, prediction_mask(mask, student_logits.shape[:2]))


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_student || p_teacher), scaled by T^2, mean over predicting positions."""
    kl = softmax_kl(student_logits[:, :-1], teacher_logits[:, :-1], temperature)
    return temperature**2 * _masked_mean(kl, prediction_mask(mask, student_logits.shape[:2]))


def squarehead(
    student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None, eps: float = 1e-6,
) -> torch.Tensor:
    """SquareHead: sum over layers of mean((s - t)^2) / (mean(t^2) + eps).

    Means run over real (unpadded) tokens and hidden dims; the layer terms are summed,
    not averaged (Kurtic et al. 2023). Pass the block outputs (HF ``hidden_states[1:]``).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher layers")
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_hidden, teacher_hidden):
        s, t = s.float(), t.float()
        w = torch.ones(s.shape[:2], device=s.device) if mask is None else mask.to(s.device, torch.float32)
        num = _masked_mean(((s - t) ** 2).mean(-1), w)
        den = _masked_mean((t**2).mean(-1), w)
        total = total + num / (den + eps)
    return total


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of predicting positions where the argmaxes agree."""
    same = (student_logits[:, :-1].argmax(-1) == teacher_logits[:, :-1].argmax(-1)).float()
    return _masked_mean(same, prediction_mask(mask, student_logits.shape[:2]))
