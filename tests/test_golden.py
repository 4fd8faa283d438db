"""Cache ids follow the algorithm: a golden output per pass, recorded at its current version.

Each pass runs with its default config on the tiny model (``train.bf16`` pinned off: ``auto`` is
decided per machine); the output's fingerprint (logits on
fixed tokens, plus the ONNX graph's operator counts for an export) is compared with
``tests/golden.json``. Outputs that change while the pass's version stays the same fail: a run
folder would silently reuse the stale stage. Bump the pass's ``algorithm`` in its
``__init__.py`` (saying why), then record the new golden:

    COMPRESS_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Recording refuses to overwrite a golden of the same version with a different output.
Goldens are kept per CPU class (AMX / AVX-512 / AVX2-only: the matmul kernels sum in different orders,
and training amplifies that): the distill golden recorded on an AVX-512 CPU reads 4.7e-3 of
scale off on an AVX2-only one, while one more training step moves it 3.2e-4 on the same CPU.
Tolerance: logits within 1e-3 of their scale against this class's golden (ten more distill steps
move 1.9e-3; CPUs of one class may still differ a little); against the other class's, where this
class has none yet, 1e-2 (and the recording adds this class's).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from compress import api
from compress.hardware import cpu_flags
from compress.registry import get_pass
from test_contract import BEFORE, BUILTIN, CONTRACT

GOLDEN = Path(__file__).parent / "golden.json"
UPDATE = os.environ.get("COMPRESS_UPDATE_GOLDEN") == "1"
RTOL = 1e-3  # against the golden of this CPU class
RTOL_OTHER_CPU = 1e-2  # against another class's golden (float noise of another CPU, amplified by training)


def cpu_class() -> str:
    flags = cpu_flags()
    if not flags:
        return "other"
    if flags & {"amx_tile", "amx_bf16"}:
        return "amx"  # oneDNN picks other fp32 kernels on AMX CPUs: amoeba's golden reads 4.3e-3 off an AVX-512 one's
    return "avx512" if "avx512f" in flags else "avx2"


def golden_key(name: str, cls: str) -> str:
    return name if cls == "avx512" else f"{name}@{cls}"  # the first goldens were recorded on AVX-512


def fingerprint(folder: Path) -> dict:
    from compress.formats import detect_format
    from compress.runner import load_for_eval

    model = load_for_eval(folder)
    ids = (torch.arange(32).reshape(2, 16) * 7 + 3) % 300
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    fp = {"format": detect_format(folder), "logits": [round(float(x), 6) for x in logits[:, ::3, ::37].flatten()],
          "scale": round(float(logits.abs().mean()), 6)}
    if fp["format"] == "onnx":
        import onnx

        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        fp["ops"] = dict(sorted(Counter(n.op_type for n in graph.node).items()))
    return fp


def _deviation(a: dict, b: dict) -> float:
    """The largest logit difference of ``a`` from the golden ``b``, as a fraction of ``b``'s scale; inf where
    the two differ in kind (format, graph operators, number of logits)."""
    if (a.keys() != b.keys() or a["format"] != b["format"] or a.get("ops") != b.get("ops")
            or len(a["logits"]) != len(b["logits"])):
        return math.inf
    return max((abs(x - y) for x, y in zip(a["logits"], b["logits"])), default=0.0) / max(b["scale"], 1e-6)


def _close(a: dict, b: dict, rtol: float = RTOL) -> bool:
    return _deviation(a, b) <= rtol


@pytest.fixture(scope="module")
def golden():
    data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    yield data
    if UPDATE:
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# Paths of a pass that its defaults do not take but shipped profiles do, each with its own golden
# (cpu-4bit runs Block-AP at 4 bits; --set quantize.recovery=ste trains straight-through latents).
VARIANTS = {"quantize[block_ap+ste]": ("quantize", "block_ap: 'on', block_ap_steps: 8, recovery: ste, steps: 20")}
# What a pass's defaults need to fit the tiny model (hidden 64): pat's d' of 448 does not
TINY = {"pat": "hidden: 32, rank: 16, train: {bf16: 'off', steps: 40}"}
CASES = [s.name for s in BUILTIN] + sorted(VARIANTS)


@pytest.mark.parametrize("case", CASES)
def test_output_matches_the_golden_of_this_version(case, golden, tiny_dir, tiny_text, tmp_path):
    name, extra = VARIANTS.get(case, (case, ""))
    spec = get_pass(name)
    prof = tmp_path / "golden.yaml"
    # the pass's defaults, but bf16 pinned off (train.bf16, quantize's block_ap_bf16): `auto` resolves per
    # machine (measured), not per algorithm
    pinned = [f"{k}: 'off'" for k in ("block_ap_bf16",) if k in spec.config.__dataclass_fields__]
    train = ["train: {bf16: 'off'}"] if "train" in spec.config.sections() and name not in TINY else []
    cfg = "{" + ", ".join(train + pinned + ([extra] if extra else []) + ([TINY[name]] if name in TINY else [])) + "}"
    before = "".join(f"{{name: {n}, config: {json.dumps(CONTRACT[n])}}}, " for n in BEFORE.get(name, []))
    prof.write_text("description: golden\ntarget: {name: cpu, threads: 1}\ndata: {seq_len: 64, mix: 0}\n"
                    "evaluation: {max_tokens: 256, window: 64, domains: [python-code]}\n"
                    f"passes: [{before}{{name: {name}, config: {cfg}}}]\n")
    rep = api.run(api.plan(str(tiny_dir), str(prof), data=str(tiny_text), eval_data=str(tiny_text)),
                  tmp_path / "run", quiet=True)
    fp = {"version": spec.version, **fingerprint(tmp_path / "run" / rep["stages"][-1]["path"])}
    key = golden_key(case, cpu_class())
    old, rtol = golden.get(key), RTOL
    if old is None:  # no golden of this CPU class yet: another class's, at its noise
        others = [v for k, v in golden.items() if k.split("@")[0] == case]
        if others and others[0]["version"] == spec.version:
            old, rtol = others[0], RTOL_OTHER_CPU
            if UPDATE and _close(fp, old, rtol):
                golden[key] = fp
                return
    if old is None or old["version"] != spec.version:
        if UPDATE:
            for k in [k for k in golden if k.split("@")[0] == case]:  # a new version: other classes re-record
                del golden[k]
            golden[key] = fp
            return
        pytest.fail(f"pass {case} is at version {spec.version}, its golden output at "
                    f"{old['version'] if old else 'none'}: record it (COMPRESS_UPDATE_GOLDEN=1, see this file)")
    if not _close(fp, old, rtol):
        pytest.fail(f"the output of pass {case} changed under the same version {spec.version} (logits "
                    f"{_deviation(fp, old):.2e} of scale off, tolerance {rtol:.0e}): bump its algorithm "
                    f"version in compress/passes/{name}/__init__.py (stale cached stages would be reused), then "
                    "record the new golden (COMPRESS_UPDATE_GOLDEN=1)")
