"""Sparse fine-tuning (issue 17): one-shot pruning methods, recovery losses at equal tokens, and
what sparsity buys a device user (the zstd download), on the embedded SmolLM2-135M.

Every row is `compress model` with a profile written here, run in `--repo` (a fresh clone), with
`--data wikitext-2/valid.txt` and `data.mix: 0` (calibration and training on wikitext-2 *valid*
only), evaluated on the first 40,960 tokens of wikitext-2 *test* in 512-token windows: perplexity,
its ratio to the teacher on the same windows, KL to the teacher, top-1 agreement. Sizes: the
weights on disk and the whole stage folder compressed file by file with zstd (level 3, what the
report prints; `--level19` adds level 19 for the exports).

Rows (`--rows`, comma-separated; all by default)
- `magnitude50`, `wanda50`, `sparsegpt50`: 50 % unstructured, one-shot (no training).
- `sparsegpt50-ce`, `sparsegpt50-kd`, `sparsegpt50-sq`: SparseGPT 50 %, then 40 steps x 4 x 512
  tokens (81,920) with the masks fixed: CE only; CE + logit KD (forward KL, T 1); CE + SquareHead
  (the authors' recipe, ours). LR 3e-5 (the authors' rate up to 50 %).
- `sparsegpt24`, `sparsegpt24-ce`, `sparsegpt24-kd`, `sparsegpt24-sq`: the same at 2:4 (LR 1e-4).
- `sparsegpt70-sq`: 70 % unstructured + SquareHead (LR 8e-5).
- `sparse50-4bit`: profile cpu-sparse50-4bit end to end (SparseGPT 50 % + SquareHead, cpu-4bit's
  quantization, MatMulNBits export): the deployed ONNX.
- `dense-4bit`: profile cpu-4bit end to end on the same data: the dense model at the same format.

    python benchmarks/sparse.py --repo /work/fresh17 [--rows sparsegpt50,sparsegpt50-sq] [--level19]
    COMPRESS_CACHE_DIR=benchmarks/_work/heldout/cpu-4bit-cache python benchmarks/sparse.py --heldout ROW,ROW

Result: benchmarks/results/sparse.json (rows merge across invocations). wikitext-2: CC BY-SA 3.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from heldout import evaluate_heldout, log, run_compress, summarize  # noqa: E402  (one way to run a row: the CLI in a fresh clone)

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULT = ROOT / "benchmarks" / "results" / "sparse.json"
TOKENS, WINDOW = 40960, 512
STEPS, BATCH = 40, 4  # 81,920 training tokens per trained row

LOSSES = {"ce": {"ce": 1.0, "kl": 0.0, "squarehead": 0.0},
          "kd": {"ce": 1.0, "kl": 1.0, "squarehead": 0.0},
          "sq": {"ce": 1.0, "kl": 0.0, "squarehead": 1.0}}


def sparse_ft(method: str, sparsity: float, pattern: str, loss: str | None, lr: float) -> dict:
    cfg = {"method": method, "sparsity": sparsity, "pattern": pattern, "calibration_blocks": 32, "heldout_blocks": 4}
    if loss is None:
        return {**cfg, "steps": 0}
    return {**cfg, "steps": STEPS, "batch_size": BATCH, "lr": lr, "warmup_steps": 4, "schedule": "linear",
            **LOSSES[loss]}


def rows() -> dict[str, dict]:
    """Row name -> {"passes": [...]} or {"profile": NAME} (a shipped profile, run as users run it)."""
    out: dict[str, dict] = {}
    for m in ("magnitude", "wanda", "sparsegpt"):
        out[f"{m}50"] = {"passes": [{"name": "sparse_ft", "config": sparse_ft(m, 0.5, "unstructured", None, 0)}]}
    for loss in LOSSES:
        out[f"sparsegpt50-{loss}"] = {"passes": [{"name": "sparse_ft",
                                                  "config": sparse_ft("sparsegpt", 0.5, "unstructured", loss, 3e-5)}]}
    out["sparsegpt24"] = {"passes": [{"name": "sparse_ft", "config": sparse_ft("sparsegpt", 0.5, "2:4", None, 0)}]}
    for loss in LOSSES:
        out[f"sparsegpt24-{loss}"] = {"passes": [{"name": "sparse_ft",
                                                  "config": sparse_ft("sparsegpt", 0.5, "2:4", loss, 1e-4)}]}
    out["sparsegpt70-sq"] = {"passes": [{"name": "sparse_ft",
                                         "config": sparse_ft("sparsegpt", 0.7, "unstructured", "sq", 8e-5)}]}
    out["sparse50-4bit"] = {"profile": "cpu-sparse50-4bit"}
    out["dense-4bit"] = {"profile": "cpu-4bit"}
    return out


def write_profile(path: Path, name: str, spec: dict) -> Path:
    """A shipped profile with this benchmark's data and evaluation, or a profile of the row's passes."""
    import yaml

    if "profile" in spec:
        from compress.profiles import profile_path

        raw = yaml.safe_load(profile_path(spec["profile"]).read_text())
    else:
        raw = {"target": "cpu", "passes": spec["passes"]}
    raw.update(description=f"benchmarks/sparse.py row {name}", data={"mix": 0.0},
               evaluation={"max_tokens": TOKENS, "window": WINDOW, "domains": []})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_row(name: str, spec: dict, repo: Path, work: Path, cache: Path, level19: bool) -> dict[str, Any]:
    from compress.formats import download_bytes

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    prof = write_profile(work / f"{name}.yaml", name, spec)
    cmd = [sys.executable, "-m", "compress", "model", "--profile", str(prof), "--data", str(DATA / "valid.txt"),
           "--eval-data", str(DATA / "test.txt"), "--out", str(out), "--json", "--quiet"]
    rep, wall = run_compress(name, cmd, repo, cache)
    st = rep["stages"]
    teacher = st[0]
    made = [s for s in st[1:] if s.get("changes_model", True) and s.get("perplexity") is not None]
    final = made[-1]
    sp = next((s for s in st if s.get("pass") == "sparse_ft"), None)
    spm = (sp or {}).get("pass_metrics", {}).get("sparse_ft", {})
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    row = {"row": name, "commit": commit, "spec": spec, "wall_seconds": round(wall, 1),
           "command": "compress " + " ".join(cmd[3:]).replace(str(DATA), "shared/data/wikitext-2")
           .replace(str(prof), f"benchmarks/_work/sparse/{prof.name}").replace(str(out), "OUT"),
           "stage": final["name"], "format": final["format"],
           "perplexity": final["perplexity"], "teacher_perplexity": teacher["perplexity"],
           "ratio": final["perplexity"] / teacher["perplexity"], "kl": final.get("kl"),
           "top1_agreement": final.get("top1_agreement"), "eval_tokens": final.get("eval_tokens"),
           "weight_bytes": final["weight_bytes"], "download_bytes": final.get("download_bytes"),
           "teacher_weight_bytes": teacher["weight_bytes"], "teacher_download_bytes": teacher.get("download_bytes"),
           "pass_seconds": {s["name"]: s.get("pass_seconds") for s in st[1:]},
           "sparse_ft": {**{k: spm[k] for k in ("sparsity", "kl_heldout_oneshot", "kl_heldout_tuned", "prune_seconds",
                                                 "seconds") if k in spm},
                         "train": {k: v for k, v in (spm.get("train") or {}).items() if not isinstance(v, list)}},
           "latency": final.get("latency") or next((s.get("latency") for s in st if s.get("latency")), None)}
    if row["download_bytes"] is None:  # an older checkout: its report has no download column
        row["download_bytes"] = download_bytes(out / final["path"])
    if final["format"] == "onnx" and sp is not None:  # the zeros as deployed, per decoder matrix of the graph
        from exporters.onnx.weights import weight_zeros

        mats = [r for r in weight_zeros(out / final["path"]) if "layers" in r["node"]]
        row["export_zeros"] = {"matrices": len(mats), "min_fraction": min(r["fraction"] for r in mats),
                               "fraction": sum(r["zeros"] for r in mats) / sum(r["weights"] for r in mats)}
    if level19 and final["format"] == "onnx":
        row["download_bytes_zstd19"] = download_bytes(out / final["path"], level=19)
    return row


def heldout_domains(row: dict, work: Path) -> dict[str, Any]:
    """The row's final stage on the held-out domains of benchmarks/heldout.py (wikitext-2 test,
    the teacher's answers, stdlib code and docstrings; 16,384 tokens each): is a row's wikitext-2
    figure adaptation to the domain it trained on, or closeness to the teacher?"""
    from compress.models import model_folder
    from compress.sources import resolve_source_ref

    per, seconds = evaluate_heldout(work / row["row"] / "stages" / row["stage"],
                                    model_folder(resolve_source_ref(None), quiet=True))
    return {"domains": per, "summary": summarize(per), "eval_seconds": seconds}


def render(result: dict) -> str:
    """The rows as BENCHMARKS.md's table."""
    lines = ["| row | sparsity | perplexity | × teacher | KL | top-1 | weights MB | download MB (zstd 3) | "
             "held-out KL one-shot → tuned | pass s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        sp = r.get("sparse_ft") or {}
        kl = (f"{sp['kl_heldout_oneshot']:.3f}" + (f" → {sp['kl_heldout_tuned']:.3f}" if "kl_heldout_tuned" in sp else "")
              if "kl_heldout_oneshot" in sp else "—")
        zeros = r.get("export_zeros")
        frac = (f"{100 * zeros['fraction']:.2f} % (min {100 * zeros['min_fraction']:.2f} %)" if zeros
                else (f"{100 * sp['sparsity']:.1f} %" if "sparsity" in sp else "0"))
        lines.append(f"| `{name}` | {frac} | {r['perplexity']:.3f} | {r['ratio']:.3f} | {r['kl']:.4f} | "
                     f"{r['top1_agreement']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {r['download_bytes'] / 1e6:.1f} | {kl} | "
                     f"{sum(v or 0 for v in r['pass_seconds'].values()):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout that runs the rows (a fresh clone)")
    ap.add_argument("--rows", help="comma-separated row names (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "sparse")
    ap.add_argument("--level19", action="store_true", help="also zstd level 19 of the ONNX exports")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--render", action="store_true", help="print the result as a markdown table and stop")
    ap.add_argument("--heldout", help="comma-separated rows already run: evaluate their final stage on the held-out "
                    "domains of heldout.py (set COMPRESS_CACHE_DIR to a cache holding the teacher's answers)")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.out.read_text())))
        return 0
    if args.heldout:
        result = json.loads(args.out.read_text())
        for name in args.heldout.split(","):
            result["rows"][name]["heldout"] = heldout_domains(result["rows"][name], args.work)
            h = result["rows"][name]["heldout"]
            log(f"{name}: " + ", ".join(f"{n} x{v:.3f}" for n, v in h["summary"]["ratios"].items())
                + f"; geomean x{h['summary']['geomean_ratio']:.3f}")
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    table = rows()
    names = args.rows.split(",") if args.rows else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    args.work.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    from compress.hardware import cpu_name, fast_bf16

    result = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "sparse", "rows": {}}
    result.update(machine={"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "bf16_fast": fast_bf16()[0],
                           **{n: version(n) for n in ("torch", "transformers", "onnxruntime")}},
                  protocol=f"train/calibrate on wikitext-2 valid (data.mix 0); first {TOKENS} wikitext-2 test tokens, "
                           f"{WINDOW}-token windows; trained rows {STEPS} steps x {BATCH} x 512 tokens")
    cache = args.work / "cache"  # the converted teacher, shared by every row
    for name in names:
        row = run_row(name, table[name], args.repo, args.work, cache, args.level19)
        row["date"] = time.strftime("%Y-%m-%d")
        result["rows"][name] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"{name}: ppl {row['perplexity']:.3f} (x{row['ratio']:.3f}), KL {row['kl']:.4f}, "
            f"{row['weight_bytes'] / 1e6:.1f} MB, zstd {row['download_bytes'] / 1e6:.1f} MB, {row['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
