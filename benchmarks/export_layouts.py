"""Which graph layout our exporter writes, decided by measurement.

Exports the embedded model with each `LayoutOptions` variant (all validated against PyTorch)
and times them interleaved with compress's runner: 128-token prompt, 128 greedy new tokens,
--threads threads, one warm-up round, then the median (min-max) of --runs rounds (the order rotates each round). Also reports
file size and peak RSS (fresh process per variant).

    python benchmarks/export_layouts.py [--threads 2] [--runs 5] [--out benchmarks/results/export_layouts.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "default (packed gate|up, QuickGelu, shared tied head)": {},
    "builder-like MLP (separate gate/up, Sigmoid*Mul)": {"pack_gate_up": False, "silu": "sigmoid"},
    "separate q/k/v MatMuls": {"pack_qkv": False},
    "separate lm_head copy of the tied embedding": {"lm_head": "separate"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "layouts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_layouts.json")
    args = ap.parse_args()

    from compress.formats import weight_bytes
    from compress.models import model_folder
    from compress.profiling.harness import prompt_ids
    from compress.profiling.worker import OnnxRunner
    from compress.sources import resolve_source_ref
    from exporters.onnx.decoder import LayoutOptions
    from exporters.onnx.export import ExportOptions, export_model

    hf = model_folder(resolve_source_ref(None))
    dirs = {}
    for name, kw in VARIANTS.items():
        d = args.work / str(len(dirs))
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        res = export_model(hf, d, ExportOptions(layout=LayoutOptions(**kw)))
        dirs[name] = (d, res["validation"]["max_rel_error"])
        print(f"exported {name}: validation max rel error {res['validation']['max_rel_error']:.1e}", file=sys.stderr)
    prompt = prompt_ids(hf, 128)
    runners = {n: OnnxRunner(d, threads=args.threads) for n, (d, _) in dirs.items()}
    raw = {n: [] for n in dirs}
    names = list(runners)
    for r in range(1 + args.runs):
        for n in names[r % len(names):] + names[:r % len(names)]:  # rotate: no variant always goes first
            res = runners[n].run(prompt, 128)
            if r:
                raw[n].append(res)
    del runners
    rows = []
    for n, (d, err) in dirs.items():
        code = ("import sys,json; sys.path.insert(0,%r); from compress.profiling.worker import OnnxRunner, "
                "peak_rss_bytes; r=OnnxRunner(%r, threads=%d); r.run(list(range(100,228)), 16); "
                "print(peak_rss_bytes())") % (str(ROOT), str(d), args.threads)
        rss = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1])
        dec = [len(x["decode"]) / sum(x["decode"]) for x in raw[n]]
        pre = [128 / x["prefill"] for x in raw[n]]
        rows.append({
            "layout": n, "options": dataclasses.asdict(LayoutOptions(**VARIANTS[n])),
            "decode_tokens_per_second": {"median": statistics.median(dec), "min": min(dec), "max": max(dec)},
            "prefill_tokens_per_second": {"median": statistics.median(pre), "min": min(pre), "max": max(pre)},
            "size_bytes": weight_bytes(d),
            "peak_rss_bytes": rss, "validation_max_rel_error": err,
        })
    base = rows[0]
    for r in rows:
        r["decode_ratio"] = r["decode_tokens_per_second"]["median"] / base["decode_tokens_per_second"]["median"]
        r["prefill_ratio"] = r["prefill_tokens_per_second"]["median"] / base["prefill_tokens_per_second"]["median"]
        print(f"{r['layout']:<56} decode {r['decode_tokens_per_second']['median']:6.2f} (×{r['decode_ratio']:.2f}) "
              f"prefill {r['prefill_tokens_per_second']['median']:6.1f} (×{r['prefill_ratio']:.2f}) "
              f"size {r['size_bytes'] / 1e6:6.1f} MB  RSS {r['peak_rss_bytes'] / 1e6:5.0f} MB")
    import onnxruntime

    from compress.hardware import cpu_name

    args.out.write_text(json.dumps({
        "benchmark": "export_layouts", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "onnxruntime": onnxruntime.__version__},
        "command": "python benchmarks/export_layouts.py " + " ".join(sys.argv[1:]),
        "threads": args.threads, "runs": args.runs, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
