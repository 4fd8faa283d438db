"""AmoebaLLM (issue 19): the subnet table of the embedded SmolLM2-135M, against baselines of the same
shapes at the same fine-tuning tokens, and how long picking takes once the table exists.

Every row is `compress model` with a profile written here, run in `--repo` (a fresh clone), with
`--data wikitext-2/valid.txt` and `data.mix: 0` (training and calibration on wikitext-2 *valid*
only), evaluated on the first 40,960 tokens of wikitext-2 *test* in 512-token windows.

- `--supernet`: the `amoeba` pass as the `edge` profile configures it, on the unpruned model: the DP
  table, FLAP widths, the mixture of LoRAs trained with the sandwich rule (STEPS x BATCH x 512
  tokens), then the 16-point table (every point evaluated on the test tokens; latency and size at
  4 bits measured at 6 points on this machine in 3 interleaved rounds, the rest predicted).
- `--baselines`: every table point below the full model with at least 80 % of its parameters,
  rebuilt one-shot from the *same* DP removal order and FLAP ranking (an `amoeba` stage with 0
  training steps, shared by all of them), extracted (`pick --depth D --width W`: the dropped
  channels' means folded into biases, as for the supernet) and then distilled with the same tokens
  (`distill`: CE + KL to the teacher, full fine-tuning, STEPS x BATCH x 512). Width 1: layer
  dropping by the DP order + distillation; depth 30: one-shot FLAP width pruning + distillation;
  both below: the two together.
- `--supernet-full`: the same supernet with `tuning: full` (the decoder's Linear weights trained
  beside the experts at `base_lr`), its table read on the same tokens (latency measured at one
  point, one round: the shapes and so the latencies are those of `--supernet`), against the same
  baselines.
- `--heldout`: the subnets with baselines and their baselines on the multi-domain held-out table of
  heldout.py (wikitext-2 test, the teacher's answers, stdlib code, docstrings; 16,384 tokens each).
- `--pick-timing`: wall seconds of `compress subnets pick RUN --max-ms-per-token X` for X just above
  a measured point (no new measurement needed) and for X just above a predicted one (one
  measurement), median of 3.

    python benchmarks/amoeba.py --repo /work/fresh33 --supernet
    python benchmarks/amoeba.py --repo /work/fresh33 --baselines
    python benchmarks/amoeba.py --heldout --pick-timing
    python benchmarks/amoeba.py --render

Result: benchmarks/results/amoeba.json (parts merge across invocations). wikitext-2: CC BY-SA 3.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from heldout import evaluate_heldout, log, run_compress, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULT = ROOT / "benchmarks" / "results" / "amoeba.json"
TOKENS, WINDOW = 40960, 512
STEPS, BATCH = 60, 2


def amoeba_config(**extra) -> dict:
    """The edge profile's amoeba stage (the shipped settings), with ``extra`` on top."""
    import yaml

    raw = yaml.safe_load((ROOT / "profiles" / "edge.yaml").read_text())
    cfg = next(p["config"] for p in raw["passes"] if p["name"] == "amoeba")
    assert cfg["steps"] == STEPS and cfg["batch_size"] == BATCH, "keep STEPS / BATCH equal to the edge profile's"
    return {**cfg, **extra}


def write_profile(path: Path, passes: list[dict], name: str) -> Path:
    import yaml

    raw = {"description": f"benchmarks/amoeba.py {name}", "target": "cpu", "data": {"mix": 0.0},
           "evaluation": {"max_tokens": TOKENS, "window": WINDOW, "domains": []}, "passes": passes}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def model_cmd(prof: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "compress", "model", "--profile", str(prof), "--data", str(DATA / "valid.txt"),
            "--eval-data", str(DATA / "test.txt"), "--out", str(out), "--json", "--quiet"]


def commit_of(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def supernet(repo: Path, work: Path, cache: Path, name: str = "supernet", **extra) -> dict[str, Any]:
    out = work / name
    prof = write_profile(work / f"{name}.yaml", [{"name": "amoeba", "config": amoeba_config(**extra)}], name)
    rep, wall = run_compress(name, model_cmd(prof, out), repo, cache)  # a killed run resumes
    teacher, st = rep["stages"][0], rep["stages"][1]
    man = json.loads((out / st["path"] / "manifest.json").read_text())
    m = man["metrics"]
    a = m["amoeba"]
    return {"commit": commit_of(repo), "wall_seconds": round(wall, 1), "path": str(out),
            "teacher_perplexity": teacher["perplexity"], "full_perplexity": st["perplexity"],
            "table": m["subnets"], "target": m["subnets_target"],
            "dp": {k: a["dp"][k] for k in ("removed", "scores", "evaluations", "sequences", "seq_len", "seconds")},
            "widths": a["widths"], "flap_seconds": a["flap_seconds"],
            "kl_heldout_before": a["kl_heldout_before"], "kl_heldout": a["kl_heldout"],
            "kl_heldout_smallest_before": a.get("kl_heldout_smallest_before"),
            "kl_heldout_smallest": a["kl_heldout_smallest"], "trainable_parameters": a["trainable_parameters"],
            "train": {k: v for k, v in a["train"].items() if not isinstance(v, (list, dict))},
            "pass_seconds": m.get("pass_seconds"), "settings": extra}


def baseline_points(table: list[dict]) -> list[dict]:
    full = max(r["parameters"] for r in table)
    return [r for r in table if 0.8 * full <= r["parameters"] < full]


def baselines(repo: Path, work: Path, cache: Path, table: list[dict]) -> tuple[dict[str, Any], list[dict]]:
    """One folder: the 0-step amoeba stage is computed once and reused (same id) by every baseline.
    Also returns that stage's table: every point one-shot (DP order + FLAP, untrained experts)."""
    out = work / "baselines"
    rows, oneshot = {}, []
    for r in baseline_points(table):
        name = f"d{r['depth']}-w{r['width']}"
        kind = ("layer drop (DP order) + distill" if r["width"] == 1.0 else
                "FLAP width + distill" if r["depth"] == max(t["depth"] for t in table) else "DP + FLAP + distill")
        passes = [{"name": "amoeba", "config": amoeba_config(steps=0, latency_points=1)},
                  {"name": "pick", "config": {"depth": r["depth"], "width": r["width"]}},
                  {"name": "distill", "config": {"steps": STEPS, "batch_size": BATCH, "lr": 5e-5, "warmup_steps": 5,
                                                 "ce": 1.0, "kl": 1.0}}]
        prof = write_profile(work / f"baseline-{name}.yaml", passes, f"baseline {name}")
        rep, wall = run_compress(f"baseline {name}", model_cmd(prof, out), repo, cache)
        st = {s["name"].split("-", 1)[1]: s for s in rep["stages"]}
        final, picked = st["distill"], st["pick"]
        oneshot = json.loads((out / st["amoeba"]["path"] / "manifest.json").read_text())["metrics"]["subnets"]
        rows[name] = {"depth": r["depth"], "width": r["width"], "kind": kind, "parameters": final["parameters"],
                      "perplexity": final["perplexity"], "kl": final["kl"], "top1_agreement": final["top1_agreement"],
                      "oneshot_perplexity": picked["perplexity"], "amoeba_perplexity": r["perplexity"],
                      "amoeba_kl": r["kl"], "beats": r["perplexity"] < final["perplexity"],
                      "wall_seconds": round(wall, 1), "path": str(out / final["path"]), "commit": commit_of(repo)}
        shutil.copytree(out / final["path"], work / f"baseline-{name}", dirs_exist_ok=True)  # kept for --heldout
        rows[name]["path"] = str(work / f"baseline-{name}")
    return rows, oneshot


def heldout(work: Path, result: dict, part: str = "supernet", prefix: str = "amoeba",
            with_baselines: bool = True) -> dict[str, Any]:
    from compress import api
    from compress.sources import resolve_source_ref
    from compress.resources import Resources
    from compress.config import DataConfig
    from compress.ui import UI

    teacher = Resources(resolve_source_ref(None), DataConfig(), UI(True)).folder()
    run = Path(result[part]["path"])
    out = {}
    for name, b in result.get("baselines", {}).items():
        sub = work / f"{part}-{name}"
        api.subnets_pick(run, sub, depth=b["depth"], width=b["width"], force=True, quiet=True)
        rows = [(f"{prefix} {name}", sub)] + ([(f"baseline {name}", Path(b["path"]))] if with_baselines else [])
        for label, folder in rows:
            log(f"heldout: {label}")
            per, seconds = evaluate_heldout(folder, teacher)
            out[label] = {"domains": per, "summary": summarize(per), "eval_seconds": seconds}
    return out


def pick_timing(result: dict, repo: Path) -> dict[str, Any]:
    run = result["supernet"]["path"]
    table = result["supernet"]["table"]
    measured = sorted((r for r in table if r["latency_measured"]), key=lambda r: r["ms_per_token"])
    predicted = sorted((r for r in table if not r["latency_measured"]), key=lambda r: r["ms_per_token"])
    out = {}
    for label, rows in (("measured point", measured), ("predicted point", predicted)):
        if not rows:
            continue
        x = rows[len(rows) // 2]["ms_per_token"] * 1.02
        walls = []
        for _ in range(3):
            dest = Path(run) / "pick-timing"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "compress", "subnets", "pick", run, "--max-ms-per-token",
                                   f"{x:.4f}", "--out", str(dest), "--force", "--json", "--quiet"],
                                  capture_output=True, text=True, cwd=repo)
            walls.append(time.perf_counter() - t)
            shutil.rmtree(dest, ignore_errors=True)
            if proc.returncode not in (0, 2):
                raise SystemExit(f"pick failed: {proc.stderr.strip()[-800:]}")
        got = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()}
        out[label] = {"budget_ms": x, "median_seconds": statistics.median(walls), "seconds": walls,
                      "picked": {k: got.get("row", {}).get(k) for k in ("depth", "width", "ms_per_token")},
                      "measurements": len(got.get("measured", []))}
    return out


def render(result: dict) -> str:
    sn = result.get("supernet")
    lines = []
    if sn:
        t = sn["teacher_perplexity"]
        untrained = {(r["depth"], r["width"]): r["perplexity"] for r in result.get("oneshot_table", [])}
        full = max(sn["table"], key=lambda r: r["parameters"])
        lines += ["| depth | width | params M | MB (4-bit) | perplexity | × teacher | untrained × teacher | KL | top-1 | "
                  "ms/token | × full latency | TTFT ms |", "|" + "---|" * 12]
        for r in sn["table"]:
            star = "" if r["latency_measured"] else "*"
            before = untrained.get((r["depth"], r["width"]))
            lines.append(f"| {r['depth']} | {r['width']} | {r['parameters'] / 1e6:.1f} | {r['size_mb']:.1f}{star} | "
                         f"{r['perplexity']:.3f} | {r['perplexity'] / t:.3f} | "
                         f"{'–' if before is None else f'{before / t:.3f}'} | {r['kl']:.4f} | "
                         f"{r['top1_agreement']:.3f} | {r['ms_per_token']:.2f}{star} | "
                         f"{r['ms_per_token'] / full['ms_per_token']:.3f}{star} | {r['ttft_ms']:.1f}{star} |")
        from compress.passes.amoeba.measure import prediction_error

        for key, name in (("ms_per_token", "ms/token"), ("ttft_ms", "TTFT")):
            err = prediction_error(sn["table"], key)
            if err:
                per = ", ".join(f"d{e['depth']}-w{e['width']} {100 * e['error']:+.1f} %" for e in err["per_point"])
                lines.append(f"\nPredicted {name}, each measured point from the other {err['points'] - 1} (what "
                             f"`subnets list` prints): median error {100 * err['median_abs_error']:.1f} %, worst "
                             f"{100 * err['max_abs_error']:.1f} % ({per}).")
    if result.get("baselines"):
        lines += ["", "| subnet | baseline | params M | Amoeba perplexity | baseline perplexity | one-shot | "
                      "Amoeba KL | baseline KL | Amoeba beats it |", "|---|---|---|---|---|---|---|---|---|"]
        for n, b in result["baselines"].items():
            lines.append(f"| {n} | {b['kind']} | {b['parameters'] / 1e6:.1f} | {b['amoeba_perplexity']:.3f} | "
                         f"{b['perplexity']:.3f} | {b['oneshot_perplexity']:.3f} | {b['amoeba_kl']:.4f} | "
                         f"{b['kl']:.4f} | {'yes' if b['beats'] else 'no'} |")
    if result.get("supernet_full") and result.get("baselines") and sn:
        sf, t = result["supernet_full"], sn["teacher_perplexity"]
        full_rows = {(r["depth"], r["width"]): r for r in sf["table"]}
        lines += ["", "| subnet | params M | tuning lora × teacher | tuning full × teacher | baseline × teacher | "
                      "full beats baseline |", "|---|---|---|---|---|---|"]
        base = {(b["depth"], b["width"]): b for b in result["baselines"].values()}
        by_size = sorted(sn["table"], key=lambda r: r["parameters"])
        points = [by_size[-1]] + [r for r in sn["table"] if (r["depth"], r["width"]) in base] + [by_size[0]]
        for r in points:
            f, b = full_rows[(r["depth"], r["width"])], base.get((r["depth"], r["width"]))
            lines.append(f"| d{r['depth']}-w{r['width']} | {r['parameters'] / 1e6:.1f} | {r['perplexity'] / t:.3f} | {f['perplexity'] / t:.3f} | "
                         + (f"{b['perplexity'] / t:.3f} | {'yes' if f['perplexity'] < b['perplexity'] else 'no'} |"
                            if b else "– | – |"))
        lines.append(f"\n`tuning: full`: {sf['trainable_parameters'] / 1e6:.1f} M trained, {sf['wall_seconds']:.0f} s "
                     f"wall; held-out KL of the full subnet {sf['kl_heldout']:.4f} (lora {sn['kl_heldout']:.4f}), "
                     f"of the smallest {sf['kl_heldout_smallest']:.4f} (lora {sn['kl_heldout_smallest']:.4f}).")
    if result.get("heldout"):
        ho = {**result["heldout"], **result.get("heldout_full", {})}
        ho = {k: ho[k] for k in sorted(ho, key=lambda k: (k.split()[-1], k.split()[0] != "amoeba", k))}
        domains = list(next(iter(ho.values()))["domains"])
        lines += ["", "| model | " + " | ".join(f"{d} × teacher" for d in domains) + " | geomean | worst |",
                  "|" + "---|" * (len(domains) + 3)]
        for label, h in ho.items():
            s = h["summary"]
            lines.append(f"| {label} | " + " | ".join(f"{s['ratios'][d]:.3f}" for d in domains)
                         + f" | {s['geomean_ratio']:.3f} | {s['worst_ratio']:.3f} ({s['worst_domain']}) |")
    if result.get("pick_timing"):
        lines += ["", "| `subnets pick --max-ms-per-token X` | X (ms) | picked | measurements | seconds (median of 3) |",
                  "|---|---|---|---|---|"]
        for label, p in result["pick_timing"].items():
            pk = p["picked"]
            lines.append(f"| X just above a {label} | {p['budget_ms']:.3f} | d{pk['depth']}-w{pk['width']} "
                         f"({pk['ms_per_token']:.3f} ms) | {p['measurements']} | {p['median_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout that runs the rows (a fresh clone)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "amoeba")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--supernet", action="store_true")
    ap.add_argument("--supernet-full", action="store_true")
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--heldout-full", action="store_true", help="the --supernet-full subnets on the held-out table")
    ap.add_argument("--pick-timing", action="store_true")
    ap.add_argument("--render", action="store_true")
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "amoeba"}
    if args.render:
        print(render(result))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    from compress.hardware import cpu_name

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    result.setdefault("machine", machine)  # the machine of the first parts; a later part records its own
    result["protocol"] = {"train": f"wikitext-2 valid, {STEPS} x {BATCH} x 512 tokens per trained row",
                          "eval": f"first {TOKENS} wikitext-2 test tokens, {WINDOW}-token windows"}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.supernet:
        result["supernet"] = {**supernet(args.repo, args.work, cache), "date": time.strftime("%Y-%m-%d"),
                              "machine": machine}
        save()
    if args.supernet_full:
        result["supernet_full"] = {**supernet(args.repo, args.work, cache, "supernet-full", tuning="full",
                                              latency_points=1, latency_rounds=1), "date": time.strftime("%Y-%m-%d"),
                                   "machine": machine}
        save()
    if args.baselines:
        result["baselines"], result["oneshot_table"] = baselines(args.repo, args.work, cache,
                                                                 result["supernet"]["table"])
        save()
    if args.heldout:
        result["heldout"] = heldout(args.work, result)
        save()
    if args.heldout_full:
        result["heldout_full"] = heldout(args.work, result, "supernet_full", prefix="amoeba full", with_baselines=False)
        save()
    if args.pick_timing:
        result["pick_timing"] = pick_timing(result, args.repo)
        save()
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
