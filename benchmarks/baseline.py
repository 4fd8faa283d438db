"""Teacher perplexity on wikitext-2 test and evaluation throughput.

Perplexity: the embedded SmolLM2-135M-Instruct (fp32, dequantized from the shipped Q4_1 GGUF),
first 40,960 tokens of wikitext-2 test.txt, non-overlapping 512-token windows (protocol of
shared/data/wikitext-2/README.md; reference value there: 26.365).

Throughput: `evaluate_stream` tokens/s on the first 4,096 tokens, batch sizes 1 and 4 measured
interleaved, one warm-up each, then the median (and min-max) of --runs runs.

    python benchmarks/baseline.py [--wikitext DIR] [--runs 5] [--out benchmarks/results/baseline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikitext", type=Path, default=DEFAULT_WIKITEXT)
    ap.add_argument("--max-tokens", type=int, default=40_960)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baseline.json")
    args = ap.parse_args()

    from compress.data import read_documents, token_stream, user_data_spec
    from compress.hardware import cpu_name
    from compress.evaluation import evaluate_stream
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.sources import resolve_source_ref, source_id

    ref = resolve_source_ref(None)
    t0 = time.perf_counter()
    folder = model_folder(ref, quiet=True)
    t_folder = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = load_model(folder)
    t_load = time.perf_counter() - t0
    tok = load_tokenizer(folder)
    test = args.wikitext / "test.txt"
    stream = token_stream(read_documents(user_data_spec(test, "eval")), tok, args.max_tokens)

    print(f"perplexity on the first {args.max_tokens} tokens ...", file=sys.stderr)
    ppl = evaluate_stream(model, stream, window=512, max_tokens=args.max_tokens)

    speed: dict[int, list[float]] = {1: [], 4: []}
    for bs in speed:  # warm-up
        evaluate_stream(model, stream, window=512, max_tokens=4096, batch_size=bs)
    for _ in range(args.runs):  # interleaved
        for bs in speed:
            r = evaluate_stream(model, stream, window=512, max_tokens=4096, batch_size=bs)
            speed[bs].append(r["tokens_per_second"])

    result = {
        "benchmark": "baseline",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/baseline.py", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
        },
        "model": {"source": ref.label, "id": source_id(ref), "folder_seconds": t_folder, "load_seconds": t_load},
        "perplexity": {
            "data": "wikitext-2 test.txt", "max_tokens": args.max_tokens, "window": 512,
            "value": ppl["perplexity"], "reference": 26.365, "ratio_to_reference": ppl["perplexity"] / 26.365,
            "windows": ppl["windows"], "predicted_tokens": ppl["predicted_tokens"], "seconds": ppl["eval_seconds"],
        },
        "eval_throughput_tokens_per_s": {
            f"batch_{bs}": {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
            for bs, v in speed.items()
        },
    }
    result["eval_throughput_tokens_per_s"]["batch_4_over_batch_1"] = (
        result["eval_throughput_tokens_per_s"]["batch_4"]["median"] / result["eval_throughput_tokens_per_s"]["batch_1"]["median"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
