"""On-disk model formats: one registry, the only place a folder's format is decided.

A format has a name, a torch-free ``detect(path)`` (marker files only), a ``load`` (the
dotted path of a function returning a PyTorch or ONNX Runtime model, imported when called),
``count`` (parameters, read from file headers) and ``weight_bytes``. Passes declare which
formats they accept and produce (:mod:`compress.registry`), so the plan is checked before
any work. Detection runs in ``priority`` order: the most specific marker first.

Built in: ``hf`` (a Hugging Face folder: ``config.json`` + safetensors), ``quantized``
(``quantization.json`` beside it: packed group-wise codes, :mod:`compress.quantized`) and
``onnx`` (``genai_config.json``: an export that onnxruntime-genai, optimum and plain ONNX
Runtime load). A subnet supernet registers itself the same way (``register_format``).
"""

from __future__ import annotations

import importlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError, one_line

MANIFEST = "manifest.json"
ONNX_CONFIG = "genai_config.json"  # marks an ONNX export folder (its onnxruntime-genai config)
#: In an ONNX export's config.json: the graph's residual width where ``hidden_size`` there was
#: written as heads x head_dim for the consumers that size a KV cache from it (a pruned width)
GRAPH_HIDDEN_KEY = "compress_graph_hidden_size"


def graph_config(config: dict) -> dict:
    """A ``config.json`` (dict) with ``hidden_size`` the graph's own width (:data:`GRAPH_HIDDEN_KEY`
    where an ONNX export states it; the rest unchanged)."""
    return {**config, "hidden_size": config.get(GRAPH_HIDDEN_KEY, config.get("hidden_size"))}


QUANT_CONFIG = "quantization.json"  # marks a quantized artifact
MASKS_FILE = "masks.safetensors"  # sparsity masks (compress.masks); never counted as weights


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[Path], bool]
    loader: str  # "module:function", called as function(path) -> model
    count: Callable[[Path], int | None]  # parameters; None where the files do not say
    weight_bytes: Callable[[Path], int]
    priority: int = 0  # higher: tried first
    evaluated_with: str = "pytorch"  # what runs it for evaluation: "pytorch" | "onnxruntime"

    def load(self, path: Path, **kwargs: Any):
        module, _, func = self.loader.partition(":")
        return getattr(importlib.import_module(module), func)(Path(path), **kwargs)


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> list[Format]:
    from .registry import ensure_builtin

    ensure_builtin()  # a pass package may register its own format (the supernet)
    return sorted(_FORMATS.values(), key=lambda f: -f.priority)


def get_format(name: str) -> Format:
    formats()  # registered, including the pass packages' own
    try:
        return _FORMATS[name]
    except KeyError:
        raise UserError(f"unknown model format {name!r}; known: {', '.join(sorted(_FORMATS))}") from None


def detect_format(path: Path) -> str | None:
    """The format of a folder, or None when it is no model folder at all."""
    path = Path(path)
    if not path.is_dir():
        return None
    for fmt in formats():
        if fmt.detect(path):
            return fmt.name
    return None


def format_of(path: Path) -> Format:
    name = detect_format(path)
    if name is None:
        raise UserError(f"{path} is not a model folder (none of: {', '.join(f.name for f in formats())})")
    return _FORMATS[name]


def load(path: Path, **kwargs: Any):
    """The model in a folder, loaded the way its format says (PyTorch, or ONNX Runtime for exports)."""
    return format_of(path).load(path, **kwargs)


def count_parameters(path: Path) -> int | None:
    return format_of(path).count(Path(path))


def weight_bytes(path: Path) -> int:
    fmt = detect_format(path)
    return _FORMATS[fmt].weight_bytes(Path(path)) if fmt else 0


DOWNLOAD_ZSTD_LEVEL = 3  # zstd's default level; level 19 takes ~30x longer (benchmarks/sparse.py measures both)


def download_bytes(path: Path, level: int = DOWNLOAD_ZSTD_LEVEL) -> int:
    """Bytes of the folder as a device downloads it: every file compressed with zstd at ``level``,
    one frame per file (what an OTA update or an app bundle ships). Dense kernels load the same
    bytes whatever the values; zeros and repeated codes shrink only this."""
    import zstandard

    class Count:  # a sink that only counts what it is given
        def write(self, data) -> int:
            return len(data)

    total = 0
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            with open(f, "rb") as src:
                total += zstandard.ZstdCompressor(level=level, write_content_size=False).copy_stream(src, Count())[1]
    return total


# ------------------------------------------------------------------------------ built-ins


SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares, every entry checked against the file: a known
    dtype, a shape of non-negative ints, byte ranges that match the shape and fit the data."""
    from .untrusted import loads_json, regular_file

    try:
        size = regular_file(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > SAFETENSORS_MAX_HEADER:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes) or the format's limit")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({one_line(exc.strerror or exc)})") from None
    except ValueError as exc:
        raise UserError(f"{path}: corrupt safetensors ({one_line(exc)})") from None
    header = loads_json(raw, f"{path} (safetensors header)")
    data = size - 8 - n
    tensors: dict[str, dict] = {}
    try:
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict):
                raise ValueError(f"tensor {name!r}: entry is not an object")
            dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
            numel = 1
            for d in shape:
                numel *= d
            if offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype]:
                raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
            if offsets[1] > data:
                raise ValueError(f"tensor data truncated ({size} bytes, {8 + n + offsets[1]} needed)")
            tensors[name] = meta
    except ValueError as exc:
        raise UserError(f"{path}: corrupt safetensors ({one_line(exc)})") from None
    return tensors


def weight_files(path: Path) -> list[Path]:
    return [p for p in sorted(Path(path).glob("*.safetensors")) if p.name != MASKS_FILE]


def _safetensors_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(path))


def _count_safetensors(path: Path, skip_layers: dict | None = None) -> int:
    """Parameters in the folder's safetensors headers; a quantized Linear counts its in × out
    weights (not its packed bytes, scales or zeros)."""
    layers = skip_layers or {}
    total = sum(int(v["in_features"]) * int(v["out_features"]) for v in layers.values())
    for p in weight_files(path):
        for name, meta in read_safetensors_header(p).items():
            if name == "__metadata__" or (name.rsplit(".", 1)[0] in layers and not name.endswith(".bias")):
                continue
            numel = 1
            for d in meta["shape"]:
                numel *= d
            total += numel
    return total


def _count_quantized(path: Path) -> int:
    return _count_safetensors(path, json.loads((Path(path) / QUANT_CONFIG).read_text()).get("layers", {}))


def _count_onnx(path: Path) -> int | None:
    """An export holds the parameters of the model it was made from: its manifest records them."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("parameters")
    except (OSError, ValueError, AttributeError):
        return None


def _onnx_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("model.onnx*"))


HF = register_format(Format(
    "hf", "Hugging Face folder (config.json + safetensors)",
    detect=lambda p: (p / "config.json").is_file(), loader="compress.models:load_hf_model",
    count=_count_safetensors, weight_bytes=_safetensors_bytes, priority=0))
QUANTIZED = register_format(Format(
    "quantized", "group-wise quantized artifact (quantization.json + packed codes)",
    detect=lambda p: (p / QUANT_CONFIG).is_file() and (p / "config.json").is_file(),
    loader="compress.quantized:load_quantized", count=_count_quantized, weight_bytes=_safetensors_bytes,
    priority=10))
ONNX = register_format(Format(
    "onnx", "ONNX export (model.onnx + genai_config.json + tokenizer)",
    detect=lambda p: (p / ONNX_CONFIG).is_file(), loader="exporters.onnx.runtime:OnnxCausalLM",
    count=_count_onnx, weight_bytes=_onnx_bytes, priority=20, evaluated_with="onnxruntime"))
