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
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .artifact import hash_parts


def windows_of(stream: torch.Tensor, window: int, max_tokens: int) -> list[torch.Tensor]:
    tokens = stream[:max_tokens]
    n = tokens.numel() // window
    out = list(tokens[: n * window].view(n, window)) if n else []
    rest = tokens[n * window:]
    if rest.numel() >= 2:
        out.append(rest)
    return out


TEACHER_TOPK = 256  # teacher tokens kept per position for KL and agreement
REFERENCE_VERSION = 1  # bumped when what a reference holds changes (it keys the cache)


class TeacherReference:
    """The teacher's side of one stream's windows: per predicted token the teacher's NLL of the
    target and its ``k`` most likely tokens with their log-probabilities (fp32). Computed with
    one teacher forward, kept on disk, and enough to score any student on those windows: KL is
    taken over the teacher's top-k tokens plus everything else as one bucket (a lower bound of
    the full-vocabulary KL that it equals when the top-k hold all of the teacher's mass)."""

    def __init__(self, nll: list[torch.Tensor], idx: list[torch.Tensor], logp: list[torch.Tensor]):
        self.nll, self.idx, self.logp = nll, idx, logp

    @classmethod
    @torch.no_grad()
    def compute(cls, teacher, wins: list[torch.Tensor], batch_size: int = 1, k: int = TEACHER_TOPK,
                progress: Callable | None = None) -> "TeacherReference":
        teacher.eval()
        nll, idx, logp = [], [], []
        bar = progress(total=len(wins), desc="teacher", unit="win") if progress else None
        try:
            for group in _groups(wins, batch_size):
                ids = torch.stack(group)
                lp = F.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), dim=-1)
                top = lp.topk(min(k, lp.shape[-1]), dim=-1)
                for b in range(ids.shape[0]):
                    nll.append(-lp[b].gather(-1, ids[b, 1:].unsqueeze(-1)).squeeze(-1))
                    idx.append(top.indices[b].to(torch.int32))
                    logp.append(top.values[b].clone())
                if bar:
                    bar.update(len(group))
        finally:
            if bar:
                bar.close()
        return cls(nll, idx, logp)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        from .artifact import atomic_output

        tensors = {}
        for i, (a, b, c) in enumerate(zip(self.nll, self.idx, self.logp)):
            tensors.update({f"{i}.nll": a.contiguous(), f"{i}.idx": b.contiguous(), f"{i}.logp": c.contiguous()})
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "TeacherReference":
        from safetensors.torch import load

        t = load(Path(path).read_bytes())  # in memory, not mapped: the file may be replaced later
        n = len({k.split(".")[0] for k in t})
        return cls([t[f"{i}.nll"] for i in range(n)], [t[f"{i}.idx"] for i in range(n)], [t[f"{i}.logp"] for i in range(n)])


def heldout_split(blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held)``: the last ``n`` sequences held out of training (at least one left to train on)."""
    n = min(n, max(blocks.shape[0] - 1, 0))
    return blocks[:blocks.shape[0] - n], blocks[blocks.shape[0] - n:] if n else blocks[:0]


def heldout_kl(student, teacher, held: torch.Tensor) -> float:
    """Mean forward KL(teacher || student) over the sequences of ``held`` (one at a time); NaN when
    there are none. A training pass's before/after check on sequences it did not train on."""
    from .ops import losses

    if held.shape[0] == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for i in range(held.shape[0]):
            ids = held[i:i + 1]
            total += float(losses.forward_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits, None))
    return total / held.shape[0]


def teacher_reference(teacher, stream: torch.Tensor, *, window: int, max_tokens: int, batch_size: int = 1,
                      key: str | None = None, progress: Callable | None = None) -> TeacherReference:
    """The teacher's reference for ``stream``'s windows: from the cache when ``key`` (the teacher's
    identity) names one made on the same tokens and settings, else computed (and then cached).
    ``teacher``: the model, or a function that loads it (not called on a cache hit)."""
    wins = windows_of(stream, window, max_tokens)
    path = None
    if key is not None:
        import hashlib

        from .cache import cache_dir

        digest = hashlib.sha256(stream[:max_tokens].numpy().tobytes()).hexdigest()[:16]
        name = hash_parts("teacher-reference", str(REFERENCE_VERSION), key, digest, str(window), str(max_tokens),
                          str(TEACHER_TOPK))
        path = cache_dir() / "teacher-eval" / f"{name}.safetensors"
        if path.is_file():
            try:
                ref = TeacherReference.load(path)
                if len(ref.nll) == len(wins):
                    return ref
            except Exception:  # a damaged cache entry is recomputed, never trusted
                pass
    model = teacher if isinstance(teacher, torch.nn.Module) or not callable(teacher) else teacher()
    ref = TeacherReference.compute(model, wins, batch_size, progress=progress)
    if path is not None:
        ref.save(path)  # (atomic_output makes the folder)
    return ref


def _groups(wins: list[torch.Tensor], batch_size: int) -> list[list[torch.Tensor]]:
    groups: list[list[torch.Tensor]] = []
    for w in wins:  # batch equal-length windows together
        if groups and len(groups[-1]) < batch_size and groups[-1][0].numel() == w.numel():
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def bucket_kl(t_idx: torch.Tensor, t_logp: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """Per position KL(teacher || student) over the teacher's top-k tokens plus one bucket for the
    rest of the vocabulary (``t_idx``/``t_logp``: ``(..., k)``; ``s_logp``: ``(..., V)``)."""
    tl = t_logp.double()
    sk = s_logp.gather(-1, t_idx.long()).double()
    pt = tl.exp()
    kl = (pt * (tl - sk)).sum(-1)
    rt = (1.0 - pt.sum(-1)).clamp_min(0.0)
    rs = (1.0 - sk.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(rt > 1e-9, rt * (rt.clamp_min(1e-30).log() - rs.log()), torch.zeros_like(rt))
    return kl + tail


@torch.no_grad()
def evaluate_stream(
    model, stream: torch.Tensor, *, window: int = 512, max_tokens: int = 16384, batch_size: int = 1,
    teacher=None, reference: TeacherReference | None = None, progress: Callable | None = None,
) -> dict:
    """Evaluate ``model`` on a 1-D token stream; compare with the teacher if ``reference`` (or a
    ``teacher`` model, whose reference is computed first) is given."""
    model.eval()
    wins = windows_of(stream, window, max_tokens)
    if reference is None and teacher is not None:
        reference = teacher_reference(teacher, stream, window=window, max_tokens=max_tokens, batch_size=batch_size)
    nll_sum = kl_sum = agree_sum = t_nll_sum = 0.0
    count = 0
    start = time.perf_counter()
    bar = progress(total=len(wins), desc="evaluate", unit="win") if progress else None
    w0 = 0
    try:
        for group in _groups(wins, batch_size):
            ids = torch.stack(group)
            logits = model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            logp = F.log_softmax(logits, dim=-1)
            nll_sum += -float(logp.gather(-1, targets.unsqueeze(-1)).double().sum())  # as a reference sums it
            count += targets.numel()
            if reference is not None:
                for b in range(ids.shape[0]):
                    t_idx, t_logp = reference.idx[w0 + b], reference.logp[w0 + b]
                    t_nll_sum += float(reference.nll[w0 + b].double().sum())
                    kl_sum += float(bucket_kl(t_idx, t_logp, logp[b]).sum())
                    agree_sum += float((logp[b].argmax(-1) == t_idx[:, 0].long()).sum())
            w0 += ids.shape[0]
            if bar:
                bar.update(len(group))
    finally:
        if bar:
            bar.close()
    result = _stream_result(wins, window, nll_sum, count, time.perf_counter() - start)
    if reference is not None:
        result["kl"] = kl_sum / max(count, 1)
        result["top1_agreement"] = agree_sum / max(count, 1)
        result["teacher_perplexity"] = math.exp(t_nll_sum / max(count, 1))  # the same windows: ratios need no rerun
        result["kl_topk"] = TEACHER_TOPK
    return result


def _stream_result(wins: list[torch.Tensor], window: int, nll_sum: float, count: int, seconds: float) -> dict:
    """Perplexity and the counts of one stream's evaluation (``count`` predicted tokens)."""
    nll = nll_sum / max(count, 1)
    tokens = sum(w.numel() for w in wins)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens, "predicted_tokens": count,
            "windows": len(wins), "window": window, "eval_seconds": seconds,
            "tokens_per_second": tokens / seconds if seconds > 0 else None}


def evaluate_domains(model, streams: list[tuple[str, torch.Tensor]], *, window: int, max_tokens: int,
                     batch_size: int = 1, teacher=None, teacher_key: str | None = None, is_teacher: bool = False,
                     progress: Callable | None = None) -> dict:
    """``evaluate_stream`` on every domain (``(name, stream)``, the primary one first): the primary
    domain's figures at the top level, every domain's under ``domains``, ratios under ``summary``.
    ``teacher``: the model or a function that loads it; ``teacher_key`` (its identity) caches its
    references on disk, so the teacher runs once per domain and settings, not once per evaluation.
    ``is_teacher``: the model is the teacher itself (KL 0, agreement 1, ratio 1 by definition; its
    references are cached on the way when ``teacher_key`` is given)."""
    per: dict[str, dict] = {}
    for name, stream in streams:
        if is_teacher:
            t0 = time.perf_counter()
            ref = teacher_reference(model, stream, window=window, max_tokens=max_tokens, batch_size=batch_size,
                                    key=teacher_key, progress=progress)
            r = _stream_result(windows_of(stream, window, max_tokens), window,
                               sum(float(x.double().sum()) for x in ref.nll), sum(x.numel() for x in ref.nll),
                               time.perf_counter() - t0)
            r.update(kl=0.0, top1_agreement=1.0, teacher_perplexity=r["perplexity"])
        else:
            ref = None if teacher is None else teacher_reference(
                teacher, stream, window=window, max_tokens=max_tokens, batch_size=batch_size, key=teacher_key,
                progress=progress)
            r = evaluate_stream(model, stream, window=window, max_tokens=max_tokens, batch_size=batch_size,
                                reference=ref, progress=progress)
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
