"""Export a model to ONNX for a device and run it from text there.

    python examples/export_and_run.py MODEL OUT_DIR ["prompt"]

MODEL: a run's stage (an artifact), an HF folder or a .gguf (default: the embedded model). The
export is validated against PyTorch while it is written; then the folder is run the way a device
runs it: onnxruntime-genai's own tokenizer and generation loop (pip install onnxruntime-genai), or,
where that is not installed, this tool's ONNX Runtime loop (same graph, same greedy tokens).
"""

import sys

from compress import api

model = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "-" else None
out = sys.argv[2] if len(sys.argv) > 2 else "export-onnx"
prompt = sys.argv[3] if len(sys.argv) > 3 else "The capital of France is"

result = api.export(model, out, force=True, quiet=True)
v = result["validation"]
print(f"exported {result['out']}: {result['onnx_bytes'] / 1e6:.1f} MB, validated "
      f"(logits max rel error {v['max_rel_error']:.1e}, {v['greedy_tokens']} greedy tokens identical)")
try:
    import onnxruntime_genai as og
except ImportError:
    og = None
if og is not None:
    m = og.Model(out)
    tok = og.Tokenizer(m)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + 24, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(ids)
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    print(f"onnxruntime-genai {og.__version__}: {prompt!r} ->", repr(tok.decode(new)))
else:
    from compress.models import load_tokenizer
    from exporters.onnx.runtime import Decoder, RuntimeOptions

    tok = load_tokenizer(out)
    dec = Decoder(out, RuntimeOptions())
    new = dec.generate(tok(prompt)["input_ids"], 24)
    print("onnxruntime:", repr(prompt), "->", repr(tok.decode(new)))
