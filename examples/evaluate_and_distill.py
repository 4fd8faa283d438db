"""The Python API on a model folder: evaluate it, then run a short distillation profile.

    python examples/evaluate_and_distill.py MODEL_DIR TEXT_FILE OUT_DIR
"""

import sys
from pathlib import Path

from compress import api

model, text, out = sys.argv[1:4]
profile = Path(out).with_suffix(".yaml")
profile.write_text(
    "description: example\n"
    "data: {seq_len: 32}\n"
    "evaluation: {max_tokens: 512, window: 64}\n"
    "passes:\n"
    "  - name: distill\n"
    "    config: {steps: 4, batch_size: 2, kl: 1.0, bf16: 'off'}\n"
)
print("before:", api.evaluate(model, text, max_tokens=512, window=64, quiet=True)["perplexity"])
report = api.run(api.plan(model, str(profile), data=text, eval_data=text), out, quiet=True)
for stage in report["stages"]:
    print(stage["name"], round(stage["perplexity"], 3), "KL", round(stage["kl"], 4))
