"""A build-pipeline step: run a profile non-interactively, read `--json`, act on the exit code, and
gate the build on the result (fail when the compressed model reads worse than a perplexity ratio).

    python examples/build_step.py MODEL OUT --profile cpu-4bit --max-ratio 1.25 [--data TEXT]

Exit codes of `compress`: 0 ok, 2 bad input (one line on stderr: fix the job), 1 internal error,
130 interrupted. This step exits 0 when the gate passes, 3 when the model is too inaccurate, and
passes compress's own code through otherwise.
"""

import argparse
import json
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("out")
ap.add_argument("--profile", default="cpu-4bit")
ap.add_argument("--max-ratio", type=float, default=1.25, help="the gate: perplexity x teacher, geomean of domains")
ap.add_argument("--data", default=None)
ap.add_argument("--eval-data", default=None)
args = ap.parse_args()

cmd = [sys.executable, "-m", "compress", "model", args.model, "--profile", args.profile, "--out", args.out,
       "--json", "--quiet"]
if args.data:
    cmd += ["--data", args.data]
if args.eval_data:
    cmd += ["--eval-data", args.eval_data]
proc = subprocess.run(cmd, capture_output=True, text=True)
if proc.returncode != 0:
    kind = {2: "bad input", 130: "interrupted"}.get(proc.returncode, "internal error")
    print(f"compress failed ({kind}, exit {proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
    sys.exit(proc.returncode)
report = json.loads(proc.stdout)
final = report["stages"][-1]
ratio = final.get("ratio_geomean") or final["perplexity"] / report["stages"][0]["perplexity"]
print(f"{final['name']}: {final['weight_bytes'] / 1e6:.1f} MB, perplexity x{ratio:.3f} the teacher's "
      f"(gate x{args.max_ratio})")
sys.exit(0 if ratio <= args.max_ratio else 3)
