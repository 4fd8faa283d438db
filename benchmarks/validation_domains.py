"""Multi-domain *validation* text, for choosing recipe settings without looking at the test domains.

The held-out evaluation domains (benchmarks/heldout.py, `compress eval`) are wikitext-2 *test*, the
teacher's answers to the held-out prompts, and Python standard-library source and docstrings taken
from the *first* modules in name order. Decisions are made here instead, on text disjoint from all
of them: wikitext-2 *valid*, and source and docstrings of the *last* stdlib modules (reverse name
order; the script checks that no module feeds both). None of it is used by the default recipe's
training (the teacher's own text).

    python benchmarks/validation_domains.py NAME=FOLDER [NAME=FOLDER ...]

Each FOLDER is anything `compress eval` takes (a stage folder, an ONNX export); evaluated against
the embedded teacher on 16,384 tokens per domain in 512-token windows.
Result: benchmarks/results/validation_domains.json (rows merged by NAME).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
WORK = ROOT / "benchmarks" / "_work" / "validation"
RESULT = ROOT / "benchmarks" / "results" / "validation_domains.json"
CHARS = 150_000  # > 32k tokens of code or docstrings


def write_texts() -> list[Path]:
    """wikitext-2 valid and the last stdlib modules' code/docstrings, as files (one domain each)."""
    from compress import domains as D

    WORK.mkdir(parents=True, exist_ok=True)
    forward = D._stdlib_modules()
    # the test domains score their first 16,384 tokens: well inside the first CHARS characters
    code, docs = (lambda: D.python_code_text(CHARS)), (lambda: D.python_docs_text(CHARS))
    used_by_test = _modules_consumed(forward, code) | _modules_consumed(forward, docs)
    backward = forward[::-1]
    used_here = _modules_consumed(backward, code) | _modules_consumed(backward, docs)
    if used_by_test & used_here:
        raise SystemExit(f"validation and test stdlib text overlap: {sorted(p.name for p in used_by_test & used_here)[:5]}")
    with mock.patch.object(D, "_stdlib_modules", lambda: backward):
        texts = {"python-code-last": code(), "python-docs-last": docs()}
    out = [DATA / "valid.txt"]
    for name, text in texts.items():
        p = WORK / f"{name}.txt"
        p.write_text(text, encoding="utf-8")
        out.append(p)
    return out


def _modules_consumed(order: list[Path], fn) -> set[Path]:
    """The modules ``fn`` reads when it walks ``order`` (recorded through a patched module list)."""
    from compress import domains as D

    seen: list[Path] = []

    class Recorder(list):
        def __iter__(self):
            for p in order:
                seen.append(p)
                yield p

    with mock.patch.object(D, "_stdlib_modules", lambda: Recorder()):
        fn()
    return set(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()
    from compress import api
    from compress.models import model_folder
    from compress.sources import resolve_source_ref

    teacher = str(model_folder(resolve_source_ref(None), quiet=True))
    paths = write_texts()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "validation_domains", "rows": {}}
    result["protocol"] = (f"{args.max_tokens} tokens per domain, 512-token windows, ratios to the embedded fp32 teacher: "
                          "wikitext-2 valid; stdlib source and docstrings of the last modules (disjoint from the "
                          "test domains' first modules)")
    for item in args.models:
        name, _, folder = item.partition("=")
        t = time.perf_counter()
        r = api.evaluate(folder, data=[str(p) for p in paths], max_tokens=args.max_tokens, window=512,
                         teacher=teacher, quiet=True)
        ratios = {n: v["perplexity"] / v["teacher_perplexity"] for n, v in r["domains"].items()}
        row = {"folder": folder, "ratios": ratios, "kl": {n: v["kl"] for n, v in r["domains"].items()},
               "geomean_ratio": math.exp(sum(map(math.log, ratios.values())) / len(ratios)),
               "worst_ratio": max(ratios.values()), "eval_seconds": round(time.perf_counter() - t, 1),
               "date": time.strftime("%Y-%m-%d")}
        result["rows"][name] = row
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({name: row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
