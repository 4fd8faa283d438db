"""Teacher text generation speed: transformers' ``generate`` vs compress's decode loop.

The same prompts (training prompts of prompt set v2 through the chat template, left-padded),
the same model (the embedded SmolLM2-135M teacher, float32), 2 threads, greedy; the systems
alternate within each round, one warm-up round, median of ``--runs`` rounds. Tokens counted up to
and including each row's EOS. Also checks that both emit the same tokens.

    python benchmarks/generation.py --prompts 32 --new-tokens 128 --runs 5
Result: benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "generation.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    import platform
    from importlib.metadata import version

    import torch

    from compress.generation import generate
    from compress.hardware import cpu_name
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.prompts import split_prompts
    from compress.sources import resolve_source_ref

    torch.set_num_threads(2)
    folder = model_folder(resolve_source_ref(None), quiet=True)
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    tok.padding_side = "left"
    prompts = split_prompts(args.prompts, 0)[0]
    enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tok.eos_token_id

    def cut(rows):
        return [r[: r.index(eos) + 1] if eos in r else r for r in rows]

    def hf():
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
        return cut(out[:, enc["input_ids"].shape[1]:].tolist())

    def ours():
        return generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=args.new_tokens,
                        eos_ids=[eos])

    systems = {"transformers generate": hf, "compress.generation": ours}
    times: dict[str, list[float]] = {n: [] for n in systems}
    outputs = {}
    for rnd in range(args.runs + 1):
        for name, fn in systems.items():
            t = time.perf_counter()
            outputs[name] = fn()
            dt = time.perf_counter() - t
            if rnd:  # round 0 warms up
                times[name].append(dt)
            print(f"round {rnd} {name}: {dt:.1f} s", file=sys.stderr, flush=True)
    tokens = sum(len(r) for r in outputs["compress.generation"])
    same = sum(a == b for a, b in zip(outputs["transformers generate"], outputs["compress.generation"]))
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "benchmark": "generation", "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/generation.py --prompts {args.prompts} --new-tokens {args.new_tokens} "
                   f"--runs {args.runs}",
        "machine": {"cpu": cpu_name(), "threads": 2, "python": platform.python_version(),
                    **{n: version(n) for n in ("torch", "transformers")}},
        "setting": {"prompts": args.prompts, "max_new_tokens": args.new_tokens, "greedy": True, "dtype": "float32"},
        "tokens": tokens, "identical_rows": f"{same}/{len(prompts)}",
        "seconds": {n: {"median": med[n], "runs": v} for n, v in times.items()},
        "tokens_per_second": {n: tokens / med[n] for n in systems},
        "speedup": med["transformers generate"] / med["compress.generation"],
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens", "identical_rows", "tokens_per_second", "speedup")}, indent=2))
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
