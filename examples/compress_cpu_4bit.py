"""`compress model --profile cpu-4bit` from the Python API: plan, run, read the report.

    python examples/compress_cpu_4bit.py                      # the embedded SmolLM2-135M, profile cpu-4bit
    python examples/compress_cpu_4bit.py MODEL --out runs/4bit --profile cpu-4bit --data my_text.txt

Every finished stage is reused on a rerun (same ids); the deployable model is the last stage, an
ONNX folder that onnxruntime-genai, optimum and plain ONNX Runtime load.
"""

import argparse

from compress import api

ap = argparse.ArgumentParser()
ap.add_argument("model", nargs="?", default=None, help="HF folder, .gguf or artifact (default: embedded)")
ap.add_argument("--profile", default="cpu-4bit")
ap.add_argument("--out", default="compress-out")
ap.add_argument("--data", default=None, help="training / calibration text (default: the teacher writes its own)")
ap.add_argument("--eval-data", action="append", default=[], help="held-out evaluation text (repeatable)")
args = ap.parse_args()

plan = api.plan(args.model, args.profile, data=args.data, eval_data=args.eval_data)  # bad input fails here, fast
report = api.run(plan, args.out)
teacher = report["stages"][0]
for s in report["stages"]:
    ratio = s["perplexity"] / teacher["perplexity"]
    print(f"{s['name']:<18} {s['parameters']:>12,} params  {s['weight_bytes'] / 1e6:7.1f} MB  "
          f"perplexity {s['perplexity']:8.3f} (x{ratio:.3f})  KL {s['kl'] or 0:.4f}")
print("deployable model:", f"{args.out}/{report['stages'][-1]['path']}")
