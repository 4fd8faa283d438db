"""The issue-15 reference recipe: plain straight-through QAT at a well-tuned rate, written as a
user would write it in ~90 lines (independent of the quantize pass), to compare recovery per
CPU minute with ours.

RTN 4-bit g128 asymmetric start on every decoder Linear (embeddings and head stay fp32);
straight-through latent weights at lr 1e-5 and learned scales/zero points at 1e-4 (AdamW,
constant), forward KL to the fp32 teacher, bf16 autocast when this CPU is fast at it (measured,
as the product decides), batches of 4 x 512 tokens of wikitext-2 *valid*. Evaluated (PyTorch
fake-quant) at each step in ``--eval-at`` on the first 40,960 wikitext-2 *test* tokens (the
issue's protocol) and on the four held-out domains of benchmarks/heldout.py (16,384 tokens each,
the same windows and teacher references as every row there). Wall time is training only.

    COMPRESS_CACHE_DIR=benchmarks/_work/heldout/cpu-4bit-cache python benchmarks/naive_qat.py --steps 100 --eval-at 50,100
(the cache of a heldout.py `ours` run holds the `answers` domain's text and the teacher's references)
Result: benchmarks/results/naive_qat.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


class STELinear(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear, bits: int = 4, group: int = 128):
        super().__init__()
        from compress.ops import quant as Q

        self.Q, self.bits, self.group = Q, bits, group
        self.weight = torch.nn.Parameter(lin.weight.detach().clone())
        s, z = Q.minmax_params(self.weight, bits, group, sym=False)
        self.scale, self.zero = torch.nn.Parameter(s), torch.nn.Parameter(z)

    def forward(self, x):
        w = self.Q.fake_quant_ste(self.weight, self.scale, self.zero, self.bits, self.group)
        return F.linear(x, w.to(x.dtype))


def kl_step(student, teacher, ids: torch.Tensor, opt, scales: list, auto) -> torch.Tensor:
    """One step of the naive recipe: forward KL(teacher || student) per token under ``auto``
    (bf16 autocast or none), a plain optimizer step, scales kept positive. Returns the loss."""
    with auto:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
    loss = F.kl_div(F.log_softmax(s_logits.float(), -1), F.log_softmax(t_logits.float(), -1), log_target=True,
                    reduction="batchmean") / ids.shape[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        for s in scales:
            s.clamp_(min=1e-8)
    return loss.detach()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-at", default="50,100")
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "naive_qat.json")
    args = ap.parse_args()
    from heldout import domain_streams, summarize

    from compress.evaluation import evaluate_stream, teacher_reference
    from compress.hardware import fast_bf16
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.sources import resolve_source_ref, source_id

    torch.set_num_threads(2)
    folder = model_folder(resolve_source_ref(None), quiet=True)
    tok, teacher, student = load_tokenizer(folder), load_model(folder), load_model(folder)
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    for layer in student.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, STELinear(child))
    ste = [m for m in student.modules() if isinstance(m, STELinear)]
    opt = torch.optim.AdamW([{"params": [m.weight for m in ste], "lr": 1e-5},
                             {"params": [p for m in ste for p in (m.scale, m.zero)], "lr": 1e-4}], weight_decay=0.0)
    train = torch.tensor(tok((DATA / "valid.txt").read_text(), add_special_tokens=False)["input_ids"])
    blocks = train[: train.numel() // 512 * 512].view(-1, 512)
    test = torch.tensor(tok((DATA / "test.txt").read_text(), add_special_tokens=False)["input_ids"])
    streams = {"wikitext-2-test-40960": (test, args.eval_tokens), **{n: (x, 16384) for n, x in domain_streams(folder).items()}}
    # the teacher's references, from the cache a pipeline run left (COMPRESS_CACHE_DIR) where it has them
    key = source_id(resolve_source_ref(None))
    refs = {n: teacher_reference(teacher, x, window=512, max_tokens=k, key=key) for n, (x, k) in streams.items()}
    bf16, why = fast_bf16()
    auto = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    evals, seconds, g = [], 0.0, torch.Generator().manual_seed(0)
    at = {int(x) for x in args.eval_at.split(",") if x}
    order = torch.randperm(blocks.shape[0], generator=g)
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        ids = blocks[order[(torch.arange(4) + 4 * (step - 1)) % blocks.shape[0]]]
        loss = kl_step(student, teacher, ids, opt, [m.scale for m in ste], auto)
        seconds += time.perf_counter() - t
        print(f"step {step} loss {loss.item():.4f} {seconds:.0f} s", file=sys.stderr, flush=True)
        if step in at:
            per = {}
            for n, (x, k) in streams.items():
                r = evaluate_stream(student, x, window=512, max_tokens=k, reference=refs[n])
                per[n] = {key: r[key] for key in ("perplexity", "teacher_perplexity", "kl", "top1_agreement", "tokens")}
            r = per.pop("wikitext-2-test-40960")
            evals.append({"step": step, "tokens_trained": step * 4 * 512, "train_seconds": round(seconds, 1),
                          "perplexity": r["perplexity"], "ratio": r["perplexity"] / r["teacher_perplexity"],
                          "kl": r["kl"], "top1_agreement": r["top1_agreement"],
                          "heldout": {"domains": per, "summary": summarize(per)}})
            print(json.dumps(evals[-1]), file=sys.stderr, flush=True)
    result = {"benchmark": "naive_qat", "date": time.strftime("%Y-%m-%d"), "bf16": bf16, "bf16_reason": why,
              "recipe": "RTN 4-bit g128 asym start, decoder Linears only (embeddings/head fp32), STE weights lr 1e-5, "
                        "scales/zero points lr 1e-4, forward KL, 4 x 512 wikitext-2 valid per step",
              "evals": evals, "size_note": "4-bit g128 decoder + fp32 tied embedding/head, as PyTorch fake-quant"}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(evals, indent=2))
    return 0 if math.isfinite(evals[-1]["perplexity"] if evals else 0.0) else 1


if __name__ == "__main__":
    raise SystemExit(main())
