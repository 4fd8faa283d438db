"""Block-AP learning-rate sweep on validation data only (how the Block-AP defaults were chosen).

For each chosen decoder layer of the embedded model: its full-precision inputs on 40 sequences
of 512 tokens of wikitext-2 *valid* (32 train the layer, 8 are held out), its 7 Linears
min-max (RTN) quantized at BITS with group 64, then Block-AP with each setting; reports the
layer-output MSE against the full-precision layer on both sets, before and after. A setting
that does not lower the training-set error is rolled back (``kept: initialization``), as in
the pass. Nothing here touches the test split.

    python benchmarks/quantize_block_ap_sweep.py --bits 3 --layers 2,12 \\
        '{"old": {"block_ap_lr": 1e-4, "block_ap_weight_lr": 1e-5}, "new": {}}'
    python benchmarks/quantize_block_ap_sweep.py --bits 4 --layers 2,12,25 \\
        '{"fp32": {}, "bf16": {"bf16": true}}'   # bf16 autocast (measure per CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quantize_block_ap_sweep.json"


def main() -> int:
    import torch

    from quantize_recovery_sweep import teacher_and_valid_ids

    from compress.arch import LLAMA
    from compress.calibration import capture_layer_inputs, run_layer
    from compress.passes.quantize import run as R
    from compress.passes.quantize.config import QuantizeConfig
    from compress.quantized import LinearQuant, replace_module

    ap = argparse.ArgumentParser()
    ap.add_argument("settings", help="JSON object: name -> quantize config overrides")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--layers", default="2,12")
    args = ap.parse_args()
    settings = json.loads(args.settings)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    _, model, ids = teacher_and_valid_ids(400_000)
    blocks = torch.tensor(ids[:40 * 512]).view(40, 512)
    kwargs = capture_layer_inputs(model, blocks, 4)
    with torch.no_grad():
        hidden = [model(input_ids=blocks[i:i + 4], output_hidden_states=True, use_cache=False).hidden_states
                  for i in range(0, 40, 4)]
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    for li in (int(x) for x in args.layers.split(",")):
        x = [(h[li], kw) for h, (_, kw) in zip(hidden, kwargs)]
        y = run_layer(model.model.layers[li], x)
        x_train, y_train, x_held, y_held = x[:8], y[:8], x[8:], y[8:]  # 8 batches of 4 = 32 sequences
        for name, over in settings.items():
            over = dict(over)
            bf16 = bool(over.pop("bf16", False))  # Block-AP matmuls under bf16 autocast
            cfg = QuantizeConfig.from_dict({"bits": args.bits, "group_size": args.group, "init": "rtn",
                                            "block_ap": "on", **over})
            layer = copy.deepcopy(model.model.layers[li])
            for rel in LLAMA.linears:
                q = LinearQuant(args.bits, args.group, False)
                replace_module(layer, rel, R.init_linear(layer.get_submodule(rel), q, cfg, None, None))
            held_before = R._layer_mse(layer, x_held, y_held)
            t = time.perf_counter()
            with torch.enable_grad():
                rec = R.block_ap(layer, x_train, y_train, cfg, 7, bf16=bf16)
            run = {"bits": args.bits, "group": args.group, "layer": li, "name": name, "settings": over, "bf16": bf16,
                   "steps": cfg.block_ap_steps, "lr_scales": cfg.block_ap_lr, "lr_weights": cfg.block_ap_weight_lr,
                   "train_mse_before": rec["mse_calib_before"], "train_mse_after": rec["mse_calib_after"],
                   "held_mse_before": held_before, "held_mse_after": R._layer_mse(layer, x_held, y_held),
                   "kept": rec["kept"], "seconds": time.perf_counter() - t}
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
