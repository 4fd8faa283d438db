"""The README's first command, timed as a newcomer meets it: `compress model --out DIR` (default profile
`quick-4bit`) on the embedded model with an empty cache, so the GGUF conversion and the teacher-written
data are part of the time. Records wall time, peak RSS (of the largest process in the tree), and the report's
teacher-vs-compressed rows; then evaluates the deployed export on wikitext-2 test (first 40,960
tokens, the teacher's 26.365 from BENCHMARKS.md's baseline) when ../shared/data is there.

    python benchmarks/default_run.py [--work benchmarks/_work/default_run] [--out benchmarks/results/default_run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "default_run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "default_run.json")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = {**os.environ, "COMPRESS_CACHE_DIR": str(args.work / "cache")}  # empty: conversion and data included
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compress", "model", "--out", str(args.work / "run"), "--json",
                           "--quiet"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return proc.returncode
    report = json.loads(proc.stdout)
    from compress.hardware import cpu_name
    from compress.report import summary_rows

    rows = summary_rows(report)
    t_, c = rows["teacher"], rows["compressed"]
    tl, cl = rows["teacher_latency"], rows["compressed_latency"]
    from importlib.metadata import version

    result = {
        "benchmark": "default_run", "date": time.strftime("%Y-%m-%d"),
        "command": "compress model --out DIR (fresh COMPRESS_CACHE_DIR)",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    **{n: version(n) for n in ("torch", "transformers", "onnxruntime")}},
        "profile": report["profile"], "wall_seconds": round(wall, 1), "peak_rss_bytes": peak,
        "evaluation": report["evaluation"],
        "teacher": {k: t_.get(k) for k in ("name", "perplexity", "weight_bytes")},
        "compressed": {**{k: c.get(k) for k in ("name", "path", "perplexity", "kl", "top1_agreement", "weight_bytes",
                                                "domains", "ratio_geomean", "ratio_worst", "worst_domain")},
                       "validation": ((c.get("pass_metrics") or {}).get("export") or {}).get("validation")},
        "latency": {"teacher": tl, "compressed": cl},
        "stages": [{k: s.get(k) for k in ("name", "perplexity", "kl", "weight_bytes", "pass_seconds", "eval_seconds")}
                   for s in report["stages"]],
    }
    # the same deployed model on text the recipe never saw: wikitext-2 test (the protocol of the other tables)
    wikitext = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
    if wikitext.is_file():
        ev = subprocess.run([sys.executable, "-m", "compress", "eval", str(args.work / "run" / c["path"]), "--data",
                             str(wikitext), "--max-tokens", "40960", "--json", "--quiet"],
                            capture_output=True, text=True, env=env)
        if ev.returncode == 0:
            w = json.loads(ev.stdout)
            result["wikitext2_test_40960"] = {
                "command": "compress eval RUN/stages/02-export_onnx --data wikitext-2/test.txt --max-tokens 40960",
                "perplexity": w["perplexity"], "teacher_perplexity": 26.365, "x_teacher": w["perplexity"] / 26.365,
                "kl": w.get("kl"), "top1_agreement": w.get("top1_agreement"), "tokens": w["tokens"]}
            print(f"wikitext-2 test, 40,960 tokens: perplexity {w['perplexity']:.3f} (x{w['perplexity'] / 26.365:.3f} "
                  f"the teacher's 26.365), KL {w['kl']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ratio = c["perplexity"] / t_["perplexity"]
    print(f"{report['profile']}: {wall / 60:.1f} min wall, peak RSS {peak / 1e9:.1f} GB; perplexity {t_['perplexity']:.3f} -> "
          f"{c['perplexity']:.3f} (x{ratio:.3f}), KL {c['kl']:.4f}, {t_['weight_bytes'] / 1e6:.1f} -> "
          f"{c['weight_bytes'] / 1e6:.1f} MB, decode {tl['decode_tokens_per_second']['median']:.1f} -> "
          f"{cl['decode_tokens_per_second']['median']:.1f} tok/s; held-out domains: geometric mean x{c['ratio_geomean']:.3f}, "
          f"worst x{c['ratio_worst']:.3f} ({c['worst_domain']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
