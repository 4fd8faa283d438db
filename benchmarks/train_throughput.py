"""Training throughput of the shared loop, fp32 vs bf16 autocast, on the embedded model.

Distillation step (teacher forward + student forward/backward, forward KL) on wikitext-2
valid.txt blocks of 512 tokens. The two settings run interleaved: one warm-up run each, then
--runs runs of --steps optimizer steps each; reported: median tokens/s (min-max) and the ratio.
This is the evidence behind `bf16: auto` (on only where the hardware has fast bf16).

    python benchmarks/train_throughput.py [--batch 1] [--steps 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from baseline import DEFAULT_WIKITEXT  # noqa: E402

from compress.hardware import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_throughput.json")
    args = ap.parse_args()

    from compress.data import pack_blocks, read_documents, token_stream, user_data_spec
    from compress.hardware import cpu_flags, fast_bf16
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.sources import resolve_source_ref
    from compress.training.loop import LossWeights, TrainSettings, train

    folder = model_folder(resolve_source_ref(None), quiet=True)
    tok = load_tokenizer(folder)
    need = args.batch * 512 * args.steps
    blocks = pack_blocks(token_stream(read_documents(user_data_spec(args.wikitext / "valid.txt", "train")), tok,
                                      need + 512), 512)
    teacher, student = load_model(folder), load_model(folder)
    results: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.runs + 1):
            for name in results:
                st = TrainSettings(steps=args.steps, lr=1e-6, batch_size=args.batch, checkpoint_every=0,
                                   bf16=name == "bf16", loss=LossWeights(kl=1.0))
                t0 = time.perf_counter()
                train(student, teacher, blocks, st, work_dir=Path(work))
                tps = args.batch * 512 * args.steps / (time.perf_counter() - t0)
                if i > 0:  # run 0 is the warm-up
                    results[name].append(tps)
                print(f"run {i} {name}: {tps:.1f} tokens/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in results.items()}
    auto, why = fast_bf16()
    out = {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/train_throughput.py", *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "bf16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx512f", "avx2"})},
        "setting": {"batch": args.batch, "seq_len": 512, "steps_per_run": args.steps, "loss": "forward KL"},
        "tokens_per_s": {k: {"median": med[k], "min": min(v), "max": max(v), "runs": v} for k, v in results.items()},
        "bf16_over_fp32": med["bf16"] / med["fp32"],
        "auto_choice": {"bf16": auto, "why": why},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
