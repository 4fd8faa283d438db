"""The ``genai_config.json`` that lets ``onnxruntime-genai`` run an export as is, and a greedy run
through onnxruntime-genai's own tokenizer and loop (what its users do; tests and benchmarks use it)."""

from __future__ import annotations

from typing import Any

from .specs import DecoderWeights


def genai_config(dw: DecoderWeights, *, provider: str = "cpu", filename: str = "model.onnx",
                 provider_options: dict | None = None, max_length: int | None = None,
                 position_ids: bool = True) -> dict[str, Any]:
    eos = dw.eos_token_id
    pad = dw.pad_token_id if dw.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if provider == "cuda":
        session["provider_options"] = [{"cuda": dict(provider_options or {})}]
    return {
        "model": {
            "bos_token_id": dw.bos_token_id,
            "context_length": dw.context_length,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": dw.head_dim,
                "hidden_size": dw.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({"position_ids": "position_ids"} if position_ids else {}),
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dw.num_heads,
                "num_hidden_layers": dw.num_layers,
                "num_key_value_heads": dw.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": dw.model_type,
            "vocab_size": dw.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length or dw.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def genai_greedy(folder, prompt: "str | list[int]", new_tokens: int) -> "tuple[list[int], list[int], str]":
    """``new_tokens`` greedy tokens after ``prompt`` in onnxruntime-genai, EOS ignored: text goes through
    its own tokenizer. Returns the prompt ids, the new tokens and their text (its own decoder)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = [int(i) for i in tok.encode(prompt)] if isinstance(prompt, str) else [int(i) for i in prompt]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    new: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return ids, new, tok.decode(new)
