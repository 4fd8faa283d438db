"""Diagnostic for issue 15: why does our straight-through recovery diverge where the naive recipe converges?

From one GPTQ-initialized quantize stage, a plain loop (the naive recipe's: constant rates,
weights 1e-5, scales and zero points 1e-4, forward KL, bf16 autocast where fast, no clipping, no
norms trained) trains ``--steps`` steps on the same batches twice, once with the straight-through
latent weight starting at the *dequantized codes* (what ``QuantLinear.start("ste")`` does) and
once at the teacher's *full-precision weights* (what the naive recipe does), and once at the codes
moved inside their rounding cell towards the fp weights (the same codes, off the grid). Prints the loss per
step of each; the training text is the stage's own teacher-written text (the row's cache).

    COMPRESS_CACHE_DIR=CACHE python benchmarks/ste_start_probe.py STAGE --steps 16
Result: benchmarks/results/ste_start_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from naive_qat import kl_step  # noqa: E402  (the probe must train exactly as the naive recipe does)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", type=Path, help="a quantize stage folder (GPTQ init, recovery rolled back)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--starts", default="codes,fp_weights,codes_subgrid",
                    help="latent starts to compare: codes (on the grid), fp_weights, codes_subgrid")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ste_start_probe.json")
    args = ap.parse_args()
    from compress.config import DataConfig
    from compress.data import pack_blocks, read_documents, self_data_spec, token_stream
    from compress.hardware import fast_bf16
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.quantized import load_quantized, quant_modules
    from compress.sources import resolve_source_ref, source_id

    torch.set_num_threads(2)
    folder = model_folder(resolve_source_ref(None), quiet=True)
    tok, teacher = load_tokenizer(folder), load_model(folder)
    for p in teacher.parameters():
        p.requires_grad_(False)
    spec = self_data_spec(source_id(resolve_source_ref(None)), DataConfig(), "train", 164)
    blocks = pack_blocks(token_stream(read_documents(spec), tok, None), 512)
    bf16, _ = fast_bf16()
    auto = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result = {"benchmark": "ste_start_probe", "date": time.strftime("%Y-%m-%d"), "stage": str(args.stage),
              "bf16": bf16, "runs": old.get("runs", {})}
    for start in args.starts.split(","):
        student = load_quantized(args.stage)
        for p in student.parameters():
            p.requires_grad_(False)
        mods = {n: m for n, m in quant_modules(student).items() if n != "lm_head"}
        for name, m in mods.items():
            # codes_subgrid: the same codes, the latent inside its cell towards the fp weight (the pass's start)
            m.start("ste", teacher.get_submodule(name).weight if start == "codes_subgrid" else None)
            if start == "fp_weights":
                with torch.no_grad():
                    m.latent.copy_(teacher.get_submodule(name).weight)
            m.scale.requires_grad_(True)
            m.zero.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": [m.latent for m in mods.values()], "lr": 1e-5},
                                 {"params": [p for m in mods.values() for p in (m.scale, m.zero)], "lr": 1e-4}],
                                weight_decay=0.0)
        losses = []
        for step in range(args.steps):
            ids = blocks[(torch.arange(4) + 4 * step) % blocks.shape[0]]
            loss = kl_step(student, teacher, ids, opt, [m.scale for m in mods.values()], auto)
            losses.append(round(float(loss), 4))
            print(start, step + 1, losses[-1], flush=True)
        result["runs"][start] = losses
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
