"""Export validation: the ONNX model must compute what the PyTorch model computes.

On fixed prompts: logits of the whole prompt (one forward without cache) and of every
greedy decoding step (through the KV cache) are compared with PyTorch; the greedy
tokens must be identical. The error is reported as max absolute and relative
(``max |onnx - torch| / max |torch|``) over every compared position.

The mean KL divergence of the ONNX next-token distributions from PyTorch's over the same
positions is reported too (``mean_kl``, nats).

Where the deployed graph legitimately computes differently (MatMulNBits at ``accuracy_level``
4 rounds activations to int8), two things change, both stated and reported: a greedy step
whose two candidates are within the logit tolerance in PyTorch (a near-tie:
``logit[torch token] - logit[onnx token] <= rtol * max |logit|``) ends that prompt's
comparison without failing (counted in ``near_ties``); and with ``kl_tol`` set the logits
criterion is ``mean_kl <= kl_tol`` instead of the max relative error, an extreme value that
grows with how fragile the model is (a 2-bit model's first positions) while its distributions
stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compress.errors import UserError

#: Plain English and chat-formatted prompts: short, mid-length, and the default chat format.
PROMPTS = (
    "The capital of France is",
    "Compression makes language models small enough to run on phones and laptops. The three main "
    "techniques are pruning, which removes weights or whole channels; quantization, which stores "
    "weights with fewer bits; and distillation, which trains a small model to imitate a large one.",
)
CHAT_PROMPT = "Explain in two sentences why the sky is blue."


@dataclass(frozen=True)
class ValidationSettings:
    rtol: float = 1e-3  # relative tolerance on logits
    greedy_tokens: int = 32  # greedy tokens that must be identical, per prompt
    allow_near_ties: bool = False  # accept a divergence at a step whose top-2 are within tolerance
    kl_tol: float | None = None  # set: the logits criterion is mean KL(PyTorch || ONNX) <= kl_tol, nats


def prompt_ids(tokenizer) -> list[list[int]]:
    from compress.tokenizer import chat_ids

    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    if getattr(tokenizer, "chat_template", None):
        prompts.append(chat_ids(tokenizer, [{"role": "user", "content": CHAT_PROMPT}]))
    return [p for p in prompts if len(p) >= 2]


def _torch_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits, with the model's own KV cache, no EOS stop."""
    import torch

    from compress.models import forward_with_cache

    tokens, logits_seen = [], []
    with torch.no_grad():
        logits, cache = forward_with_cache(model, torch.tensor([ids]))
        for _ in range(steps):
            last = logits[0, -1].float()
            logits_seen.append(last.numpy().copy())
            tok = int(last.argmax())
            tokens.append(tok)
            logits, cache = forward_with_cache(model, torch.tensor([[tok]]), cache)
    return tokens, logits_seen


def validate(decoder, model, tokenizer, settings: ValidationSettings = ValidationSettings()) -> dict[str, Any]:
    """Compare an ONNX ``Decoder`` with the PyTorch ``model``; raise UserError on a mismatch."""
    import torch

    from compress.ops.losses import softmax_kl

    max_abs = 0.0
    max_rel = 0.0
    mismatch = None
    near_ties = []
    kl_sum, kl_rows = 0.0, 0
    prompts = prompt_ids(tokenizer)
    for n, ids in enumerate(prompts):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        got = decoder.logits(np.array([ids]))[0]
        pairs = [(got, ref)]
        ref_tokens, ref_steps = _torch_greedy(model, ids, settings.greedy_tokens)
        got_steps: list[np.ndarray] = []
        tokens = decoder.generate(ids, settings.greedy_tokens, on_logits=got_steps.append)
        agree = 0
        while agree < len(tokens) and tokens[agree] == ref_tokens[agree]:
            agree += 1
        pairs += [(got_steps[i], ref_steps[i]) for i in range(min(agree + 1, len(got_steps)))]
        for a, b in pairs:
            diff = float(np.abs(a - b).max())
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(float(np.abs(b).max()), 1e-12))
            kl = softmax_kl(torch.from_numpy(b).double(), torch.from_numpy(a).double())
            kl_sum += float(kl.sum())
            kl_rows += kl.numel()
        if agree < settings.greedy_tokens and mismatch is None:
            step = ref_steps[agree]
            margin = float(step[ref_tokens[agree]] - step[tokens[agree]])
            if settings.allow_near_ties and margin <= settings.rtol * float(np.abs(step).max()):
                near_ties.append({"prompt": n, "step": agree, "margin": margin})
            else:
                mismatch = (n, agree, tokens[agree], ref_tokens[agree])
    result = {
        "prompts": len(prompts),
        "max_abs_error": max_abs,
        "max_rel_error": max_rel,
        "rtol": settings.rtol,
        "mean_kl": kl_sum / max(kl_rows, 1),
        "kl_tol": settings.kl_tol,
        "greedy_tokens": settings.greedy_tokens,
        "greedy_equal": mismatch is None and not near_ties,
        "near_ties": near_ties,
    }
    if settings.kl_tol is not None:
        if result["mean_kl"] > settings.kl_tol:
            raise UserError(
                f"export validation failed: next-token distributions differ from PyTorch by mean KL "
                f"{result['mean_kl']:.3g} nats (logits max rel error {max_rel:.2e}), above the tolerance {settings.kl_tol:.2g}"
            )
    elif max_rel > settings.rtol:
        raise UserError(
            f"export validation failed: logits differ from PyTorch by {max_rel:.2e} relative "
            f"(max abs {max_abs:.3g}), above the tolerance {settings.rtol:.2g}"
        )
    if mismatch is not None:
        n, pos, a, b = mismatch
        raise UserError(
            f"export validation failed: greedy token {pos} of prompt {n} is {a} in ONNX but {b} in PyTorch "
            f"(logits max rel error {max_rel:.2e})"
        )
    return result
