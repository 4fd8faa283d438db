"""Loading models with torch: GGUF conversion (cached), HF folders, artifacts."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from .artifact import (  # noqa: E402
    MANIFEST, atomic_write_json, make_manifest, read_artifact, staging_dir,
)
from .cache import cache_dir, sweep_debris  # noqa: E402
from .errors import UserError, one_line  # noqa: E402
from .sources import SourceRef, check_model_type, source_id  # noqa: E402
from .untrusted import PROBE_CHAT  # noqa: E402


def _quiet_transformers(quiet: bool) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*legacy.*")


def converted_dir(ref: SourceRef) -> Path:
    return cache_dir() / "models" / source_id(ref)


def model_folder(ref: SourceRef, *, quiet: bool = False, log=None) -> Path:
    """A plain HF folder for the source, converting a GGUF once (cached by file hash)."""
    if ref.kind != "gguf":
        return ref.path
    dest = converted_dir(ref)
    if (dest / MANIFEST).is_file():
        return dest
    sweep_debris()  # a conversion killed half-way left its temp folder here
    if log:
        log(f"converting {ref.path.name} to an fp32 Hugging Face folder (once; cached in {dest})")
    convert_gguf(ref.path, dest, source_id(ref), quiet=quiet)
    return dest


def convert_gguf(gguf_path: Path, dest: Path, artifact_id: str, *, quiet: bool = False) -> None:
    """Dequantize a GGUF to fp32 and save a plain HF folder (safetensors, tokenizer).

    A GGUF-loaded model cannot be saved as it is (its quantization config), so a plain
    model is built from the config, given the state dict, and its weights re-tied.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers(quiet)
    # transformers' GGUF reader draws its own tqdm bar on stderr: hide it under --quiet
    try:
        with open(os.devnull, "w") as devnull, (
            contextlib.redirect_stderr(devnull) if quiet else contextlib.nullcontext()
        ):
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            src = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
    except Exception as exc:
        raise UserError(f"cannot read GGUF {gguf_path}: {one_line(exc)}") from None
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    check_model_type(cfg.get("model_type"), gguf_path)
    config = type(src.config).from_dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = src.generation_config
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    files, fixes = _gguf_tokenizer_files(gguf_path, eos_id)
    if files is None:
        fixes = _fix_special_tokens(tok, config)
    with staging_dir(dest) as tmp:
        save_model(model, tmp)
        if files is None:  # SentencePiece: transformers' converter reads it as it is
            tok.save_pretrained(tmp, legacy_format=False)  # tokenizer.json only (no 98 MB slow vocab)
        else:  # byte-level BPE: written from the GGUF's metadata (compress.tokenizer says why)
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
        manifest = make_manifest(
            id=artifact_id, parent=None, pass_name="source", pass_version=1,
            config={"origin": str(gguf_path), "format": "gguf", "dequantized_to": "float32"},
            path=tmp, teacher=None, extra={"notes": fixes},
        )
        atomic_write_json(tmp / MANIFEST, manifest)


def portable_config_(folder: Path) -> None:
    """Make a saved ``config.json`` read the same under transformers 4.x and 5.x.

    transformers 5 writes RoPE as ``rope_parameters`` only; transformers 4 does not know that key and
    silently falls back to ``rope_theta = 10000`` (SmolLM2's is 100000: a wrong model with no error).
    The legacy ``rope_theta`` / ``rope_scaling`` keys are added beside it; transformers 5 reads either.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():  # transformers 5 saves on the main process only (a non-zero rank's throwaway folder)
        return
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in cfg or "rope_theta" not in rope:
        return
    cfg["rope_theta"], cfg["rope_scaling"] = _legacy_rope(rope)
    atomic_write_json(path, cfg)


def _legacy_rope(rope: dict) -> tuple[float, dict | None]:
    """transformers 5's ``rope_parameters`` as transformers 4's ``(rope_theta, rope_scaling)``."""
    rest = {k: v for k, v in rope.items() if k != "rope_theta"}
    return rope["rope_theta"], None if rest.get("rope_type", "default") == "default" else rest


def _narrow_hidden(cfg: dict) -> int | None:
    """``hidden_size`` when it is not a multiple of the attention heads although ``head_dim`` is
    explicit (a sliced residual stream: PAT's 448 channels under 9 heads of 64), else None.
    The LLaMA modules size q/k/v/o from ``num_attention_heads x head_dim`` and run such a model,
    but transformers 5.x (through 5.24 at least) refuses the config on load and on save
    (huggingface/transformers#46082); :func:`load_config` and :func:`save_model` step around it."""
    h, n, hd = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("head_dim")
    if all(isinstance(v, int) and v > 0 for v in (h, n, hd)) and h % n:
        return h
    return None


def config_from_dict(raw: dict):
    """The transformers config of ``raw`` (a ``config.json`` as a dict), a narrow width
    (:func:`_narrow_hidden`) built past transformers 5's check: with a width the check accepts,
    then given its own (assignment is not checked)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    narrow = _narrow_hidden(raw)
    if narrow is None:
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    config = CONFIG_MAPPING[raw["model_type"]].from_dict({**raw, "hidden_size": raw["num_attention_heads"] * raw["head_dim"]})
    config.hidden_size = narrow
    return config


def load_config(path: Path):
    """The model's ``AutoConfig``, with RoPE read alike under both transformers majors: a config
    written by transformers 5 (``rope_parameters`` only) gets its ``rope_theta`` under 4.x too.
    A ``hidden_size`` that is not a multiple of the heads (explicit ``head_dim``) is read past
    transformers 5's check (:func:`_narrow_hidden`)."""
    import transformers
    from transformers import AutoConfig

    from .untrusted import read_json

    raw = read_json(Path(path) / "config.json")
    if _narrow_hidden(raw) is None:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    else:
        config = config_from_dict(raw)
    rope = getattr(config, "rope_parameters", None)
    if int(transformers.__version__.split(".")[0]) < 5 and isinstance(rope, dict) and "rope_theta" in rope:
        # transformers 4.x keeps rope_parameters as an unknown key and would use rope_theta's default
        config.rope_theta, config.rope_scaling = _legacy_rope(rope)
    return config


def save_model(model, folder: Path) -> None:
    """``save_pretrained`` (safetensors) with a ``config.json`` both transformers majors read alike
    (and a ``hidden_size`` that is not a multiple of the heads written past transformers 5's
    check, :func:`_narrow_hidden`)."""
    _save_past_width_check(model.config, folder, lambda: model.save_pretrained(folder, safe_serialization=True))


def save_config(config, folder: Path) -> None:
    """``config.save_pretrained`` as :func:`save_model` writes it (both majors alike, a narrow width
    past transformers 5's check)."""
    _save_past_width_check(config, folder, lambda: config.save_pretrained(folder))


def _save_past_width_check(config, folder: Path, save) -> None:
    narrow = _narrow_hidden(config.to_dict())
    if narrow is not None:  # saved at a width the check accepts, then given its own
        config.hidden_size = config.num_attention_heads * config.head_dim
    try:
        save()
    finally:
        if narrow is not None:
            config.hidden_size = narrow
    path = Path(folder) / "config.json"
    if narrow is not None and path.is_file():
        atomic_write_json(path, {**json.loads(path.read_text()), "hidden_size": narrow})
    portable_config_(folder)


def _gguf_tokenizer_files(gguf_path: Path, eos_id: int | None) -> tuple[dict[str, str] | None, list[str]]:
    """The byte-level BPE tokenizer files of a GGUF (None for SentencePiece), and notes on what was changed."""
    import gguf

    from .tokenizer import genai_caveats, gguf_bpe_tokenizer_files

    try:
        reader = gguf.GGUFReader(str(gguf_path))
        field = reader.fields.get("tokenizer.ggml.eos_token_id")
        gguf_eos = int(field.contents()) if field is not None else None
    except Exception as exc:
        raise UserError(f"cannot read GGUF {gguf_path}: {one_line(exc)}") from None
    notes = []
    if eos_id is not None and gguf_eos is not None and gguf_eos != eos_id:
        notes.append(f"tokenizer eos_token_id {gguf_eos} (GGUF) replaced by the model's eos_token_id {eos_id}")
    files = gguf_bpe_tokenizer_files(reader, eos_token_id=eos_id)
    if files is not None:
        notes += genai_caveats(files["tokenizer.json"])
    return files, notes


def _fix_special_tokens(tok, config) -> list[str]:
    """SentencePiece GGUF tokenizers as transformers converts them can carry an EOS that
    disagrees with the model's. The model's ``eos_token_id`` wins, so generation stops and
    EOS is kept in training text. (Byte-level BPE tokenizers are written by
    ``compress.tokenizer`` with the model's EOS to begin with.)"""
    notes = []
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None and tok.eos_token_id != eos_id:
        old = tok.eos_token
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
        notes.append(f"tokenizer eos_token corrected from {old!r} to {tok.eos_token!r} (model eos_token_id)")
    pad_id = getattr(config, "pad_token_id", None)
    if tok.pad_token_id is None and pad_id is not None:
        tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        notes.append(f"tokenizer pad_token set to {tok.pad_token!r} (model pad_token_id)")
    return notes


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    from .untrusted import read_json

    _quiet_transformers(True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (Path(path) / name).exists():
            read_json(Path(path) / name)  # bounded and typed before transformers trusts it
    cfg = Path(path) / "config.json"
    # transformers 5 reads config.json through AutoConfig's check: a narrow width is handed over read
    extra = {"config": load_config(path)} if cfg.is_file() and _narrow_hidden(read_json(cfg)) else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False, **extra)
    except Exception as exc:
        raise UserError(f"cannot load tokenizer from {path}: {one_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None):
        from .tokenizer import chat_text

        # render it once now, bounded: a template that hangs, explodes or is refused by the sandbox
        # fails here, before any work, not in the middle of a run
        chat_text(tok, PROBE_CHAT, add_generation_prompt=True)
    return tok


def load_model(path: Path, *, dtype: torch.dtype = torch.float32, quiet: bool = True):
    """The PyTorch model of a HF folder or a PyTorch-format artifact (the format registry decides
    how: a quantized artifact loads as its fake-quant model), in eval mode. Safetensors only."""
    from .formats import format_of

    _quiet_transformers(quiet)
    path = Path(path)
    from .untrusted import read_json

    check_model_type(read_json(path / "config.json").get("model_type"), path)
    fmt = format_of(path)
    if fmt.evaluated_with != "pytorch":
        raise UserError(f"{path} is a {fmt.name} model, not a PyTorch one")
    try:
        return fmt.load(path, dtype=dtype)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot load {fmt.name} weights from {path}: {one_line(exc)}") from None


def load_hf_model(path: Path, *, dtype: torch.dtype = torch.float32, **_):
    """A plain Hugging Face folder (format ``hf``), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        config = load_config(path)
        if _narrow_hidden(config.to_dict()) is None:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                local_files_only=True, output_loading_info=True,
            )
        else:  # from_pretrained re-checks the config under transformers 5: built, then the weights loaded
            model, info = _load_narrow(path, config, dtype)
    except Exception as exc:
        raise UserError(f"cannot load weights from {path}: {one_line(exc)}") from None
    # the loader only warns (and we silence it) where weights are missing -- it initializes them at
    # random -- or left over: both are a broken model, never a run that "works"
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in info.get("missing_keys") or [] if k not in tied]
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.endswith("rotary_emb.inv_freq")]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [f"{len(x)} {what} (first: {x[0][0] if isinstance(x[0], tuple) else x[0]})"
                 for x, what in ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "of another shape"))
                 if x]
        raise UserError(f"{path}: the weights do not match config.json: tensors " + ", ".join(parts))
    model.eval()
    return model


def _load_narrow(path: Path, config, dtype: torch.dtype):
    """A model whose ``hidden_size`` is not a multiple of its heads (:func:`_narrow_hidden`): built
    from the config, then its safetensors loaded (every shard); ``info`` as ``from_pretrained``'s."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .formats import weight_files

    files = weight_files(path)  # not a sparse model's masks.safetensors
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)  # a tensor of another shape raises
    model.tie_weights()
    return model, {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys),
                   "mismatched_keys": []}


def teacher_folder(artifact_path: Path) -> Path | None:
    """Folder of the teacher recorded in an artifact's manifest (None if it is its own)."""
    art = read_artifact(artifact_path)
    teacher = art.teacher
    if not teacher or teacher.get("id") == art.id:
        return None
    path = Path(teacher["path"])
    if not (path / "config.json").is_file():
        raise UserError(f"teacher of {artifact_path} not found at {path}")
    return path


@functools.lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """The name a model class's ``forward`` takes its KV cache under: ``cache`` on transformers 5.x
    (``past_key_values`` is deprecated there and warns on every call), ``past_key_values`` on 4.x."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward_with_cache(model, input_ids, cache=None):
    """``(logits, cache)`` of one forward with the model's own KV cache, under transformers 4.x
    (``past_key_values``) and 5.x (``cache``; ``past_key_values`` is deprecated there). The argument's
    name is looked up once per model class: this runs in timed decode loops."""
    key = cache_argument(type(model))
    out = model(input_ids=input_ids, use_cache=True, **({key: cache} if cache is not None else {}))
    return out.logits, (out["cache"] if "cache" in out.keys() else out.past_key_values)


def chat(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer to one user message, with the model's chat template."""
    from .tokenizer import chat_ids

    ids = torch.tensor([chat_ids(tokenizer, [{"role": "user", "content": prompt}])])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


__all__ = [
    "chat", "convert_gguf", "forward_with_cache", "load_hf_model", "load_model",
    "load_config", "portable_config_", "save_model",
    "load_tokenizer", "model_folder", "teacher_folder",
]
