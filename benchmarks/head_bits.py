"""How much the tied embedding/head alone costs at each format (issue 15: the best use of ~87 MB).

Only the tied embedding/head matrix is quantized (fake-quant, round to nearest; `mse` = per-group
range shrink with the least weight error), every decoder Linear stays fp32, so the figure is the
head's own share of the error. Validation text only (the choice it informs is a default): the
first 4,096 tokens of wikitext-2 *valid* and of Python standard-library source taken from the
*last* modules in name order (the `python-code` evaluation domain takes the first ones).

    python benchmarks/head_bits.py
Result: benchmarks/results/head_bits.json
"""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
VARIANTS = [  # name, bits, group, sym, mse; sizes: codes + fp16 scales (+ zero points) of 49152 x 576
    ("8-bit g32 asym (before)", 8, 32, False, False),
    ("8-bit g64 sym (cpu-4bit now)", 8, 64, True, False),
    ("4-bit g32 asym", 4, 32, False, False),
    ("4-bit g32 asym, MSE range", 4, 32, False, True),
    ("4-bit g16 asym, MSE range", 4, 16, False, True),
    ("4-bit g64 asym, MSE range", 4, 64, False, True),
]


def main() -> int:
    from compress.evaluation import evaluate_stream
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.ops import quant as Q
    from compress.sources import resolve_source_ref

    torch.set_num_threads(2)
    src = model_folder(resolve_source_ref(None), quiet=True)
    tok, teacher, student = load_tokenizer(src), load_model(src), load_model(src)
    mods = [p for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")) if not p.name.startswith("_")][::-1]
    texts = {"wikitext-2 valid": (DATA / "valid.txt").read_text()[:200_000],
             "python-code (last modules)": "\n\n".join(p.read_text() for p in mods[:12])[:200_000]}
    streams = {k: torch.tensor(tok(v, add_special_tokens=False)["input_ids"][:4096]) for k, v in texts.items()}
    w = teacher.get_output_embeddings().weight.detach().clone()
    v, d = w.shape
    rows = []
    for name, bits, group, sym, mse in VARIANTS:
        if mse:
            s, z = Q.mse_params(w, bits, group, sym, [1 - i * 0.04 for i in range(8)])
        else:
            s, z = Q.minmax_params(w, bits, group, sym)
        wq = Q.dequantize(Q.quantize(w, s, z, bits, group), s, z, group)
        with torch.no_grad():
            student.get_input_embeddings().weight.copy_(wq)
            student.get_output_embeddings().weight.copy_(wq)
        size = v * d * bits / 8 + v * d / group * 2 + (0 if sym else v * d / group * bits / 8)
        row = {"head": name, "size_mb": round(size / 1e6, 2), "domains": {}}
        for k, st in streams.items():
            r = evaluate_stream(student, st, window=512, max_tokens=4096, teacher=teacher)
            row["domains"][k] = {"ratio": r["perplexity"] / r["teacher_perplexity"], "kl": r["kl"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / "head_bits.json"
    out.write_text(json.dumps({"benchmark": "head_bits", "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
