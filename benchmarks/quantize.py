"""Low-bit quantization on the embedded model: accuracy, size and speed of every 4/3/2-bit
option side by side (issue 5).

Protocol: wikitext-2 — calibrate and train on ``valid``, perplexity / KL on the first 40,960
tokens of ``test`` in 512-token windows (the teacher is the fp32 model dequantized from the
shipped GGUF). Rows:

- teacher fp32 (PyTorch; its ONNX export is the speed reference)
- RTN 4-bit g32 asym, g128 asym, g128 sym; GPTQ 4-bit g128 — every decoder Linear, embeddings
  and head fp32 (the protocol of the independent RTN table in ../shared/ANCHORS.md), PyTorch
  fake-quant
- ours 4-bit g128: ``compress model --profile cpu-4bit`` (GPTQ init, Block-AP, KL recovery, 8-bit tied
  head), evaluated as deployed (ONNX Runtime, MatMulNBits accuracy_level 4) and as fake-quant
- ONNX Runtime GenAI builder int4 (its default: symmetric block 32, int4 embedding/head)
- llama.cpp Q4_0 made from the same weights (``llama_model_quantize`` of the shipped GGUF,
  which llama.cpp dequantizes first), when ``llama-cpp-python`` is installed
- ours 3-bit g64 (``--profile cpu-4bit`` with bits 3, group 64, Block-AP) vs RTN 3-bit g64
- ours 2-bit g64 (``--profile edge-2bit``) vs RTN 2-bit g64

Speed: every deployable row's ONNX / GGUF is timed in one process, interleaved rounds with a
rotating order, 1 warm-up round then the median (min–max) of ``--runs``: 128 prompt tokens,
128 greedy new tokens, ``--threads`` threads.

Stages are cached (``benchmarks/_work/quantize``); ``--only`` runs a subset of row groups and
merges into the same JSON, so the long rows can be produced in separate invocations:

    python benchmarks/quantize.py --only base      # teacher, RTN, GPTQ, builder, llama.cpp
    python benchmarks/quantize.py --only ours4     # compress --profile cpu-4bit
    python benchmarks/quantize.py --only low       # 3-bit and 2-bit rows
    python benchmarks/quantize.py --only speed     # timing of every deployable row present
    python benchmarks/quantize.py --only answers   # greedy continuation of "The capital of France is"
    python benchmarks/quantize.py --only long      # cpu-4bit with 5x the recovery steps (200)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
EVAL_TOKENS = 40960
WINDOW = 512


def log(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def evaluate(model: str | Path, teacher: Path) -> dict[str, Any]:
    from compress import api

    t = time.perf_counter()
    r = api.evaluate(str(model), data=str(DATA / "test.txt"), max_tokens=EVAL_TOKENS, window=WINDOW,
                     teacher=str(teacher), quiet=True)
    return {"perplexity": r["perplexity"], "kl": r.get("kl"), "top1_agreement": r.get("top1_agreement"),
            "eval_tokens": r.get("tokens"), "eval_seconds": time.perf_counter() - t}


def quantize_only(name: str, cfg: dict[str, Any], work: Path) -> tuple[Path, float]:
    """One quantize pass (no export) through the pipeline; returns the stage folder and its pass seconds."""
    from compress import api

    profile = {"description": name, "data": {}, "evaluation": {"max_tokens": 512, "window": 512},
               "passes": [{"name": "quantize", "config": cfg}]}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(profile))
    out = work / name
    p = api.plan(None, profile=str(path), data=str(DATA / "valid.txt"), eval_data=str(DATA / "test.txt"))
    rep = api.run(p, out, quiet=True)
    st = rep["stages"][-1]
    return out / "stages" / st["name"], float(st.get("pass_seconds") or 0.0)


def profile_run(profile: str, overrides: list[str], work: Path, name: str, eval_tokens: int = EVAL_TOKENS) -> dict[str, Any]:
    """``compress model --profile P --data valid --eval-data test`` with the benchmark's evaluation."""
    cmd = [sys.executable, "-m", "compress", "model", "--profile", profile, "--data", str(DATA / "valid.txt"),
           "--eval-data", str(DATA / "test.txt"), "--set", f"evaluation.max_tokens={eval_tokens}",
           "--set", f"evaluation.window={WINDOW}", "--out", str(work / name), "--json", "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    rep = json.loads(proc.stdout)
    rep["_wall_seconds"] = time.perf_counter() - t
    rep["_out"] = str(work / name)
    rep["_command"] = "compress " + " ".join(cmd[3:]).replace(str(DATA), "shared/data/wikitext-2").replace(
        str(work / name), "OUT")
    return rep


def stage(rep: dict, suffix: str) -> dict:
    return next(s for s in rep["stages"] if s["name"].endswith(suffix))


def ours_row(name: str, rep: dict) -> dict[str, Any]:
    q, e = stage(rep, "quantize"), stage(rep, "export_onnx")
    out = Path(rep["_out"])
    qm = json.loads((out / q["path"] / "manifest.json").read_text())["metrics"]["quantize"]
    return {
        "row": name, "kind": "ours", "command": rep["_command"],
        "perplexity": e["perplexity"], "kl": e["kl"], "top1_agreement": e.get("top1_agreement"),
        "evaluated_as": "ONNX Runtime (MatMulNBits, accuracy_level 4)",
        "fake_quant_perplexity": q["perplexity"], "fake_quant_kl": q["kl"],
        "size_bytes": e["weight_bytes"], "compress_seconds": (q.get("pass_seconds") or 0) + (e.get("pass_seconds") or 0),
        "onnx": str(out / e["path"]), "validation": (e.get("pass_metrics") or {}).get("export", {}).get("validation"), "wall_seconds": rep["_wall_seconds"],
        "recovery": {k: qm.get("recovery", {}).get(k) for k in ("kept", "kl_heldout_init", "kl_heldout_recovered")},
        "pipeline_latency": (stage(rep, "profile_latency").get("latency") or [None])[0],
    }


def save_rows(rows: dict) -> None:  # replaced in main(): write the JSON after each long row
    pass


def build_base(work: Path, teacher: Path, rows: dict) -> None:
    from compress.formats import weight_bytes

    if "teacher fp32" not in rows:
        log("teacher fp32")
        rows["teacher fp32"] = {"row": "teacher fp32", "kind": "reference", **evaluate(teacher, teacher),
                                "size_bytes": weight_bytes(teacher), "evaluated_as": "PyTorch fp32"}
    base = {"init": "rtn", "recovery": "none", "block_ap": "off", "embeddings": "keep", "heldout_blocks": 0,
            "calibration_blocks": 32}
    for name, cfg in (("RTN 4-bit g32 asym", {"bits": 4, "group_size": 32}),
                      ("RTN 4-bit g128 asym", {"bits": 4, "group_size": 128}),
                      ("RTN 4-bit g128 sym", {"bits": 4, "group_size": 128, "sym": True}),
                      ("GPTQ 4-bit g128 asym (MSE-clipped)", {"bits": 4, "group_size": 128, "init": "gptq"}),
                      ("RTN 3-bit g64 asym", {"bits": 3, "group_size": 64}),
                      ("RTN 2-bit g64 asym", {"bits": 2, "group_size": 64})):
        if name in rows:
            continue
        log(name)
        folder, secs = quantize_only(name.replace(" ", "-"), {**base, **cfg}, work)
        rows[name] = {"row": name, "kind": "baseline", **evaluate(folder, teacher), "compress_seconds": secs,
                      "size_bytes": weight_bytes(folder), "evaluated_as": "PyTorch fake-quant (embeddings/head fp32)"}
    if "builder int4" not in rows and importlib.util.find_spec("onnxruntime_genai") is not None:
        out = work / "builder-int4"
        t = time.perf_counter()
        if not (out / "genai_config.json").is_file():
            log("builder int4")
            proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(teacher), "-o",
                                   str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"builder failed: {proc.stderr.strip().splitlines()[-1:]}")
        secs = time.perf_counter() - t
        rows["builder int4"] = {"row": "builder int4", "kind": "anchor", **evaluate(out, teacher),
                                "size_bytes": weight_bytes(out), "compress_seconds": secs, "onnx": str(out),
                                "evaluated_as": "ONNX Runtime (builder default: MatMulNBits sym block 32, accuracy_level 4)"}
    if "llama.cpp Q4_0" not in rows and importlib.util.find_spec("llama_cpp") is not None:
        rows["llama.cpp Q4_0"] = llama_cpp_row(work, teacher)


def llama_cpp_row(work: Path, teacher: Path) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    from compress.models import load_tokenizer
    from compress.sources import embedded_gguf_path

    out = work / "smollm2-q4_0.gguf"
    t = time.perf_counter()
    if not out.is_file():
        log("llama.cpp Q4_0")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True  # the shipped Q4_1 is dequantized to f32 first: the same fp32 weights
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(embedded_gguf_path()).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc})")
    secs = time.perf_counter() - t
    # perplexity with llama.cpp itself, same tokens and windows (no BOS: as our evaluation)
    tok = load_tokenizer(teacher)
    text = (DATA / "test.txt").read_text()
    ids = tok(text, add_special_tokens=False)["input_ids"][:EVAL_TOKENS]
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=WINDOW, n_batch=WINDOW, n_threads=2, n_threads_batch=2,
                          logits_all=True, verbose=False)
    nll, n = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, len(ids) - WINDOW + 1, WINDOW):
        win = ids[i:i + WINDOW]
        llm.reset()
        llm.eval(win)
        logits = np.array(llm.scores[:WINDOW - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(WINDOW - 1), win[1:]].sum())
        n += WINDOW - 1
    return {"row": "llama.cpp Q4_0", "kind": "anchor", "perplexity": math.exp(nll / n), "kl": None,
            "eval_tokens": n, "eval_seconds": time.perf_counter() - t0, "size_bytes": out.stat().st_size,
            "compress_seconds": secs, "gguf": str(out),
            "evaluated_as": f"llama.cpp {llama_cpp.__version__} (its own logits; KL not computed)"}


def build_ours4(work: Path, rows: dict) -> None:
    if "ours 4-bit g128 (cpu-4bit)" not in rows:
        log("ours 4-bit: compress model --profile cpu-4bit")
        rows["ours 4-bit g128 (cpu-4bit)"] = ours_row("ours 4-bit g128 (cpu-4bit)", profile_run("cpu-4bit", [], work, "cpu-4bit"))
        save_rows(rows)


LONG_STEPS = 200


def build_long(work: Path, rows: dict) -> None:
    """What a longer recovery buys: ``cpu-4bit`` with 5x its recovery steps, nothing else changed."""
    name = f"ours 4-bit g128, {LONG_STEPS} recovery steps"
    if name not in rows:
        log(name)
        rows[name] = ours_row(name, profile_run("cpu-4bit", [f"quantize.steps={LONG_STEPS}", "profile_latency.runs=2"],
                                                work, f"cpu-4bit-steps{LONG_STEPS}"))
        save_rows(rows)


def build_low(work: Path, teacher: Path, rows: dict) -> None:
    """3- and 2-bit rows: the pipeline evaluates its stages on the first 4,096 test tokens (to save
    time), then the deployed ONNX model is evaluated on the full protocol."""
    for name, profile, overrides in (
        ("ours 2-bit g64 (edge-2bit)", "edge-2bit", ["profile_latency.runs=2"]),
        ("ours 3-bit g64", "cpu-4bit", ["quantize.bits=3", "quantize.group_size=64", "quantize.block_ap=on",
                                        "profile_latency.runs=2"]),
    ):
        if name in rows:
            continue
        log(name)
        rep = profile_run(profile, overrides, work, name.split(" (")[0].replace(" ", "-"), eval_tokens=4096)
        row = ours_row(name, rep)
        row.update(evaluate(row["onnx"], teacher))
        row["pipeline_eval_tokens"] = 4096
        rows[name] = row
        save_rows(rows)


def build_speed(work: Path, rows: dict, args) -> dict[str, Any]:
    """Decode / prefill of every deployable row, interleaved in one process."""
    import anchors  # the shared runners (plain ORT, llama.cpp)
    from compress import api
    from compress.profiling.harness import prompt_ids

    fp32 = work / "ours-fp32"
    api.export(None, fp32, quiet=True)
    systems = [{"name": "teacher fp32 (our ONNX export)", "runner": "ort", "path": str(fp32)}]
    for r in rows.values():
        if r.get("onnx"):
            systems.append({"name": r["row"], "runner": "ort", "path": r["onnx"]})
        elif r.get("gguf"):
            systems.append({"name": r["row"], "runner": "llama.cpp", "path": r["gguf"]})
    two = rows.get("ours 2-bit g64 (edge-2bit)")
    runners = {}
    for s in systems:
        runners[s["name"]] = anchors.make_runner(s, args.threads)
    if two and two.get("onnx"):  # the 2-bit LUT GEMM kernel is opt-in: time it both ways
        from compress.profiling.worker import OnnxRunner

        name = two["row"] + " + mlas.use_lut_gemm=1"
        systems.append({"name": name, "runner": "ort-lut", "path": two["onnx"]})
        runners[name] = OnnxRunner(Path(two["onnx"]), threads=args.threads, session_options={"mlas.use_lut_gemm": "1"})
    prompt = prompt_ids(fp32, args.prompt_tokens)
    raw: dict[str, list] = {s["name"]: [] for s in systems}
    for r in range(1 + args.runs):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            res = runners[s["name"]].run(prompt, args.new_tokens)
            if r:
                raw[s["name"]].append(res)
        log(f"speed round {r}/{args.runs}" + (" (warm-up)" if r == 0 else ""))
    out = {}
    for s in systems:
        runs = raw[s["name"]]
        out[s["name"]] = {
            "decode_tokens_per_second": anchors.spread([len(x["decode"]) / sum(x["decode"]) for x in runs]),
            "prefill_tokens_per_second": anchors.spread([args.prompt_tokens / x["prefill"] for x in runs]),
            "harness": s["runner"],
        }
    ref = out[systems[0]["name"]]
    for v in out.values():
        v["decode_ratio_to_fp32"] = v["decode_tokens_per_second"]["median"] / ref["decode_tokens_per_second"]["median"]
        v["prefill_ratio_to_fp32"] = v["prefill_tokens_per_second"]["median"] / ref["prefill_tokens_per_second"]["median"]
    return {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "runs": args.runs, "warmup_rounds": 1, "systems": out}


PROMPT = "The capital of France is"


def build_answers(teacher: Path, rows: dict, threads: int) -> dict[str, Any]:
    """Greedy continuation (8 tokens, EOS ignored) of PROMPT by the teacher and every deployable row,
    each in its own runtime (the anchors' runners): onnxruntime-genai for ONNX folders, llama.cpp for
    the GGUF."""
    import anchors
    import torch

    from compress.models import load_model, load_tokenizer

    tok = load_tokenizer(teacher)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    n = 8
    with torch.no_grad():
        out = load_model(teacher).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    answers = {"teacher fp32": out[0, len(ids):].tolist()}
    for r in rows.values():
        if r.get("onnx"):
            answers[r["row"]] = anchors.GenaiRunner(Path(r["onnx"]), threads).run(ids, n)["tokens"]
        elif r.get("gguf"):
            answers[r["row"]] = anchors.LlamaCppRunner(Path(r["gguf"]), threads).run(ids, n)["tokens"]
    return {"prompt": PROMPT, "new_tokens": n,
            "continuations": {k: {"text": tok.decode(v), "tokens": v} for k, v in answers.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="base,ours4,low,speed,answers",
                    help="comma list of: base, ours4, low, speed, answers, long")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "quantize")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize.json")
    args = ap.parse_args()
    groups = set(args.only.split(","))

    from compress.models import model_folder
    from compress.sources import resolve_source_ref

    args.work.mkdir(parents=True, exist_ok=True)
    teacher = model_folder(resolve_source_ref(None))
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": {}}
    rows = result["rows"]
    global save_rows

    def save() -> None:
        import onnxruntime

        from compress.hardware import cpu_name

        result.update({
            "benchmark": "quantize", "date": time.strftime("%Y-%m-%d"),
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "onnxruntime": onnxruntime.__version__},
            "protocol": {"train": "wikitext-2 valid", "eval": f"wikitext-2 test, first {EVAL_TOKENS} tokens, "
                         f"{WINDOW}-token windows"},
        })
        t = rows.get("teacher fp32", {}).get("perplexity")
        for r in rows.values():
            if t and r.get("perplexity"):
                r["ratio_to_teacher"] = r["perplexity"] / t
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    save_rows = lambda _rows: save()  # noqa: E731 (rows are saved as they finish)
    commands = result.setdefault("commands", {})
    for g in ("base", "ours4", "low", "speed", "answers", "long"):
        if g not in groups:
            continue
        commands[g] = "python benchmarks/quantize.py --only " + g
        t = time.perf_counter()
        if g == "base":
            build_base(args.work, teacher, rows)
        elif g == "ours4":
            build_ours4(args.work, rows)
        elif g == "low":
            build_low(args.work, teacher, rows)
        elif g == "long":
            build_long(args.work, rows)
        elif g == "answers":
            result["answers"] = build_answers(teacher, rows, args.threads)
        else:
            result["speed"] = build_speed(args.work, rows, args)
            result["speed"]["command"] = "python benchmarks/quantize.py --only speed " + " ".join(
                a for a in sys.argv[1:] if a.startswith("--runs") or a.startswith("--threads"))
        result.setdefault("group_seconds", {})[g] = time.perf_counter() - t
        save()
    print(render(result))
    return 0


def render(result: dict) -> str:
    speed = (result.get("speed") or {}).get("systems", {})
    lines = ["| row | perplexity | × teacher | KL | size MB | decode tok/s | prefill tok/s | compress s | evaluated as |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"].values():
        sp = speed.get(r["row"]) or (speed.get("teacher fp32 (our ONNX export)") if r["row"] == "teacher fp32" else None)
        dec = f"{sp['decode_tokens_per_second']['median']:.1f}" if sp else "—"
        pre = f"{sp['prefill_tokens_per_second']['median']:.0f}" if sp else "—"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "—"
        cs = f"{r['compress_seconds']:.0f}" if r.get("compress_seconds") else "—"
        lines.append(f"| {r['row']} | {r['perplexity']:.3f} | {r.get('ratio_to_teacher', 0):.3f} | {kl} | "
                     f"{r['size_bytes'] / 1e6:.1f} | {dec} | {pre} | {cs} | {r['evaluated_as']} |")
    ans = (result.get("answers") or {}).get("continuations")
    if ans:
        lines += ["", f"Greedy continuation of {result['answers']['prompt']!r}:", ""]
        lines += [f"- {k}: {v['text']!r}" for k, v in ans.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
