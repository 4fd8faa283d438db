"""PAT: pruning-aware tuning of the hidden dimension (issue 18), against prune-then-tune at equal
tokens, and what the smaller shapes buy in latency, on the embedded SmolLM2-135M (d = 576).

Every trained row is `compress model` with a profile written here, run in `--repo` (a fresh clone),
with `--data wikitext-2/valid.txt` and `data.mix: 0` (training on wikitext-2 *valid* only; the
activation baseline measures its channels on the first 16 of those sequences), evaluated on the
first 40,960 tokens of wikitext-2 *test* in 512-token windows: perplexity, its ratio to the teacher
on the same windows, KL to the teacher. Every row ends with an fp32 ONNX export (validated) and is
scored the same way as that export.

Rows (`--rows`, comma-separated), for H in 512, 448, 384:
- `patH`: the pat pass as shipped (theta warm-started in the order of the activation baseline's
  one-shot channel scores, the mask refined while tuning; full tuning, CE + KL), STEPS x BATCH x 512
  tokens.
- `patH-zero`: the same with the authors' start (theta = 0: the ranking learned from nothing);
  `patH-magnitude`: warm-started from the magnitude baseline's ranking.
- `magnitudeH`, `activationH`: the prune-then-tune baselines: channels chosen one-shot (weight
  magnitude / residual energy), the model sliced, then the same losses for the same steps.
- `pat-4bit`, `dense-4bit`: the shipped profiles cpu-pat-4bit and cpu-4bit end to end on the same
  data (their own step budgets): the deployed MatMulNBits exports.

`--latency ROW,ROW` (or `all`): those rows' exports - with `dense` (the unpruned fp32 export of the
teacher, row `dense`: `compress model --profile cpu-fp32`) - and any `--latency-extra NAME=PATH`
export (a run as users run it: `pat-4bit` / `dense-4bit` name the 4-bit pair) profiled in one call,
one after another, on this machine (`compress profile`: 128 prompt + 128 new tokens, greedy, median
of 5 runs after a warm-up): decode and prefill tokens/s, TTFT, peak RSS, as ratios to the unpruned
export of the same precision.

`--balance`: the count loss against CE + KL on the real model (issue 18: "re-balanced for d = 576
and checked against CE"): per-channel gradient on theta of each loss term, at step 0 and after a few
steps of the schedule, on wikitext-2 valid.

`--heldout ROW,NAME=PATH,...`: a finished row's export (or any export, recorded under `runs`: the
4-bit pair as users run it) on the held-out domains of heldout.py (wikitext-2 test, the teacher's
answers, stdlib code and docstrings); set COMPRESS_CACHE_DIR to a cache that holds the teacher's
answers.

    python benchmarks/pat.py --repo /work/fresh22 --rows pat448,magnitude448,activation448
    python benchmarks/pat.py --latency dense,pat448 --latency-extra pat-4bit=RUN/stages/03-export_onnx ...
    python benchmarks/pat.py --balance

Result: benchmarks/results/pat.json (rows merge across invocations). wikitext-2: CC BY-SA 3.0.
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
from heldout import evaluate_heldout, log, run_compress, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
RESULT = ROOT / "benchmarks" / "results" / "pat.json"
TOKENS, WINDOW = 40960, 512
STEPS, BATCH = 100, 4  # 204,800 training tokens per trained row
WIDTHS = (512, 448, 384)


def pat_config(method: str, hidden: int, **extra) -> dict:
    return {"method": method, "hidden": hidden, "tuning": "full", "steps": STEPS, "batch_size": BATCH,
            "lr": 5e-5, "warmup_steps": 5, "heldout_blocks": 4, **extra}


def rows() -> dict[str, dict]:
    """Row name -> {"passes": [...]} or {"profile": NAME} (a shipped profile, run as users run it)."""
    out: dict[str, dict] = {}
    export = [{"name": "export_onnx", "config": {"precision": "fp32", "provider": "cpu"}}]
    for h in WIDTHS:
        for method in ("pat", "magnitude", "activation"):
            extra = {"mask_init": "activation"} if method == "pat" else {}
            out[f"{method}{h}"] = {"passes": [{"name": "pat", "config": pat_config(method, h, **extra)}, *export]}
        for init in ("zero", "magnitude"):  # the authors' start, and the other baseline's ranking
            out[f"pat{h}-{init}"] = {"passes": [{"name": "pat", "config": pat_config("pat", h, mask_init=init)},
                                                *export]}
    out["pat-4bit"] = {"profile": "cpu-pat-4bit"}
    out["dense-4bit"] = {"profile": "cpu-4bit"}
    out["dense"] = {"profile": "cpu-fp32"}
    return out


def write_profile(path: Path, name: str, spec: dict) -> Path:
    import yaml

    if "profile" in spec:
        from compress.profiles import profile_path

        raw = yaml.safe_load(profile_path(spec["profile"]).read_text())
        raw["passes"] = [p for p in raw["passes"] if p["name"] != "profile_latency"]  # --latency, side by side
    else:
        raw = {"target": "cpu", "passes": spec["passes"]}
    raw.update(description=f"benchmarks/pat.py row {name}", data={"mix": 0.0},
               evaluation={"max_tokens": TOKENS, "window": WINDOW, "domains": []})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_row(name: str, spec: dict, repo: Path, work: Path, cache: Path) -> dict[str, Any]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    prof = write_profile(work / f"{name}.yaml", name, spec)
    cmd = [sys.executable, "-m", "compress", "model", "--profile", str(prof), "--data", str(DATA / "valid.txt"),
           "--eval-data", str(DATA / "test.txt"), "--out", str(out), "--json", "--quiet"]
    rep, wall = run_compress(name, cmd, repo, cache)
    st = rep["stages"]
    teacher = st[0]
    final = [s for s in st[1:] if s.get("perplexity") is not None][-1] if len(st) > 1 else teacher
    p = next((s for s in st if s.get("pass") == "pat"), None)
    pm = (p or {}).get("pass_metrics", {}).get("pat", {})
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    keep = ("method", "mask_init", "kept_changed_from_init", "hidden_from", "hidden_to", "tuning", "trainable_parameters", "parameters_after",
            "kl_heldout_oneshot", "kl_heldout_masked", "kl_heldout", "kept_before_snap", "snapped", "snap_step",
            "kept_per_step", "seconds")
    return {"row": name, "commit": commit, "spec": spec, "wall_seconds": round(wall, 1),
            "command": "compress " + " ".join(cmd[3:]).replace(str(DATA), "shared/data/wikitext-2")
            .replace(str(prof), f"benchmarks/_work/pat/{prof.name}").replace(str(out), "OUT"),
            "stage": final["name"], "format": final["format"], "path": str(out / final["path"]),
            "perplexity": final["perplexity"], "teacher_perplexity": teacher["perplexity"],
            "ratio": final["perplexity"] / teacher["perplexity"], "kl": final.get("kl"),
            "top1_agreement": final.get("top1_agreement"), "eval_tokens": final.get("eval_tokens"),
            "weight_bytes": final["weight_bytes"], "parameters": final.get("parameters"),
            "pass_seconds": {s["name"]: s.get("pass_seconds") for s in st[1:]},
            "pat": {**{k: pm[k] for k in keep if k in pm},
                    "train": {k: v for k, v in (pm.get("train") or {}).items() if not isinstance(v, (list, dict))}}}


def latency(folders: dict[str, str]) -> dict[str, Any]:
    """Every named export profiled in this one call, one after another (compress profile)."""
    from compress import api

    rep = api.profile(list(folders.values()), runs=5, warmup=1, prompt_tokens=128, new_tokens=128, quiet=True)
    out = {}
    for n, r in zip(folders, rep["results"]):
        out[n] = {k: r.get(k) for k in ("decode_tokens_per_second", "prefill_tokens_per_second", "ttft_ms",
                                         "peak_rss_bytes", "disk_bytes", "threads")}
    return out


def balance() -> dict[str, Any]:
    """Per-channel gradient on theta of each loss term, on the real model and wikitext-2 valid."""
    import torch

    from compress.data import read_documents, token_stream, user_data_spec
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.ops import losses
    from compress.passes.pat.config import PATConfig
    from compress.passes.pat.run import attach
    from compress.sources import resolve_source_ref
    from compress.training.loop import LossInputs, LossWeights

    folder = model_folder(resolve_source_ref(None), quiet=True)
    tok = load_tokenizer(folder)
    stream = token_stream(read_documents(user_data_spec(DATA / "valid.txt", "train")), tok, 512 * 8)
    blocks = stream[:512 * 8].reshape(8, 512)
    teacher = load_model(folder).eval()
    student = load_model(folder)
    cfg = PATConfig.from_dict({"hidden": 448, "steps": 160})
    modules, _ = attach(student, cfg)
    theta = modules.mask.theta
    for p in student.parameters():  # only theta's gradient is probed
        p.requires_grad_(False)
    theta.requires_grad_(True)
    out: dict[str, Any] = {"hidden": 448, "d": 576, "steps": 160, "count_weight": cfg.count, "probes": [],
                           "note": "|d loss / d theta_j| over the 576 channels; ce and kl on 4 x 512 tokens of "
                                   "wikitext-2 valid through the soft mask at that step"}
    weights = LossWeights(ce=1.0, kl=1.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    for step in (0, 20, 60, 100):  # the schedule at these steps, with theta as it starts (0) or polarized
        modules.mask.step = step
        for start in ("zero", "spread"):
            with torch.no_grad():
                theta.zero_() if start == "zero" else theta.copy_(torch.linspace(-0.5, 0.5, 576)[torch.randperm(
                    576, generator=torch.Generator().manual_seed(0))])
            grads = {}
            for term in ("ce", "kl", "count", "polarization"):
                theta.grad = None
                ids = blocks[:4]
                inp = LossInputs(student, student, teacher, ids, step, weights, False, autocast)
                if term in ("ce", "kl"):
                    s_out = inp.student_outputs()
                    loss = (losses.cross_entropy(s_out.logits, ids, None) if term == "ce"
                            else losses.forward_kl(s_out.logits, inp.teacher_outputs().logits, None, 1.0))
                else:
                    count, polar = modules.mask.losses(448)
                    loss = cfg.count * count if term == "count" else cfg.polarization * polar
                loss.backward()
                g = theta.grad.detach().abs()
                grads[term] = {"median": float(g.median()), "p90": float(g.quantile(0.9)), "max": float(g.max())}
                student.zero_grad(set_to_none=True)
            out["probes"].append({"step": step, "theta": start, "grad_abs": grads})
            log(f"step {step}, theta {start}: " + ", ".join(f"{k} median {v['median']:.2e} p90 {v['p90']:.2e}"
                                                            for k, v in grads.items()))
    return out


def render(result: dict) -> str:
    lines = ["| row | hidden | params M | perplexity | × teacher | KL | held-out KL one-shot → tuned | weights MB | "
             "train s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        p = r.get("pat") or {}
        kl = (f"{p['kl_heldout_oneshot']:.3f} → {p['kl_heldout']:.3f}" if "kl_heldout_oneshot" in p
              else (f"{p['kl_heldout']:.3f}" if "kl_heldout" in p else "—"))
        lines.append(f"| `{name}` | {p.get('hidden_to', 576)} | {(r.get('parameters') or 0) / 1e6:.1f} | "
                     f"{r['perplexity']:.3f} | {r['ratio']:.3f} | {r['kl'] or 0:.4f} | {kl} | "
                     f"{r['weight_bytes'] / 1e6:.1f} | {(p.get('train') or {}).get('train_seconds', 0):.0f} |")
    for key in [k for k in result if k.startswith("latency")]:
        lines += ["", f"{key} ({result[key].get('date')}):", "",
                  "| row | decode tok/s | × unpruned | prefill tok/s | × unpruned | TTFT ms | peak RSS MB |",
                  "|---|---|---|---|---|---|---|"]
        lat = result[key]["rows"]
        for n, r in lat.items():
            base = lat.get(result[key]["baseline_for"].get(n, ""), r)
            d, pf = r["decode_tokens_per_second"]["median"], r["prefill_tokens_per_second"]["median"]
            lines.append(f"| `{n}` | {d:.1f} | {d / base['decode_tokens_per_second']['median']:.3f} | {pf:.1f} | "
                         f"{pf / base['prefill_tokens_per_second']['median']:.3f} | {r['ttft_ms']['median']:.1f} | "
                         f"{(r.get('peak_rss_bytes') or 0) / 1e6:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout that runs the rows (a fresh clone)")
    ap.add_argument("--rows", help="comma-separated row names")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "pat")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--render", action="store_true", help="print the result as markdown tables and stop")
    ap.add_argument("--latency", help="comma-separated finished rows (or 'all'): their exports profiled side by side")
    ap.add_argument("--latency-extra", action="append", default=[], metavar="NAME=PATH",
                    help="--latency: also profile this export (e.g. a `compress model --profile cpu-pat-4bit` run "
                         "as users run it), recorded under NAME")
    ap.add_argument("--latency-key", default="latency", help="--latency: the result key it is kept under "
                    "(latency, latency_4bit, ...: one per side-by-side set)")
    ap.add_argument("--balance", action="store_true", help="the count loss's gradient against CE + KL")
    ap.add_argument("--heldout", help="comma-separated finished rows, or NAME=PATH exports (kept under 'runs'): "
                                      "their exports on heldout.py's domains")
    args = ap.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "pat", "rows": {}}
    if args.render:
        print(render(result))
        return 0
    from importlib.metadata import version

    from compress.hardware import cpu_name, fast_bf16

    result.update(machine={"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "bf16_fast": fast_bf16()[0],
                           **{n: version(n) for n in ("torch", "transformers", "onnxruntime")}},
                  protocol=f"train on wikitext-2 valid (data.mix 0); first {TOKENS} wikitext-2 test tokens, {WINDOW}-token "
                           f"windows; trained rows {STEPS} steps x {BATCH} x 512 tokens")

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.balance:
        result["balance"] = {**balance(), "date": time.strftime("%Y-%m-%d")}
        save()
        return 0
    if args.heldout:
        from compress.models import model_folder
        from compress.sources import resolve_source_ref

        teacher = model_folder(resolve_source_ref(None), quiet=True)
        for item in args.heldout.split(","):
            name, _, path = item.partition("=")
            if path:  # an export made outside the rows (a profile run as users run it)
                entry = result.setdefault("runs", {}).setdefault(name, {})
                entry.update(path=str(Path(path).resolve()), date=time.strftime("%Y-%m-%d"))
            else:
                entry = result["rows"][name]
            per, seconds = evaluate_heldout(Path(entry["path"]), teacher)
            entry["heldout"] = {"domains": per, "summary": summarize(per), "eval_seconds": seconds}
            s = entry["heldout"]["summary"]
            log(f"{name}: " + ", ".join(f"{n} x{v:.3f}" for n, v in s["ratios"].items())
                + f"; geomean x{s['geomean_ratio']:.3f}")
            save()
        return 0
    if args.latency:
        names = ([n for n in result["rows"] if result["rows"][n]["format"] == "onnx"] if args.latency == "all"
                 else args.latency.split(","))
        folders = {n: result["rows"][n]["path"] for n in names}
        for item in args.latency_extra:
            name, _, path = item.partition("=")
            folders[name] = str(Path(path).resolve())
        base = {n: ("dense-4bit" if n.endswith("4bit") else "dense") for n in folders}
        result[args.latency_key] = {"rows": latency(folders), "folders": folders, "baseline_for": base,
                             "date": time.strftime("%Y-%m-%d"),
                             "note": "one process, the exports one after another (compress profile)"}
        save()
        print(render(result))
        return 0
    table = rows()
    names = args.rows.split(",") if args.rows else []
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        ap.error(f"--rows: known rows {', '.join(table)}" + (f"; unknown {unknown}" if unknown else ""))
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "cache"
    for name in names:
        row = run_row(name, table[name], args.repo, args.work, cache)
        row["date"] = time.strftime("%Y-%m-%d")
        result["rows"][name] = row
        save()
        log(f"{name}: ppl {row['perplexity']:.3f} (x{row['ratio']:.3f}), KL {row['kl']:.4f}, "
            f"{row['weight_bytes'] / 1e6:.1f} MB, {row['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
