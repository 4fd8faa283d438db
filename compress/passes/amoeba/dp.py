"""Depth: which layers a subnet of each depth drops (AmoebaLLM's dynamic programme, METHODS.md §3).

With ``L`` layers of which the last ``keep_last`` are never dropped, ``N = L - keep_last``
candidate layers and ``M = L - min_layers`` removals at most, the candidates are scanned from the
top (level ``n`` adds layer ``N - n``). ``best[n][m]`` is the best set of ``m`` removals among the
``n`` layers scanned so far: the candidate ``best[n-1][m-1] + {N - n}`` is taken when its metric
beats ``best[n-1][m]`` (or when that does not exist), else ``best[n-1][m]`` is carried. The
result is one removal set per count ``m`` after ``O(N M)`` evaluations; the sets need not nest.
For a metric that is a sum of per-layer costs this is the exact knapsack recurrence and finds
the optimum (the test checks that against brute force).

The metric here is the language-model loss on a few hundred calibration sequences (not the
authors' 40 MMLU samples, noise at 135 M parameters), on every ``stride``-th position (the head
costs a fifth of a SmolLM2 forward), with the layers under bf16 autocast where the CPU is fast
at it. Every candidate at level ``n`` keeps all
layers below ``N - n``, so :class:`LossMetric` runs those once per level and starts each
candidate's forward at layer ``N - n``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch


class Metric(Protocol):
    def level(self, first: int) -> None:
        """Every following ``score`` call keeps layers ``0 .. first - 1``."""

    def score(self, removed: frozenset[int]) -> float:
        """Lower is better: the metric of the model with ``removed`` layers bypassed."""


@dataclass
class DPResult:
    num_layers: int
    min_layers: int
    keep_last: int
    removed: dict[int, tuple[int, ...]]  # m -> the m layers dropped (sorted)
    scores: dict[int, float]  # m -> the metric of that subnet (0 removals: the full model)
    evaluations: int
    trace: list[tuple[int, int, float, bool]] = field(default_factory=list)  # (n, m, candidate score, taken)

    def layers(self, depth: int) -> tuple[int, ...]:
        """The layers a subnet of ``depth`` layers keeps, in order."""
        m = self.num_layers - depth
        if m not in self.removed:
            raise ValueError(f"depth {depth} is outside the table ({self.min_layers} .. {self.num_layers})")
        gone = set(self.removed[m])
        return tuple(i for i in range(self.num_layers) if i not in gone)

    def to_json(self) -> dict:
        return {"num_layers": self.num_layers, "min_layers": self.min_layers, "keep_last": self.keep_last,
                "removed": {str(m): list(v) for m, v in self.removed.items()},
                "scores": {str(m): v for m, v in self.scores.items()}, "evaluations": self.evaluations}

    @classmethod
    def from_json(cls, d: dict) -> "DPResult":
        return cls(d["num_layers"], d["min_layers"], d["keep_last"],
                   {int(m): tuple(v) for m, v in d["removed"].items()},
                   {int(m): float(v) for m, v in d["scores"].items()}, int(d["evaluations"]))


def dp_evaluations(num_layers: int, min_layers: int, keep_last: int = 1) -> int:
    """Candidate evaluations the DP makes (besides the full model's)."""
    return sum(min(n, num_layers - min_layers) for n in range(1, num_layers - keep_last + 1))


def dp_layer_selection(num_layers: int, min_layers: int, metric: Metric, *, keep_last: int = 1,
                       progress: Callable[[int, int], None] | None = None,
                       state: Path | None = None, fingerprint: str = "") -> DPResult:
    """The removal set per count ``m = 1 .. num_layers - min_layers`` (see the module docstring).
    ``state``: a file the finished levels are kept in, so a killed run resumes at the next level
    (one with another ``fingerprint`` is ignored)."""
    n_cand = num_layers - keep_last
    m_max = num_layers - min_layers
    if not 1 <= min_layers <= num_layers or keep_last < 0 or m_max > n_cand:
        raise ValueError(f"min_layers {min_layers} / keep_last {keep_last} do not fit {num_layers} layers")
    total = dp_evaluations(num_layers, min_layers, keep_last)
    saved = _load_state(state, fingerprint)
    if saved is not None:
        start, prev, evaluations, trace = saved
    else:
        metric.level(n_cand)
        full = metric.score(frozenset())
        # prev[m]: (score, removed set) after the levels so far; m = 0 is the full model
        prev = {0: (full, frozenset())}
        start, evaluations, trace = 1, 1, []
    for n in range(start, n_cand + 1):
        layer = n_cand - n
        metric.level(layer)
        cur = {0: prev[0]}
        for m in range(1, min(n, m_max) + 1):
            cand = prev[m - 1][1] | {layer}
            s = metric.score(cand)
            evaluations += 1
            carried = prev.get(m)
            taken = carried is None or s < carried[0] or math.isnan(carried[0])
            cur[m] = (s, cand) if taken else carried
            trace.append((n, m, s, taken))
            if progress:
                progress(evaluations - 1, total)
        prev = cur
        if state is not None:
            _save_state(state, fingerprint, n + 1, prev, evaluations, trace)
    return DPResult(num_layers, min_layers, keep_last, {m: tuple(sorted(prev[m][1])) for m in range(1, m_max + 1)},
                    {m: prev[m][0] for m in range(0, m_max + 1)}, evaluations, trace)


def _save_state(path: Path, fingerprint: str, level: int, prev: dict, evaluations: int, trace: list) -> None:
    from ...artifact import atomic_write_json

    atomic_write_json(path, {"fingerprint": fingerprint, "level": level, "evaluations": evaluations,
                             "prev": {str(m): [v[0], sorted(v[1])] for m, v in prev.items()},
                             "trace": [list(t) for t in trace]})


def _load_state(path: Path | None, fingerprint: str):
    if path is None or not Path(path).is_file():
        return None
    try:
        d = json.loads(Path(path).read_text())
        if d.get("fingerprint") != fingerprint:
            return None
        prev = {int(m): (float(v[0]), frozenset(int(i) for i in v[1])) for m, v in d["prev"].items()}
        return int(d["level"]), prev, int(d["evaluations"]), [tuple(t) for t in d["trace"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged state file: start over


class LossMetric:
    """Mean next-token cross entropy of ``model`` on ``blocks`` with some decoder layers bypassed.

    The first layer's inputs are captured once; at each DP level the layers below the level run
    once on them, and every candidate of that level starts there."""

    def __init__(self, model, blocks: torch.Tensor, *, batch: int = 8, stride: int = 1, bf16: bool = False):
        from ...arch import arch_of
        from ...calibration import capture_layer_inputs

        self.model, self.arch = model, arch_of(model)
        self.layers = self.arch.decoder_layers(model)
        self.blocks = blocks
        self.inputs0 = capture_layer_inputs(model, blocks, batch, self.arch)
        self.first = 0
        self.states = self.inputs0
        self.norm = model.get_submodule(self.arch.final_norm)
        self.head = model.get_output_embeddings()
        self.batch = batch
        self.stride = stride  # the loss on every stride-th position (the head is a fifth of the cost)
        self.bf16 = bf16  # layers under bf16 autocast (where the CPU is fast at it)

    @torch.no_grad()
    def level(self, first: int) -> None:
        states = self.inputs0
        for i in range(first):
            states = [(self._run(i, h, kw), kw) for h, kw in states]
        self.first, self.states = first, states

    def _run(self, i: int, h: torch.Tensor, kw: dict) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            y = self.layers[i](h, **kw)
        return y[0] if isinstance(y, tuple) else y

    @torch.no_grad()
    def score(self, removed: frozenset[int]) -> float:
        total, count = 0.0, 0
        active = [i for i in range(self.first, len(self.layers)) if i not in removed]
        for b, (h, kw) in enumerate(self.states):
            for i in active:
                h = self._run(i, h, kw)
            ids = self.blocks[b * self.batch: b * self.batch + h.shape[0]]
            pos = torch.arange(h.shape[1] - 2, -1, -self.stride).flip(0)  # positions that predict a next token
            logits = self.head(self.norm(h[:, pos].float())).float()
            targets = ids[:, pos + 1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     reduction="sum")
            total += float(loss)
            count += targets.numel()
        return total / max(count, 1)
