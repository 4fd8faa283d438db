"""Tokenizer files: written once from the source, then carried verbatim to every folder.

A GGUF's byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) is rebuilt here from
the GGUF's own metadata — tokens, merges, token types, the pre-tokenizer name, the special
ids, ``add_bos_token`` and the chat template — instead of by transformers' GGUF converter,
which declares it a ``LlamaTokenizer`` (SentencePiece) with a BOS prepended, byte fallback and
no digit splitting. Every consumer reads that declaration differently: onnxruntime-genai's
tokenizer then turns each space into ``-1`` ids, transformers 5 warns and rebuilds. The files
written here give the ids llama.cpp gives for the same GGUF, and declare the class
``PreTrainedTokenizerFast``: "tokenizer.json, exactly". A model-specific class would be
rebuilt by transformers 5 from its own definition (``GPT2Tokenizer`` drops a ``Digits``
pre-tokenizer there); onnxruntime-genai reads the file as byte-level BPE either way.

Later stages and exports never re-serialize a tokenizer (a ``save_pretrained`` under another
transformers version may rewrite it): ``copy_tokenizer_files`` copies the source's files byte
for byte. Torch-free.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError

#: Every file a Hugging Face tokenizer may consist of; copied as they are between folders.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)

#: The llama.cpp pre-tokenizer regex of Llama 3 (``llama-bpe``), as its HF tokenizer.json writes it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst`` unchanged; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise UserError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model) to carry along")
    return copied


def chat_text(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """A chat rendered with the tokenizer's own template, in a bounded sandbox
    (:func:`compress.untrusted.render_chat_template`: time, output and repetition limits) with
    the variables transformers' ``apply_chat_template`` passes, so the text is the same."""
    from .untrusted import render_chat_template, select_template

    template = select_template(tokenizer.chat_template)
    if template is None:
        raise UserError("the tokenizer has no chat template")
    special = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
    return render_chat_template(template, where=f"chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}",
                                messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                documents=None, **special)


def chat_ids(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat rendered with the tokenizer's template (:func:`chat_text`)."""
    text = chat_text(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pre_tokenizer(pre: str):
    """The Hugging Face pre-tokenizer equal to llama.cpp's for the GGUF name ``pre``."""
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("default", "gpt-2", "gpt2"):
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder"):  # llama.cpp: "\p{N}" first, then the GPT-2 regex
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    raise UserError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                    "(supported: default, gpt-2, smollm, starcoder, llama-bpe)")


def genai_caveats(tokenizer_json: str) -> list[str]:
    """Where onnxruntime-genai's tokenizer would give other ids than tokenizer.json says.

    Its byte-level BPE applies the GPT-2 split and ignores a ``Digits`` pre-tokenizer (measured
    with onnxruntime-genai 0.15.2 and 0.18.0). That changes ids only where the vocabulary has
    tokens joining a digit to something else (``12``, ``Ġ1``); SmolLM2's has none.
    """
    state = json.loads(tokenizer_json)
    pre = json.dumps(state.get("pre_tokenizer"))
    if '"Digits"' not in pre:
        return []
    joined = [t for t in state["model"]["vocab"] if len(t) > 1 and any(c.isdigit() for c in t)]
    if not joined:
        return []
    return [f"onnxruntime-genai's tokenizer does not split digits apart: the vocabulary has {len(joined)} tokens "
            f"joining a digit to other characters (e.g. {joined[0]!r}), so its ids for numbers can differ from "
            "transformers' and llama.cpp's"]


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_bpe_tokenizer_files(reader, *, eos_token_id: int | None = None) -> dict[str, str] | None:
    """``{file name: text}`` of a byte-level BPE tokenizer rebuilt from a ``gguf.GGUFReader``;
    None when the GGUF's tokenizer is not byte-level BPE (SentencePiece ``llama`` tokenizers are
    left to transformers' converter, which reads them correctly).

    Args:
        reader: an open ``gguf.GGUFReader``.
        eos_token_id: the model's end-of-turn id; it wins where it disagrees with the GGUF's
            ``tokenizer.ggml.eos_token_id`` (the caller notes the change).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        return None
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens") or [])
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges: list[str] = list(_field(reader, "tokenizer.ggml.merges") or [])
    if not tokens or len(types) != len(tokens):
        raise UserError("corrupt GGUF tokenizer: token list missing or token types of another length")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError("corrupt GGUF tokenizer: duplicate tokens")
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or a not in vocab or b not in vocab:
            raise UserError(f"corrupt GGUF tokenizer: merge {m!r} is not two known tokens")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(_field(reader, "tokenizer.ggml.pre", "default")))
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)

    def name(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, unk = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.unknown_token_id")
    eos = tokens[eos_token_id] if eos_token_id is not None else name("tokenizer.ggml.eos_token_id")
    pad = name("tokenizer.ggml.padding_token_id") or eos
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    specials = [AddedToken(t, special=types[i] != _USER_DEFINED, normalized=False)
                for i, t in enumerate(tokens) if types[i] in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens(specials)
    prefix, suffix = [bos] if add_bos else [], [eos] if add_eos else []
    if prefix or suffix:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(prefix + ["$A"] + suffix),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(prefix + suffix)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    control = [t for i, t in enumerate(tokens) if types[i] == _CONTROL]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # what a causal LM takes (the generic class would also return token_type_ids, which
        # ``model.generate(**tokenizer(text))`` refuses)
        "model_input_names": ["input_ids", "attention_mask"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "additional_special_tokens": [t for t in control if t not in (bos, eos, pad, unk)],
        "added_tokens_decoder": {
            str(vocab[t.content]): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": t.special} for t in specials},
    }
    template_text = _field(reader, "tokenizer.chat_template")
    if template_text:
        config["chat_template"] = str(template_text)
    special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad),
                                      ("unk_token", unk)) if v is not None}
    if config["additional_special_tokens"]:
        special_map["additional_special_tokens"] = config["additional_special_tokens"]
    return {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }


__all__ = ["TOKENIZER_FILES", "chat_ids", "copy_tokenizer_files", "genai_caveats", "gguf_bpe_tokenizer_files"]
