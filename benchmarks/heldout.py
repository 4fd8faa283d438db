"""Accuracy on text nobody tuned on, at the sizes users compare (issue 15).

Every row is scored on the same held-out domains, the same 512-token windows, against the same
teacher: wikitext-2 *test* (first 16,384 tokens), the teacher's answers to the held-out prompts
(`answers`), Python standard-library source (`python-code`) and docstrings (`python-docs`).
None of them is used for calibration or training by any row (ours train on the teacher's own
text, or on wikitext-2 *valid*). Per domain: perplexity / the teacher's on the same windows; the
geometric mean and the worst of the four. Sizes are the weight files on disk.

Rows
- `ours`: `compress model --profile cpu-4bit --eval-data wikitext-2/test.txt` from a fresh cache
  (GGUF conversion and the teacher's own data included in the wall time), run in `--repo`
  (a fresh clone); the deployed ONNX export as evaluated by the pipeline itself.
- `ours-wikitext`: the same with `--data wikitext-2/valid.txt` (the teacher's text mixed in at the
  default data.mix).
- `ours` with `--set KEY=VALUE` (repeatable) and `--row NAME`: a variant of the default command,
  e.g. GPTQ only: `--row "ours cpu-4bit, GPTQ only" --set quantize.train.steps=0 --set quantize.block_ap=off`.
- `anchors`: the GenAI builder's int4 folder and llama.cpp (Q4_0 requantized from the shipped Q4_1
  GGUF, and the shipped Q4_1 itself; llama.cpp's own logits, so perplexity only), plus any
  `--extra NAME=ONNX_FOLDER` (e.g. earlier exports of ours), evaluated with `compress eval`'s code.

    python benchmarks/heldout.py --only ours --repo /work/fresh15
    python benchmarks/heldout.py --only anchors --builder benchmarks/_work/anchors/builder-int4 \
        --extra "ours before (quick-4bit, v1 data)=benchmarks/_work/default_run/run/stages/02-export_onnx"

Result: benchmarks/results/heldout.json (rows merge across invocations). Licenses of the domains:
wikitext-2 CC BY-SA 3.0; the Python standard library PSF License 2.0; the answers are the
teacher's (SmolLM2-135M-Instruct, Apache 2.0) output.
"""

from __future__ import annotations

import argparse
import json
import math
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
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
TOKENS = 16384
WINDOW = 512
DOMAINS = ("answers", "python-code", "python-docs")
RESULT = ROOT / "benchmarks" / "results" / "heldout.json"


def log(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix in (".onnx", ".data", ".gguf", ".safetensors"))


def summarize(per: dict[str, dict]) -> dict[str, Any]:
    ratios = {n: r["perplexity"] / r["teacher_perplexity"] for n, r in per.items()}
    worst = max(ratios, key=ratios.get)
    return {"ratios": ratios, "geomean_ratio": math.exp(sum(map(math.log, ratios.values())) / len(ratios)),
            "worst_ratio": ratios[worst], "worst_domain": worst}


def run_compress(name: str, cmd: list[str], repo: Path, cache: Path) -> tuple[dict, float]:
    """Run ``cmd`` (a ``compress ... --json`` command) from ``repo`` with its own cache; its report
    and wall seconds. A failure ends the benchmark with the command's last error lines."""
    env = {**os.environ, "COMPRESS_CACHE_DIR": str(cache), "PYTHONPATH": str(repo)}
    log(f"{name}: {' '.join(cmd[3:])}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout), wall


def pipeline_row(name: str, slug: str, repo: Path, work: Path, extra: list[str],
                 cache_from: Path | None = None, profile: str = "cpu-4bit") -> dict[str, Any]:
    out = work / slug
    shutil.rmtree(out, ignore_errors=True)
    cache = work / f"{slug}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    if cache_from is not None:  # an earlier row's cache: its converted model and teacher-written text are reused
        shutil.copytree(cache_from, cache)
    cmd = [sys.executable, "-m", "compress", "model", "--profile", profile, "--eval-data", str(DATA / "test.txt"),
           *extra, "--out", str(out), "--json", "--quiet"]
    before = set((cache / "selfdata").glob("*.jsonl"))
    rep, wall = run_compress(name, cmd, repo, cache)
    generated = sorted(p.name for p in set((cache / "selfdata").glob("*.jsonl")) - before)
    st = {s["name"].split("-", 1)[1]: s for s in rep["stages"]}
    e, q, src = st["export_onnx"], st["quantize"], st["source"]
    if e.get("download_bytes") is None:  # a checkout before the report's download column
        from compress.formats import download_bytes

        e["download_bytes"] = download_bytes(out / e["path"])
    per = {("wikitext-2-test" if n == "test" else n): {k: r.get(k) for k in ("perplexity", "teacher_perplexity", "kl", "top1_agreement", "tokens")}
           for n, r in e["domains"].items()}
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lat = (st["profile_latency"].get("latency") or [None])[0]
    return {"row": name, "kind": "ours", "commit": commit,
            "command": "compress " + " ".join(cmd[3:]).replace(str(DATA), "shared/data/wikitext-2").replace(str(out), "OUT"),
            "wall_seconds": round(wall, 1), "size_bytes": e["weight_bytes"], "teacher_bytes": src["weight_bytes"],
            "download_bytes": e["download_bytes"], "profile": profile,
            "pass_seconds": {k: s.get("pass_seconds") for k, s in st.items()},
            "domains": per, "summary": summarize(per),
            "fake_quant": {"ratio_geomean": q.get("ratio_geomean"), "ratio_worst": q.get("ratio_worst")},
            "training_data": rep.get("training_data"), "latency": lat,
            "evaluated_as": "ONNX Runtime (MatMulNBits, accuracy_level 4), the pipeline's own evaluation",
            "teacher_text_generated": generated,
            **({"cache_from": str(cache_from), "wall_note": "cache copied from an earlier row: no GGUF conversion; "
                + (f"the teacher wrote {len(generated)} text file(s) it needed ({', '.join(generated)}) in the wall time"
                   if generated else "no teacher text generation in the wall time")} if cache_from else {})}


def evaluate_heldout(folder: Path, teacher: Path) -> tuple[dict[str, dict], float]:
    """``compress eval``'s code on this benchmark's four domains: per-domain figures and seconds."""
    from compress import api

    t = time.perf_counter()
    r = api.evaluate(str(folder), data=[str(DATA / "test.txt")], domains=DOMAINS, max_tokens=TOKENS, window=WINDOW,
                     teacher=str(teacher), quiet=True)
    per = {("wikitext-2-test" if n == "test" else n): {k: v.get(k) for k in ("perplexity", "teacher_perplexity", "kl", "top1_agreement", "tokens")}
           for n, v in r["domains"].items()}
    return per, round(time.perf_counter() - t, 1)


def onnx_row(name: str, folder: Path, teacher: Path, kind: str) -> dict[str, Any]:
    log(f"{name}: compress eval {folder}")
    per, seconds = evaluate_heldout(folder, teacher)
    return {"row": name, "kind": kind, "size_bytes": folder_bytes(folder), "domains": per, "summary": summarize(per),
            "eval_seconds": seconds, "folder": str(folder),
            "evaluated_as": "ONNX Runtime through compress eval (the folder's own graph)"}


def domain_streams(teacher: Path) -> dict[str, Any]:
    """The token streams every row is scored on (the same ones compress eval builds)."""
    from compress.config import DataConfig
    from compress.data import read_documents, self_data_spec, token_stream, user_data_spec
    from compress.domains import builtin_text_spec
    from compress.models import load_tokenizer
    from compress.sources import resolve_source_ref, source_id

    tok = load_tokenizer(teacher)
    specs = {"wikitext-2-test": user_data_spec(DATA / "test.txt", "eval"),
             "answers": self_data_spec(source_id(resolve_source_ref(None)), DataConfig(), "eval")}
    specs.update({n: builtin_text_spec(n) for n in ("python-code", "python-docs")})
    return {n: token_stream(read_documents(s), tok, TOKENS) for n, s in specs.items()}


def llama_cpp_rows(work: Path, teacher: Path, teacher_ppl: dict[str, float]) -> list[dict[str, Any]]:
    import llama_cpp
    import numpy as np

    from compress.evaluation import windows_of
    from compress.sources import embedded_gguf_path

    q40 = work / "smollm2-q4_0.gguf"
    if not q40.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True  # the shipped Q4_1 is dequantized to f32 first: the same fp32 weights
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(embedded_gguf_path()).encode(), str(q40).encode(), params) != 0:
            raise SystemExit("llama_model_quantize failed")
    streams = domain_streams(teacher)
    rows = []
    for name, path in (("llama.cpp Q4_0", q40), ("llama.cpp Q4_1 (shipped GGUF)", embedded_gguf_path())):
        log(name)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=2, n_threads_batch=2,
                              logits_all=True, verbose=False)
        per = {}
        for dom, stream in streams.items():
            nll, n = 0.0, 0
            for win in windows_of(stream, WINDOW, TOKENS):
                ids = win.tolist()
                llm.reset()
                llm.eval(ids)
                logits = np.array(llm.scores[:len(ids) - 1], dtype=np.float64)
                logits -= logits.max(axis=1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
                nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
                n += len(ids) - 1
            per[dom] = {"perplexity": math.exp(nll / n), "teacher_perplexity": teacher_ppl[dom], "kl": None,
                        "tokens": int(stream[:TOKENS].numel())}
        rows.append({"row": name, "kind": "anchor", "size_bytes": Path(path).stat().st_size, "domains": per,
                     "summary": summarize(per),
                     "evaluated_as": f"llama.cpp {llama_cpp.__version__} (its own logits; KL not computed)"})
    return rows


def render(result: dict) -> str:
    doms = ["wikitext-2-test", "answers", "python-code", "python-docs"]
    lines = ["| row | size MB | " + " | ".join(f"{d} ×" for d in doms) + " | geomean × | worst × | KL (mean of domains) |",
             "|---|---|" + "---|" * (len(doms) + 3)]
    for r in sorted(result["rows"].values(), key=lambda r: r["size_bytes"]):
        rat = r["summary"]["ratios"]
        kls = [r["domains"][d].get("kl") for d in doms if r["domains"].get(d)]
        kl = f"{sum(kls) / len(kls):.3f}" if kls and all(k is not None for k in kls) else "—"
        lines.append(f"| {r['row']} | {r['size_bytes'] / 1e6:.1f} | " + " | ".join(f"{rat[d]:.3f}" for d in doms)
                     + f" | **{r['summary']['geomean_ratio']:.3f}** | {r['summary']['worst_ratio']:.3f} | {kl} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["ours", "ours-wikitext", "anchors", "render"], required=True)
    ap.add_argument("--repo", type=Path, default=ROOT, help="the checkout that runs the pipeline rows (a fresh clone)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "heldout")
    ap.add_argument("--builder", type=Path, default=ROOT / "benchmarks" / "_work" / "anchors" / "builder-int4")
    ap.add_argument("--extra", action="append", default=[], help="NAME=ONNX_FOLDER, evaluated like the builder's")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY=VALUE override of an ours row")
    ap.add_argument("--row", help="name of an ours row run with --set")
    ap.add_argument("--profile", default="cpu-4bit", help="the profile of an ours row (e.g. cpu-sparse50-4bit)")
    ap.add_argument("--cache-from", type=Path, help="start the row's cache as a copy of this one (an earlier row's "
                    "*-cache folder): the same teacher-written text, without generating it again")
    args = ap.parse_args()
    if args.sets and not args.row:
        ap.error("--set needs --row NAME (a variant is its own row)")
    args.work.mkdir(parents=True, exist_ok=True)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "heldout", "rows": {}}
    from importlib.metadata import version

    from compress.hardware import cpu_name

    result.update(machine={"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                           **{n: version(n) for n in ("torch", "transformers", "onnxruntime")}},
                  protocol=f"{TOKENS} tokens per domain, {WINDOW}-token windows, ratios to the teacher on the same windows")

    def save(row: dict) -> None:
        row["date"] = time.strftime("%Y-%m-%d")
        result["rows"][row["row"]] = row
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    sets = [a for kv in args.sets for a in ("--set", kv)]
    if args.only == "ours" and args.row:
        slug = "cpu-4bit-" + "".join(c if c.isalnum() else "-" for c in args.row.lower()).strip("-")[:60]
        save(pipeline_row(args.row, slug, args.repo, args.work, sets, args.cache_from, args.profile))
    elif args.only == "ours":
        save(pipeline_row("ours cpu-4bit (default: the teacher's own text)", "cpu-4bit", args.repo, args.work, []))
    elif args.only == "ours-wikitext":
        save(pipeline_row(args.row or "ours cpu-4bit --data wikitext-2 valid", "cpu-4bit-wikitext", args.repo,
                          args.work, ["--data", str(DATA / "valid.txt"), *sets], args.cache_from))
    elif args.only == "anchors":
        from compress.models import model_folder
        from compress.sources import resolve_source_ref

        teacher = model_folder(resolve_source_ref(None), quiet=True)
        b = onnx_row("GenAI builder int4 (RTN sym g32, int4 head)", args.builder, teacher, "anchor")
        save(b)
        for item in args.extra:
            name, _, folder = item.partition("=")
            save(onnx_row(name, Path(folder), teacher, "ours"))
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            log("llama-cpp-python is not installed: no llama.cpp rows")
        else:
            for row in llama_cpp_rows(args.work, teacher, {d: v["teacher_perplexity"] for d, v in b["domains"].items()}):
                save(row)
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
