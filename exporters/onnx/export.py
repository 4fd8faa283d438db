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

from compress.formats import GRAPH_HIDDEN_KEY, ONNX_CONFIG, detect_format, weight_bytes
from compress.errors import UserError
from compress.tokenizer import copy_tokenizer_files

from .decoder import LayoutOptions, build_decoder
from .genai import genai_config
from .graph import Graph
from .runtime import Decoder, RuntimeOptions, check_provider
from .specs import spec_for
from .validate import ValidationSettings, validate

#: Files copied from the source folder besides the tokenizer's: the HF config (optimum's
#: ORTModelForCausalLM reads it) and the generation defaults.
COPIED_FILES = ("generation_config.json", "config.json")
#: Relative logit tolerance by precision (fp16 keeps ~3 significant digits).
DEFAULT_RTOL = {"fp32": 1e-3, "fp16": 2e-2}
#: Quantized exports compare against the fake-quant PyTorch model. With accuracy_level 4 ONNX
#: Runtime rounds activations to int8 per block: one op matches an int8 emulation to 1e-6, but
#: rounding flips from 1e-6 upstream differences compound over 30 layers. The max relative
#: logit error is an extreme value that grows with the model's fragility (SmolLM2 4-bit: 0.07-0.17;
#: 2-bit g64: 0.61 at a prompt's first positions) while the distributions stay equal (2-bit
#: deployed vs fake-quant perplexity 60.68 vs 60.72 on 4,096 test tokens). So levels >= 2 are
#: judged by the mean KL(PyTorch || ONNX) over the compared positions (SmolLM2 4-bit: 0.010,
#: 2-bit: 0.042 nats on the validation prompts), *plus* an exact check of the codes at level 0
#: (``exact_codes``) and a perplexity/KL evaluation of the deployed graph; QUANT_RTOL is then the
#: near-tie margin of the greedy comparison.
QUANT_RTOL = {0: 1e-3, 1: 1e-3, 2: 2e-2, 3: 2e-2, 4: 0.3}
QUANT_KL_TOL = 0.1


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16
    provider: str = "cpu"  # the execution provider genai_config.json names (cpu | cuda)
    validate: bool = True
    rtol: float | None = None  # None: DEFAULT_RTOL[precision]
    greedy_tokens: int = 32
    layout: LayoutOptions = field(default_factory=LayoutOptions)
    accuracy_level: int = 4  # MatMulNBits accuracy level of quantized Linears (4 = int8 activations, CPU)


def export_model(src: Path, out: Path, opts: ExportOptions = ExportOptions(),
                 log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Write the ONNX export of ``src`` into the empty folder ``out``; returns what was measured."""
    from compress.models import load_model, load_tokenizer

    src, out = Path(src), Path(out)
    if detect_format(src) == "onnx":
        raise UserError(f"{src} is already an ONNX export")
    t0 = time.perf_counter()
    model = load_model(src)
    tokenizer = load_tokenizer(src)
    dw = spec_for(model.config.model_type).read(model)
    dtype = {"fp32": np.float32, "fp16": np.float16}[opts.precision]
    log(f"exporting {dw.num_layers} layers, hidden {dw.hidden_size}, {dw.num_heads}/{dw.num_kv_heads} heads "
        f"of {dw.head_dim}, {opts.precision}")
    from .decoder import dense_linear
    from .quant import is_quant, nbits_linear, quant_summary, tied_head_nbits

    quantized = quant_summary(model)
    linear = tied_head = None
    if quantized:
        log(f"quantized Linears: {quantized['linears']} ({', '.join(f'{v} × {k}' for k, v in quantized['formats'].items())})"
            f" -> MatMulNBits, accuracy_level {opts.accuracy_level}")
        linear = nbits_linear(dense_linear(dtype), opts.accuracy_level, dtype)
        if 2 in quantized["bits"]:
            from .quant import probe_2bit

            quantized["two_bit_kernels"] = probe_2bit()
            log(f"2-bit MatMulNBits on ONNX Runtime {quantized['two_bit_kernels']['onnxruntime']} CPU: default kernel "
                f"{quantized['two_bit_kernels']['default']}; LUT GEMM (session option mlas.use_lut_gemm=1) "
                f"{quantized['two_bit_kernels']['lut_gemm']}")
        if is_quant(dw.head_module):
            tied_head = tied_head_nbits(dw, opts.accuracy_level, dtype)
    g = Graph(out)
    try:
        build_decoder(g, dw, dtype=dtype, layout=opts.layout, linear=linear, tied_head=tied_head)
    except BaseException:
        g.abort()
        raise
    g.save(metadata={"producer": "compress", "precision": opts.precision})
    (out / ONNX_CONFIG).write_text(json.dumps(
        genai_config(dw, provider=opts.provider, position_ids=opts.layout.position_ids), indent=4))
    widths = dw.hidden_size, dw.num_heads, dw.head_dim
    del dw
    copy_tokenizer_files(src, out)  # verbatim: what the source's consumers read, every runtime reads
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    consumer_config = _consumer_config(out, *widths)
    if consumer_config:
        log(consumer_config["note"])
    export_seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "precision": opts.precision,
        "provider": opts.provider,
        "layout": dataclasses.asdict(opts.layout),
        "quantized": quantized,
        "accuracy_level": opts.accuracy_level if quantized else None,
        "export_seconds": export_seconds,
        "onnx_bytes": weight_bytes(out),
        "consumer_config": consumer_config,
    }
    if opts.validate:
        provider = opts.provider
        try:
            check_provider(provider)
        except UserError:
            log(f"validation: provider {provider} unavailable here, validating on cpu instead")
            provider = "cpu"
        rtol = opts.rtol or max(DEFAULT_RTOL[opts.precision], QUANT_RTOL.get(opts.accuracy_level, 0.3) if quantized else 0)
        # int8 activations (accuracy_level 4) can flip a near-tie; exact kernels may not
        lossy = bool(quantized) and opts.accuracy_level >= 2
        settings = ValidationSettings(rtol=rtol, greedy_tokens=opts.greedy_tokens, allow_near_ties=lossy,
                                      kl_tol=QUANT_KL_TOL if lossy and not opts.rtol else None)
        t1 = time.perf_counter()
        exact = None
        if quantized and opts.accuracy_level != 0:
            # 1) the codes themselves: the same graph at accuracy_level 0 must match the fake-quant model tightly
            exact = _validate_exact_codes(out, model, tokenizer, provider, opts)
            log(f"codes exported exactly: at accuracy_level 0 logits max rel error {exact['max_rel_error']:.1e}, "
                f"{exact['greedy_tokens']} greedy tokens identical on {exact['prompts']} prompts")
        # 2) the graph as deployed
        decoder = Decoder(out, RuntimeOptions(provider=provider))
        result["validation"] = {**validate(decoder, model, tokenizer, settings), "provider": provider,
                                "accuracy_level": opts.accuracy_level if quantized else None, "exact_codes": exact,
                                "seconds": time.perf_counter() - t1}
        v = result["validation"]
        ties = f", {len(v['near_ties'])} prompt(s) ended at a near-tie" if v.get("near_ties") else ""
        log(f"validation passed: logits max rel error {v['max_rel_error']:.1e} (max abs {v['max_abs_error']:.2e}), "
            f"mean KL {v['mean_kl']:.2e} nats, "
            f"{v['greedy_tokens']} greedy tokens identical on {v['prompts']} prompts{ties}")
    else:
        result["validation"] = None
        log("validation skipped (validate: false)")
    return result


def _consumer_config(out: Path, hidden: int, heads: int, head_dim: int) -> dict[str, Any] | None:
    """Make the export's ``config.json`` loadable by the consumers that read it for shapes only.

    A pruned residual width (PAT: 448 under 9 heads of 64) is no multiple of the head count.
    optimum's ORTModelForCausalLM sizes a LLaMA's KV cache as hidden_size / num_attention_heads
    (ignoring head_dim: 448 / 9 -> 49, not 64) and transformers 5.x refuses to load such a config
    (huggingface/transformers#46082). Nothing in an ONNX folder reads config.json for the residual
    width (the graph has it; genai_config.json states it), so there ``hidden_size`` becomes
    heads x head_dim and the true width is kept under :data:`GRAPH_HIDDEN_KEY`. Returns what was
    changed, or None when the width needs no change."""
    from compress.untrusted import read_json

    path = out / "config.json"
    if not path.is_file() or hidden == heads * head_dim:
        return None
    config = read_json(path)
    consumer = heads * head_dim
    config.update({"hidden_size": consumer, GRAPH_HIDDEN_KEY: hidden, "head_dim": head_dim})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"hidden_size": consumer, GRAPH_HIDDEN_KEY: hidden,
            "note": f"config.json: hidden_size {hidden} is no multiple of {heads} heads; written as "
                    f"{heads} x {head_dim} = {consumer} for optimum and transformers 5.x, which read it for the "
                    f"KV-cache shape only (the graph's width {hidden} is kept as {GRAPH_HIDDEN_KEY} and in "
                    f"genai_config.json)"}


def _validate_exact_codes(out: Path, model, tokenizer, provider: str, opts: ExportOptions) -> dict[str, Any]:
    """Validate a quantized export's codes at accuracy_level 0 (no activation rounding): a copy
    of the graph (sharing the weight file) with every MatMulNBits set to level 0."""
    import onnx

    from .runtime import MODEL_FILE

    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    tmp = out / ".validate-level0.onnx"
    try:
        onnx.save(proto, str(tmp))
        decoder = Decoder(out, RuntimeOptions(provider=provider), model_file=tmp.name)
        settings = ValidationSettings(rtol=DEFAULT_RTOL[opts.precision], greedy_tokens=opts.greedy_tokens)
        result = validate(decoder, model, tokenizer, settings)
        del decoder
    finally:
        tmp.unlink(missing_ok=True)
    return result
