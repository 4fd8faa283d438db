"""An export used from text, the way each consumer's users run it: one fresh process per consumer.

PyTorch greedy on the teacher, or with ``--torch-model`` on the stage the export was made from
(transformers' tokenizer and ``generate``), onnxruntime-genai's own
tokenizer and loop, and optimum's ``ORTModelForCausalLM.generate`` continue the same text; each
consumer may run in its own Python (a venv with its own transformers), since optimum-onnx caps
transformers below 4.58 while transformers 5 is what a plain install gets. Every stderr line a
consumer prints is kept (a "legacy model" warning would show there).

    python benchmarks/from_text.py EXPORT_DIR [--text "The capital of France is"] [--new-tokens 16]
        [--torch-python PY] [--torch-model STAGE] [--genai-python PY] [--optimum-python PY] [--out benchmarks/results/from_text.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TORCH = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from compress.models import load_model, load_tokenizer, model_folder
from compress.sources import resolve_source_ref
text, n, stage = sys.argv[2], int(sys.argv[3]), sys.argv[4]
if stage:  # the stage the export was made from (a quantized one runs as its fake-quant model; a
    # narrowed width's config is read past transformers 5's check, by compress's loaders)
    model, tok, what = load_model(stage), load_tokenizer(stage), f"compress.models.load_model({stage})"
else:
    folder = model_folder(resolve_source_ref(None))
    model, what = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), "teacher"
    tok = AutoTokenizer.from_pretrained(folder)
enc = tok(text, return_tensors="pt")
out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
new = out[0, enc["input_ids"].shape[1]:].tolist()
print(json.dumps({"runtime": f"PyTorch {torch.__version__}, transformers {transformers.__version__} ({what})",
                  "prompt_ids": enc["input_ids"][0].tolist(), "tokens": new, "text": tok.decode(new)}))
"""

GENAI = """
import json, sys
import onnxruntime_genai as og
from exporters.onnx.genai import genai_greedy
ids, new, text = genai_greedy(sys.argv[1], sys.argv[2], int(sys.argv[3]))
print(json.dumps({"runtime": f"onnxruntime-genai {og.__version__}", "prompt_ids": ids, "tokens": new, "text": text}))
"""

OPTIMUM = """
import json, sys, transformers
from importlib.metadata import version
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, text, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
enc = tok(text, return_tensors="pt")
out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
new = out[0, enc["input_ids"].shape[1]:].tolist()
print(json.dumps({"runtime": f"optimum-onnx {version('optimum-onnx')}, transformers {transformers.__version__}",
                  "prompt_ids": enc["input_ids"][0].tolist(), "tokens": new, "text": tok.decode(new)}))
"""


def consumer(python: str, code: str, folder: Path, text: str, n: int, stage: str = "") -> dict:
    t = time.perf_counter()
    proc = subprocess.run([python, "-c", code, str(folder), text, str(n), stage], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    res = {"python": python, "seconds": round(time.perf_counter() - t, 1), "exit_code": proc.returncode,
           "stderr": proc.stderr.strip().splitlines()[-20:]}
    if proc.returncode == 0:
        res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--text", default="The capital of France is")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--torch-python", default=sys.executable)
    ap.add_argument("--torch-model", type=Path, default=None,
                    help="the PyTorch reference: the stage the export was made from (default: the embedded teacher)")
    ap.add_argument("--genai-python", default=sys.executable)
    ap.add_argument("--optimum-python", default=sys.executable)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "from_text.json")
    args = ap.parse_args()
    folder = args.export.resolve()
    rows = {
        "pytorch": consumer(args.torch_python, TORCH, folder, args.text, args.new_tokens,
                            str(args.torch_model.resolve()) if args.torch_model else ""),
        "onnxruntime-genai": consumer(args.genai_python, GENAI, folder, args.text, args.new_tokens),
        "optimum": consumer(args.optimum_python, OPTIMUM, folder, args.text, args.new_tokens),
    }
    ref = rows["pytorch"].get("tokens")
    for name, r in rows.items():
        r["same_tokens_as_pytorch"] = ref is not None and r.get("tokens") == ref
        r["same_prompt_ids_as_pytorch"] = r.get("prompt_ids") == rows["pytorch"].get("prompt_ids")
    result = {"benchmark": "from_text", "date": time.strftime("%Y-%m-%d"), "export": str(args.export),
              "command": "python benchmarks/from_text.py " + " ".join(sys.argv[1:]), "text": args.text,
              "new_tokens": args.new_tokens, "consumers": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for name, r in rows.items():
        print(f"{name:<18} {r.get('runtime', 'FAILED: ' + (r['stderr'][-1] if r['stderr'] else '?'))}: "
              f"{r.get('text')!r} same tokens as PyTorch: {r['same_tokens_as_pytorch']}, stderr lines: {len(r['stderr'])}")
    return 0 if all(r["same_tokens_as_pytorch"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
