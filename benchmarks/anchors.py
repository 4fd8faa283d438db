"""Our ONNX export side by side with the tools a user would pick instead, in one run.

Systems, all from the same weights (embedded SmolLM2-135M-Instruct, fp32 dequantized from
the shipped Q4_1 GGUF) on the same prompt (128 tokens of a fixed English text, the
tokenizer's ids fed to every system), 128 greedy new tokens, the same thread count:

- ours fp32: `compress export` (validated against PyTorch first)
- builder fp32 / builder int4: `python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`
  (needs the `bench` extra: onnxruntime-genai, onnx-ir, onnxscript; skipped with a note if absent)
- llama.cpp: `llama-cpp-python` on the shipped Q4_1 GGUF (optional; skipped with a note if absent)
- PyTorch eager fp32 (the Hugging Face model with its KV cache)

ONNX models are timed twice: with compress's runner (plain ONNX Runtime, the harness of
`compress profile`) and with onnxruntime-genai (`append_tokens` + `generate_next_token`, the
harness the anchors were first measured with). Runs are interleaved: each round runs every
system once (the order rotates from round to round); one warm-up round, then the median (min-max) of --runs rounds. Peak resident
memory and load time are measured afterwards, one fresh process per system.

    python benchmarks/anchors.py [--threads 2] [--runs 5] [--out benchmarks/results/anchors.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------- the anchors


class GenaiRunner:
    """onnxruntime-genai's own generation loop (greedy, EOS ignored via min_length)."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime_genai as og

        cfg = json.loads((Path(path) / "genai_config.json").read_text())
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        if opts.get("intra_op_num_threads") != threads:  # same thread count as every other system
            # a view of the folder (symlinks) with its own genai_config.json: the export itself is not touched
            import tempfile

            opts["intra_op_num_threads"] = threads
            view = Path(tempfile.mkdtemp(prefix="anchors-genai-"))
            for f in Path(path).iterdir():
                if f.name != "genai_config.json":
                    (view / f.name).symlink_to(f.resolve())
            (view / "genai_config.json").write_text(json.dumps(cfg, indent=4))
            path = view
        self.og = og
        self.model = og.Model(str(path))
        self.runtime = f"onnxruntime-genai {og.__version__}"

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        tokens = [gen.get_next_tokens()]
        prefill = time.perf_counter() - t
        decode = []
        for _ in range(new_tokens - 1):
            t = time.perf_counter()
            gen.generate_next_token()
            tokens.append(gen.get_next_tokens())
            decode.append(time.perf_counter() - t)
        return {"prefill": prefill, "decode": decode, "tokens": [int(x[0]) for x in tokens]}


class LlamaCppRunner:
    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama, __version__

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                         verbose=False)
        self.runtime = f"llama-cpp-python {__version__}"

    def run(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        self.llm.reset()
        decode, tokens = [], []
        t = time.perf_counter()
        prefill = None
        for i, tok in enumerate(self.llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            now = time.perf_counter()
            if i == 0:
                prefill = now - t
            else:
                decode.append(now - t)
            tokens.append(int(tok))
            if i + 1 == new_tokens:
                break
            t = time.perf_counter()
        return {"prefill": prefill, "decode": decode, "tokens": tokens}


#: the text every system tokenizes with its own tokenizer (spaces, newlines, digits, non-ASCII)
TOKENIZER_TEXT = ("The history of the city began in 1843.\n\nCafé déjà vu — 3.14159, naïve 北京 🙂!  Two  spaces\t"
                  "and a tab.\n  indented line\n\n\nx = a+b  # it's 10% off, isn't it?")
QUESTION = "The capital of France is"


def own_tokenizer_check(system: dict[str, Any], reference: dict[str, list[int]], new_tokens: int,
                        threads: int) -> dict[str, Any]:
    """Each system from *text*, with its own tokenizer and loop: ids of TOKENIZER_TEXT and of the prompt
    against the reference ids (the ones every system is timed on), and a greedy continuation of QUESTION."""
    kind, path = system["runner"], Path(system["path"])
    if kind == "genai":
        runner = GenaiRunner(path, threads)
        tok = runner.og.Tokenizer(runner.model)
        encode, decode = (lambda t: [int(i) for i in tok.encode(t)]), tok.decode
        generate = lambda ids, n: runner.run(ids, n)["tokens"]  # noqa: E731
    elif kind == "llama.cpp":
        runner = LlamaCppRunner(path, threads)
        encode = lambda t: runner.llm.tokenize(t.encode(), add_bos=False, special=True)  # noqa: E731
        decode = lambda ids: runner.llm.detokenize(ids).decode("utf-8", errors="replace")  # noqa: E731
        generate = lambda ids, n: runner.run(ids, n)["tokens"]  # noqa: E731
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        encode = lambda t: tok(t, add_special_tokens=True)["input_ids"]  # noqa: E731 (what a user's call gives)
        decode = tok.decode
        if kind == "ort":
            from exporters.onnx.runtime import Decoder, RuntimeOptions

            dec = Decoder(path, RuntimeOptions(threads=threads))
            generate = lambda ids, n: dec.generate(ids, n)  # noqa: E731
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

            def generate(ids, n):
                x = torch.tensor([ids])
                with torch.no_grad():
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
                return out[0, x.shape[1]:].tolist()
    out: dict[str, Any] = {}
    for name, text in (("mixed_text", TOKENIZER_TEXT), ("prompt", reference["prompt_text"])):
        ids = encode(text)
        ref = reference[name]
        diff = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), None if len(ids) == len(ref) else
                    min(len(ids), len(ref)))
        out[name] = {"tokens": len(ids), "reference_tokens": len(ref), "equal": ids == ref, "first_difference": diff,
                     "round_trip": decode(ids) == text}
    ids = encode(QUESTION)
    cont = generate(ids, new_tokens)
    out["question"] = {"text": QUESTION, "ids": ids, "continuation": decode(cont), "tokens": cont}
    return out


def make_runner(system: dict[str, Any], threads: int):
    from compress.profiling.worker import OnnxRunner, TorchRunner

    kind, path = system["runner"], Path(system["path"])
    if kind == "ort":
        return OnnxRunner(path, threads=threads)
    if kind == "genai":
        return GenaiRunner(path, threads)
    if kind == "llama.cpp":
        return LlamaCppRunner(path, threads)
    return TorchRunner(path, threads=threads)


# ------------------------------------------------------------------------------ building


def build_systems(work: Path, log, builder_python: str = sys.executable,
                  extra: list[tuple[str, Path]] = ()) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    from compress import api
    from compress.models import model_folder
    from compress.sources import embedded_gguf_path, resolve_source_ref

    notes: list[str] = []
    meta: dict[str, Any] = {}
    hf = model_folder(resolve_source_ref(None))
    gguf = embedded_gguf_path()
    ours = work / "ours-fp32"
    t = time.perf_counter()
    res = api.export(None, ours, quiet=True)
    meta["ours_export"] = {"seconds": time.perf_counter() - t, "cached": res["cached"],
                           "validation": res["validation"]}
    systems = [{"name": "ours fp32", "runner": "ort", "path": str(ours), "size_of": str(ours)}]
    for name, path in extra:  # other exports of ours (e.g. a quick-4bit run's export stage)
        systems.append({"name": name, "runner": "ort", "path": str(path), "size_of": str(path)})
    builder_ok = importlib.util.find_spec("onnxruntime_genai") is not None
    if builder_ok:
        for prec in ("fp32", "int4"):
            out = work / f"builder-{prec}"
            if not (out / "genai_config.json").is_file():
                log(f"running the ONNX Runtime GenAI builder ({prec})")
                t = time.perf_counter()
                proc = subprocess.run(
                    [builder_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                     "-p", prec, "-e", "cpu", "-c", str(work / "builder-cache")],
                    capture_output=True, text=True)
                if proc.returncode != 0:
                    notes.append(f"builder {prec} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                meta[f"builder_{prec}_seconds"] = time.perf_counter() - t
                meta[f"builder_{prec}_by"] = subprocess.run(
                    [builder_python, "-c", "import onnxruntime_genai as og, transformers as t; "
                     "print(f'onnxruntime-genai {og.__version__} builder, transformers {t.__version__}')"],
                    capture_output=True, text=True).stdout.strip()
            else:
                meta[f"builder_{prec}_by"] = f"reused from {out} (built by an earlier run)"
            systems.append({"name": f"builder {prec}", "runner": "ort", "path": str(out), "size_of": str(out)})
    else:
        notes.append("onnxruntime-genai not installed (pip install -e '.[bench]'): builder rows and the genai "
                     "harness skipped")
    if builder_ok:
        for s in list(systems):
            systems.append({**s, "name": f"{s['name']} [genai]", "runner": "genai"})
    if importlib.util.find_spec("llama_cpp") is not None:
        systems.append({"name": "llama.cpp Q4_1 (shipped GGUF)", "runner": "llama.cpp", "path": str(gguf),
                        "size_of": str(gguf)})
    else:
        notes.append("llama-cpp-python not installed: llama.cpp row skipped (see BENCHMARKS.md for the build flags)")
    systems.append({"name": "PyTorch eager fp32", "runner": "torch", "path": str(hf), "size_of": str(hf)})
    return systems, notes, meta


def size_bytes(path: Path) -> int:
    from compress.formats import weight_bytes

    path = Path(path)
    return path.stat().st_size if path.is_file() else weight_bytes(path)


# ------------------------------------------------------------------------------- measuring


def rss_and_load(system: dict[str, Any], prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """Load time and peak RSS of one system in a fresh process (one run after loading)."""
    code = (
        "import json, sys, time; sys.path.insert(0, %r); sys.argv = ['x'];"
        "import benchmarks.anchors as a; from compress.profiling.worker import peak_rss_bytes;"
        "s = json.loads(%r); t = time.perf_counter(); r = a.make_runner(s, %d); load = time.perf_counter() - t;"
        "r.run(%r, %d); print(json.dumps({'load_seconds': load, 'peak_rss_bytes': peak_rss_bytes()}))"
    ) % (str(ROOT), json.dumps(system), threads, prompt, new_tokens)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "anchors")
    ap.add_argument("--builder-python", default=sys.executable,
                    help="python that runs the GenAI model builder (its transformers must suit the builder's "
                         "release: 0.16+ builders need transformers 5)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=EXPORT_DIR",
                    help="another export of ours to run in both harnesses (e.g. a quick-4bit export stage)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anchors.json")
    args = ap.parse_args()

    from compress.profiling.harness import prompt_ids

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    extra = [(e.split("=", 1)[0], Path(e.split("=", 1)[1])) for e in args.extra]
    systems, notes, meta = build_systems(args.work, log, args.builder_python, extra)
    prompt = prompt_ids(Path(systems[0]["path"]), args.prompt_tokens)
    runners = {}
    for s in systems:
        log(f"loading {s['name']}")
        runners[s["name"]] = make_runner(s, args.threads)
    raw: dict[str, list] = {s["name"]: [] for s in systems}
    for r in range(1 + args.runs):
        k = r % len(systems)  # rotate: no system always runs first in a round
        for s in systems[k:] + systems[:k]:
            res = runners[s["name"]].run(prompt, args.new_tokens)
            if r:
                raw[s["name"]].append(res)
        log(f"round {r}/{args.runs} done" + (" (warm-up)" if r == 0 else ""))
    del runners
    # each system from text, through its own tokenizer (the timing above fed every system the same ids)
    from transformers import AutoTokenizer

    from compress.profiling.harness import PROMPT_TEXT

    # the timed prompt is made of PROMPT_TEXT's ids: each system's own tokenizer is checked on that text
    ref_tok = AutoTokenizer.from_pretrained(systems[0]["path"])
    reference = {"mixed_text": ref_tok(TOKENIZER_TEXT, add_special_tokens=False)["input_ids"],
                 "prompt": ref_tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"], "prompt_text": PROMPT_TEXT}
    n = min(len(prompt), len(reference["prompt"]))  # the timed prompt repeats the text up to 128 tokens
    assert reference["prompt"][:n] == list(prompt)[:n]
    own: dict[str, Any] = {}
    for s in systems:
        log(f"own tokenizer: {s['name']}")
        try:
            own[s["name"]] = own_tokenizer_check(s, reference, 16, args.threads)
        except Exception as exc:  # a system that cannot run from text is a finding, not a crash
            own[s["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    rows = []
    for s in systems:
        runs = raw[s["name"]]
        row = {
            "system": s["name"], "harness": {"ort": "compress (plain onnxruntime)", "genai": "onnxruntime-genai",
                                             "llama.cpp": "llama-cpp-python", "torch": "PyTorch eager"}[s["runner"]],
            "size_bytes": size_bytes(Path(s["size_of"])),
            "ttft_ms": spread([x["prefill"] * 1000 for x in runs]),
            "prefill_tokens_per_second": spread([args.prompt_tokens / x["prefill"] for x in runs]),
            "decode_tokens_per_second": spread([len(x["decode"]) / sum(x["decode"]) for x in runs]),
        }
        log(f"memory and load time: {s['name']}")
        row.update(rss_and_load(s, prompt, args.new_tokens, args.threads))
        rows.append(row)
    base = {"ort": rows[0]}
    genai_ours = next((r for r in rows if r["system"] == "ours fp32 [genai]"), None)
    for r in rows:
        ref = genai_ours if (r["harness"] == "onnxruntime-genai" and genai_ours) else base["ort"]
        r["decode_ratio_to_ours"] = r["decode_tokens_per_second"]["median"] / ref["decode_tokens_per_second"]["median"]
        r["prefill_ratio_to_ours"] = r["prefill_tokens_per_second"]["median"] / ref["prefill_tokens_per_second"]["median"]
        r["ratio_reference"] = ref["system"]
    import onnxruntime

    from compress.hardware import cpu_name

    result = {
        "benchmark": "anchors",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    **{name: _version(name) for name in ("onnxruntime-genai", "transformers", "llama-cpp-python")}},
        "command": "python benchmarks/anchors.py " + " ".join(sys.argv[1:]),
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "runs": args.runs, "warmup_rounds": 1, "notes": notes, "build": meta, "rows": rows,
        "same_ids_for_timing": {"prompt_tokens": len(prompt), "tokenizer": f"{systems[0]['name']} (transformers)"},
        "own_tokenizer": own,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'system':<34} {'decode tok/s':>22} {'×ours':>6} {'prefill tok/s':>22} {'×ours':>6} {'TTFT ms':>8} "
          f"{'RSS MB':>7} {'size MB':>8}")
    for r in rows:
        d, p = r["decode_tokens_per_second"], r["prefill_tokens_per_second"]
        print(f"{r['system']:<34} {d['median']:>8.2f} ({d['min']:.1f}–{d['max']:.1f}) {r['decode_ratio_to_ours']:>6.2f} "
              f"{p['median']:>8.1f} ({p['min']:.0f}–{p['max']:.0f}) {r['prefill_ratio_to_ours']:>6.2f} "
              f"{r['ttft_ms']['median']:>8.1f} {r.get('peak_rss_bytes', 0) / 1e6:>7.0f} {r['size_bytes'] / 1e6:>8.1f}")
    print("\nfrom text, each system's own tokenizer (ids vs the timed ids; greedy continuation of "
          f"{QUESTION!r}):")
    for name, o in own.items():
        if "error" in o:
            print(f"{name:<34} ERROR {o['error']}")
            continue
        print(f"{name:<34} mixed text ids equal: {o['mixed_text']['equal']!s:<5} prompt ids equal: "
              f"{o['prompt']['equal']!s:<5} ({o['prompt']['tokens']} tokens) -> {o['question']['continuation']!r}")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
