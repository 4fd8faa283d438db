"""Export a Hugging Face–loadable model folder (or compress artifact) to ONNX, validated.

The output folder holds ``model.onnx`` + ``model.onnx.data``, ``genai_config.json`` and
the tokenizer files, so it runs in plain ONNX Runtime (``exporters.onnx.runtime``) and in
``onnxruntime-genai``. The caller gives an empty (temporary) folder and renames it into
place: a failed validation leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.artifact import ONNX_CONFIG, weight_bytes
from compress.errors import UserError

from .decoder import LayoutOptions, build_decoder
from .genai import genai_config
from .graph import Graph
from .runtime import Decoder, RuntimeOptions, check_provider
from .specs import spec_for
from .validate import ValidationSettings, validate

#: Files copied from the source folder when present (tokenizer, chat template, HF config for reference).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "generation_config.json", "config.json",
)
#: Relative logit tolerance by precision (fp16 keeps ~3 significant digits).
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2}


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16
    provider: str = "cpu"  # the execution provider genai_config.json names (cpu | cuda)
    validate: bool = True
    rtol: float | None = None  # None: DEFAULT_RTOL[precision]
    greedy_tokens: int = 32
    layout: LayoutOptions = field(default_factory=LayoutOptions)


def export_model(src: Path, out: Path, opts: ExportOptions = ExportOptions(),
                 log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Write the ONNX export of ``src`` into the empty folder ``out``; returns what was measured."""
    from compress.models import load_model, load_tokenizer

    src, out = Path(src), Path(out)
    if (src / ONNX_CONFIG).is_file():
        raise UserError(f"{src} is already an ONNX export")
    t0 = time.perf_counter()
    model = load_model(src)
    tokenizer = load_tokenizer(src)
    dw = spec_for(model.config.model_type).read(model)
    dtype = {"fp32": np.float32, "fp16": np.float16}[opts.precision]
    log(f"exporting {dw.num_layers} layers, hidden {dw.hidden_size}, {dw.num_heads}/{dw.num_kv_heads} heads "
        f"of {dw.head_dim}, {opts.precision}")
    g = Graph(out)
    try:
        build_decoder(g, dw, dtype=dtype, layout=opts.layout)
    except BaseException:
        g.abort()
        raise
    g.save(metadata={"producer": "compress", "precision": opts.precision})
    (out / ONNX_CONFIG).write_text(json.dumps(genai_config(dw, provider=opts.provider), indent=4))
    del dw
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    export_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "precision": opts.precision,
        "provider": opts.provider,
        "layout": dataclasses.asdict(opts.layout),
        "export_seconds": export_seconds,
        "onnx_bytes": weight_bytes(out),
    }
    if opts.validate:
        provider = opts.provider
        try:
            check_provider(provider)
        except UserError:
            log(f"validation: provider {provider} unavailable here, validating on cpu instead")
            provider = "cpu"
        settings = ValidationSettings(rtol=opts.rtol or DEFAULT_RTOL[opts.precision], greedy_tokens=opts.greedy_tokens)
        t1 = time.perf_counter()
        decoder = Decoder(out, RuntimeOptions(provider=provider))
        result["validation"] = {**validate(decoder, model, tokenizer, settings), "provider": provider,
                                "seconds": time.perf_counter() - t1}
        v = result["validation"]
        log(f"validation passed: logits max rel error {v['max_rel_error']:.1e} (max abs {v['max_abs_error']:.2e}), "
            f"{v['greedy_tokens']} greedy tokens identical on {v['prompts']} prompts")
    else:
        result["validation"] = None
        log("validation skipped (validate: false)")
    return result
