"""Recovery settings sweep on validation data only (how the cpu-4bit recovery was chosen).

Starting point: the embedded model after the 4-bit g128 GPTQ initialization (min-max scales,
8-bit tied head; a `quantize` stage folder given as INIT). Each setting trains 16 steps of
2 x 512 tokens of wikitext-2 *valid* (the last 4 blocks held out), then reports the KL to the
teacher on those 4 held-out blocks. Nothing here touches the test split.

    python benchmarks/quantize_recovery_sweep.py INIT '{"scales_1e4": {"recovery": "scales", "lr": 1e-4}}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "quantize_recovery_sweep.json"


def teacher_and_valid_ids(chars: int):
    """The embedded teacher (folder, model) and the token ids of the first ``chars`` characters of
    wikitext-2 *valid*."""
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.sources import resolve_source_ref

    teacher_dir = model_folder(resolve_source_ref(None))
    text = (ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt").read_text()[:chars]
    return teacher_dir, load_model(teacher_dir), load_tokenizer(teacher_dir)(text, add_special_tokens=False)["input_ids"]


def main() -> int:
    import torch

    from compress.context import PassContext
    from compress.passes.quantize.config import QuantizeConfig
    from compress.passes.quantize.run import _heldout_kl, _recover
    from compress.quantized import load_quantized

    init, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(2)
    teacher_dir, teacher, ids = teacher_and_valid_ids(2_000_000)
    n = len(ids) // 512
    blocks = torch.tensor(ids[: n * 512]).reshape(n, 512)
    held, train_blocks = blocks[-4:], blocks[:-4]
    results = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    for name, kw in settings.items():
        model = load_quantized(init)
        cfg = QuantizeConfig.from_dict({"steps": 16, "warmup_steps": 2, "batch_size": 2, "checkpoint_every": 0, **kw})
        ctx = PassContext(artifact_id=name, out_dir=Path("."), work_dir=ROOT / "benchmarks" / "_work" / f"sweep-{name}",
                          teacher_path=teacher_dir, load_teacher=lambda: teacher, training_blocks=None, progress=None,
                          log=lambda s: None)
        before = _heldout_kl(model, teacher, held)
        t = time.perf_counter()
        summary = _recover(model, teacher, train_blocks, cfg, ctx)
        after = _heldout_kl(model, teacher, held)
        run = {"name": name, "settings": kw, "heldout_kl_before": before, "heldout_kl_after": after,
               "train_kl": summary["history"], "seconds": time.perf_counter() - t}
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
