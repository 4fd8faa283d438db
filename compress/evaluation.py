"""Held-out evaluation: perplexity, KL(teacher || student), top-1 agreement.

Protocol (as in ``shared/data/wikitext-2/README.md``): the first ``max_tokens``
tokens of the evaluation stream, cut into non-overlapping windows of ``window``
tokens; each window predicts its ``window - 1`` next tokens; perplexity is
``exp`` of the mean NLL over all predicted tokens. A trailing partial window of at
least two tokens is evaluated too. Deterministic for a given thread count.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F


def windows_of(stream: torch.Tensor, window: int, max_tokens: int) -> list[torch.Tensor]:
    tokens = stream[:max_tokens]
    n = tokens.numel() // window
    out = list(tokens[: n * window].view(n, window)) if n else []
    rest = tokens[n * window:]
    if rest.numel() >= 2:
        out.append(rest)
    return out


@torch.no_grad()
def evaluate_stream(
    model, stream: torch.Tensor, *, window: int = 512, max_tokens: int = 16384, batch_size: int = 1,
    teacher=None, progress: Callable | None = None,
) -> dict:
    """Evaluate ``model`` on a 1-D token stream; compare with ``teacher`` if given."""
    model.eval()
    wins = windows_of(stream, window, max_tokens)
    nll_sum = kl_sum = agree_sum = t_nll_sum = 0.0
    count = 0
    start = time.perf_counter()
    bar = progress(total=len(wins), desc="evaluate", unit="win") if progress else None
    groups: list[list[torch.Tensor]] = []
    for w in wins:  # batch equal-length windows together
        if groups and len(groups[-1]) < batch_size and groups[-1][0].numel() == w.numel():
            groups[-1].append(w)
        else:
            groups.append([w])
    try:
        for group in groups:
            ids = torch.stack(group)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            logp = F.log_softmax(logits, dim=-1)
            nll_sum += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
            if teacher is not None:
                t_logp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)
                t_nll_sum += -t_logp.gather(-1, targets.unsqueeze(-1)).sum().item()
                kl_sum += (t_logp.exp() * (t_logp - logp)).sum().item()
                agree_sum += (t_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            if bar:
                bar.update(len(group))
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - start
    nll = nll_sum / max(count, 1)
    result = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": sum(w.numel() for w in wins),
        "predicted_tokens": count,
        "windows": len(wins),
        "window": window,
        "eval_seconds": seconds,
        "tokens_per_second": sum(w.numel() for w in wins) / seconds if seconds > 0 else None,
    }
    if teacher is not None:
        result["kl"] = kl_sum / max(count, 1)
        result["top1_agreement"] = agree_sum / max(count, 1)
        result["teacher_perplexity"] = math.exp(t_nll_sum / max(count, 1))  # the same windows: ratios need no rerun
    return result


def evaluate_domains(model, streams: list[tuple[str, torch.Tensor]], *, window: int, max_tokens: int,
                     batch_size: int = 1, teacher=None, is_teacher: bool = False,
                     progress: Callable | None = None) -> dict:
    """``evaluate_stream`` on every domain (``(name, stream)``, the primary one first): the primary
    domain's figures at the top level, every domain's under ``domains``, ratios under ``summary``.
    ``is_teacher``: the model is the teacher itself (KL 0, agreement 1, ratio 1 by definition)."""
    per: dict[str, dict] = {}
    for name, stream in streams:
        r = evaluate_stream(model, stream, window=window, max_tokens=max_tokens, batch_size=batch_size,
                            teacher=teacher, progress=progress)
        if is_teacher:
            r.update(kl=0.0, top1_agreement=1.0, teacher_perplexity=r["perplexity"])
        per[name] = r
    return {**per[streams[0][0]], "eval_seconds": sum(r["eval_seconds"] for r in per.values()),
            "domains": per, "summary": summarize_domains(per)}


def summarize_domains(per: dict[str, dict]) -> dict:
    """Perplexity ratios to the teacher per domain, their geometric mean and the worst."""
    ratios = {n: r["perplexity"] / r["teacher_perplexity"] for n, r in per.items() if r.get("teacher_perplexity")}
    if not ratios:
        return {}
    worst = max(ratios, key=ratios.get)
    return {"ratios": ratios, "geomean_ratio": math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios)),
            "worst_ratio": ratios[worst], "worst_domain": worst, "domains": len(ratios)}
