"""Issue 14's acceptance: the pass-platform rebuild moves no figure.

1. ``decode``: the embedded model exported fp32 by the code before the rebuild (a git worktree at
   ``--before``, default a177030) and by this checkout; the two folders' files are compared byte for
   byte, and both are profiled in one ``compress profile`` call, in each order (5 runs after 1
   warm-up, 128 + 128 tokens, 2 threads; each export's better round is kept); the new median is
   checked against the min–max of ``ours fp32`` in ``results/anchors.json`` (the anchors run of
   2026-11-30).
2. ``cpu4``: exactly BENCHMARKS.md's ``cpu-4bit`` command (calibrate/train on wikitext-2 valid,
   evaluate on the first 40,960 tokens of test); the deployed export's perplexity against the
   recorded 28.081 (``results/quantize.json``).

    python benchmarks/platform_check.py --only decode,cpu4      # ~30 min on 2 cores

Result: ``benchmarks/results/platform_check.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
OUT = ROOT / "benchmarks" / "results" / "platform_check.json"


def log(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def sh(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in ("manifest.json", "metrics.json"):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def decode(work: Path, before: str) -> dict:
    old_tree = work / f"tree-{before}"
    if not old_tree.is_dir():
        sh(["git", "worktree", "add", "--detach", str(old_tree), before], ROOT)
    exports = {}
    for name, tree in (("before", old_tree), ("after", ROOT)):
        out = work / f"fp32-{name}"
        if not (out / "manifest.json").is_file():
            log(f"exporting fp32 with the {name} code ({tree})")
            # `python -m compress` from the tree's root imports that tree's package
            sh([sys.executable, "-m", "compress", "export", "--out", str(out), "--quiet", "--json"], tree,
               env={"PYTHONPATH": str(tree)})
        exports[name] = out
    da, db = digests(exports["before"]), digests(exports["after"])
    rounds = []
    for order in (("before", "after"), ("after", "before")):  # both orders: the second model runs warmer
        log(f"profiling both exports in one call, {order[0]} first")
        prof = json.loads(sh([sys.executable, "-m", "compress", "profile", *(str(exports[n]) for n in order),
                              "--target", "cpu:2", "--runs", "5", "--warmup", "1", "--json", "--quiet"], ROOT))
        rounds.append({name: r for name, r in zip(order, prof["results"])})
    rows = {n: max((r[n] for r in rounds), key=lambda x: x["decode_tokens_per_second"]["median"])
            for n in ("before", "after")}  # each export's better round
    rounds_med = [{k: r[k]["decode_tokens_per_second"]["median"] for k in r} for r in rounds]
    anchors = json.loads((ROOT / "benchmarks" / "results" / "anchors.json").read_text())
    ref = next(r for r in anchors["rows"] if r["system"] == "ours fp32")["decode_tokens_per_second"]
    after = rows["after"]["decode_tokens_per_second"]["median"]
    return {
        "command": "python benchmarks/platform_check.py --only decode",
        "before_commit": before,
        "files_identical": da == db,
        "files_differing": sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k)),
        "decode_tokens_per_second": {k: r["decode_tokens_per_second"] for k, r in rows.items()},
        "rounds_decode_median": rounds_med,
        "prefill_tokens_per_second": {k: r["prefill_tokens_per_second"] for k, r in rows.items()},
        "after_over_before_decode": after / rows["before"]["decode_tokens_per_second"]["median"],
        "anchors_ours_fp32_decode": ref,
        # where the new median falls against the anchors run's min-max: below (slower), within, above (faster)
        "vs_anchors_spread": "below" if after < ref["min"] else ("above" if after > ref["max"] else "within"),
        "after_within_before_rounds": min(r["before"] for r in rounds_med) <= after
                                      <= max(r["before"] for r in rounds_med) * 1.0001,
    }


def cpu4(work: Path) -> dict:
    out = work / "cpu-4bit"
    cmd = [sys.executable, "-m", "compress", "model", "--profile", "cpu-4bit", "--data", str(DATA / "valid.txt"),
           "--eval-data", str(DATA / "test.txt"), "--set", "evaluation.max_tokens=40960", "--set",
           "evaluation.window=512", "--out", str(out), "--json", "--quiet"]
    log("compress model --profile cpu-4bit (BENCHMARKS.md's command)")
    t = time.perf_counter()
    rep = json.loads(sh(cmd, ROOT))
    wall = time.perf_counter() - t
    recorded = json.loads((ROOT / "benchmarks" / "results" / "quantize.json").read_text())["rows"][
        "ours 4-bit g128 (cpu-4bit)"]
    st = {s["pass"]: s for s in rep["stages"]}
    exp = st["export_onnx"]
    return {
        "command": "compress model --profile cpu-4bit --data shared/data/wikitext-2/valid.txt --eval-data "
                   "shared/data/wikitext-2/test.txt --set evaluation.max_tokens=40960 --set evaluation.window=512",
        "wall_seconds": wall,
        "perplexity": exp["perplexity"], "kl": exp["kl"], "top1_agreement": exp["top1_agreement"],
        "fake_quant_perplexity": st["quantize"]["perplexity"], "teacher_perplexity": rep["stages"][0]["perplexity"],
        "weight_bytes": exp["weight_bytes"],
        "recorded": {k: recorded.get(k) for k in ("perplexity", "kl", "fake_quant_perplexity", "size_bytes")},
        "perplexity_equal_to_3_decimals": round(exp["perplexity"], 3) == round(recorded["perplexity"], 3),
        "decode_tokens_per_second": (st["profile_latency"].get("latency") or [{}])[0].get("decode_tokens_per_second"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="decode,cpu4")
    ap.add_argument("--before", default="a177030", help="the commit before the rebuild")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "platform")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    from compress.hardware import cpu_name

    commit = sh(["git", "describe", "--always", "--dirty"], ROOT).strip()
    for group in args.only.split(","):
        result[group] = {**(decode(args.work, args.before) if group == "decode" else cpu4(args.work)),
                         "date": time.strftime("%Y-%m-%d"), "commit": commit}
        result["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        log(json.dumps({k: v for k, v in result[group].items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
