"""Folders the tool writes, used the way their consumers use them: text in, text out.

Every stage and export carries a tokenizer that gives the teacher's ids in transformers (the
installed major), onnxruntime-genai's own tokenizer and optimum's ``ORTModelForCausalLM``; generation
from *text* in onnxruntime-genai and optimum gives PyTorch's greedy tokens. The real model's ids
are checked against llama.cpp's tokenizer of the shipped GGUF (the ids the model was trained
on), recorded below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.errors import UserError
from conftest import genai_generate, optimum_generate

#: spaces (single, double, leading), newlines, tabs, digits, punctuation, non-ASCII, an emoji
MIXED = ("The history of the city began in 1843.\n\nCafé déjà vu — 3.14159, naïve 北京 🙂!  Two  spaces\tand a tab.\n"
         "  indented line\n\n\nx = a+b  # it's 10% off, isn't it?")
#: llama.cpp (llama-cpp-python 0.3.36) on SmolLM2-135M-Instruct.Q4_1.gguf:
#: ``Llama(model_path, vocab_only=True).tokenize(MIXED.encode(), add_bos=False, special=True)``
LLAMA_CPP_MIXED = [
    504, 1463, 282, 260, 2240, 2585, 281, 216, 33, 40, 36, 35, 30, 198, 198, 51, 1939, 2756, 32564, 90, 16739, 386,
    101, 1841, 216, 35, 30, 33, 36, 33, 37, 41, 28, 15486, 46494, 13223, 230, 241, 16736, 122, 47526, 17, 216, 5713,
    216, 5600, 197, 397, 253, 10147, 30, 3805, 641, 6574, 1761, 1116, 198, 104, 446, 253, 27, 82, 216, 907, 357, 506,
    216, 33, 32, 21, 767, 28, 3247, 982, 357, 47,
]
CHAT = [{"role": "user", "content": "What is 12+7?"}]
#: the same llama.cpp call on the chat template's text (special tokens parsed)
LLAMA_CPP_CHAT_TAIL = [1, 4093, 198, 1780, 314, 216, 33, 34, 27, 39, 47, 2, 198, 1, 520, 9531, 198]
PROMPT = "The capital of France is"


# ------------------------------------------------------------------------ the GGUF converter


def _write_gguf_tokenizer(path: Path, hf_tok, *, pre: str = "smollm", add_bos: bool = False,
                          extra_tokens: tuple[str, ...] = (), extra_merges: tuple[str, ...] = ()) -> Path:
    """A GGUF holding only tokenizer metadata, from a byte-level BPE HF tokenizer."""
    import gguf

    state = json.loads(hf_tok.backend_tokenizer.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + list(extra_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]] + list(extra_merges)
    specials = {a["content"] for a in state["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(hf_tok.chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _convert(gguf_path: Path, out: Path) -> Path:
    import gguf

    from compress.tokenizer import gguf_bpe_tokenizer_files

    out.mkdir()
    for name, text in gguf_bpe_tokenizer_files(gguf.GGUFReader(str(gguf_path))).items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def test_gguf_tokenizer_gives_the_source_tokenizers_ids(tmp_path):
    from transformers import AutoTokenizer

    from tiny import CORPUS, make_tokenizer

    src = make_tokenizer()
    out = _convert(_write_gguf_tokenizer(tmp_path / "t.gguf", src), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["add_bos_token"] is False
    for text in (CORPUS[:2000], MIXED, "<|im_start|>user\nhi<|im_end|>\n"):
        ids = tok(text)["input_ids"]  # default call: no BOS, as the GGUF says
        assert ids == src(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.apply_chat_template(CHAT, tokenize=False) == src.apply_chat_template(CHAT, tokenize=False)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert list(tok("hi")) == ["input_ids", "attention_mask"]  # what model.generate(**tok(text)) accepts


def test_gguf_tokenizer_splits_digits_and_honours_add_bos(tmp_path):
    from transformers import AutoTokenizer

    from tiny import make_tokenizer

    src = make_tokenizer()
    vocab = src.get_vocab()
    # a vocabulary that *could* merge digits: llama.cpp's smollm pre-tokenizer still splits them
    extra = ("12", "Ġ1") if "12" not in vocab else ()
    merges = ("1 2", "Ġ 1") if extra else ()
    smollm = _convert(_write_gguf_tokenizer(tmp_path / "a.gguf", src, extra_tokens=extra, extra_merges=merges),
                      tmp_path / "smollm")
    gpt2 = _convert(_write_gguf_tokenizer(tmp_path / "b.gguf", src, pre="gpt-2", extra_tokens=extra,
                                          extra_merges=merges), tmp_path / "gpt2")
    t_smollm, t_gpt2 = AutoTokenizer.from_pretrained(smollm), AutoTokenizer.from_pretrained(gpt2)
    assert t_smollm.convert_ids_to_tokens(t_smollm(" 12")["input_ids"]) == ["Ġ", "1", "2"]
    assert t_gpt2.convert_ids_to_tokens(t_gpt2(" 12")["input_ids"]) == ["Ġ", "12"]  # "1 2" ranks first
    bos = _convert(_write_gguf_tokenizer(tmp_path / "c.gguf", src, add_bos=True), tmp_path / "bos")
    t_bos = AutoTokenizer.from_pretrained(bos)
    assert t_bos("hi")["input_ids"][0] == t_bos.bos_token_id == 1
    assert t_bos("hi", add_special_tokens=False)["input_ids"][0] != 1
    from compress.tokenizer import genai_caveats

    # onnxruntime-genai ignores the digit split: said where the vocabulary makes it matter, only there
    assert genai_caveats((smollm / "tokenizer.json").read_text()) and not genai_caveats((gpt2 / "tokenizer.json").read_text())
    assert not genai_caveats((bos / "tokenizer.json").read_text())  # no multi-character digit tokens
    with pytest.raises(UserError, match="pre-tokenizer 'mystery' is not supported"):
        _convert(_write_gguf_tokenizer(tmp_path / "d.gguf", src, pre="mystery"), tmp_path / "bad")


# ---------------------------------------------------------------------- the consumers, tiny model


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dir, tmp_path_factory):
    from exporters.onnx.export import export_model

    out = tmp_path_factory.mktemp("consumers") / "onnx"
    out.mkdir()
    export_model(tiny_dir, out)
    return out


def _torch_greedy(folder: Path, text: str, n: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _genai_tokenizer(folder: Path):
    og = pytest.importorskip("onnxruntime_genai")
    return og.Tokenizer(og.Model(str(folder)))


def test_tiny_export_tokenizes_alike_in_transformers_and_genai(tiny_onnx, tiny_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_onnx)
    source = AutoTokenizer.from_pretrained(tiny_dir)
    ids = hf(MIXED)["input_ids"]
    assert ids == source(MIXED)["input_ids"] and hf.decode(ids) == MIXED
    tok = _genai_tokenizer(tiny_onnx)
    assert [int(i) for i in tok.encode(MIXED)] == ids
    assert tok.decode(ids) == MIXED
    rendered = tok.apply_chat_template(json.dumps(CHAT), add_generation_prompt=True)
    assert rendered == hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert [int(i) for i in tok.encode(rendered)] == hf(rendered)["input_ids"]


def test_tiny_export_generates_from_text_in_genai_like_pytorch(tiny_onnx, tiny_dir):
    # (the random model's tokens are byte pieces of no valid UTF-8: texts are compared on the real model)
    got, _ = genai_generate(tiny_onnx, "The quick brown fox", 12)
    assert got == _torch_greedy(tiny_dir, "The quick brown fox", 12)


def test_tiny_export_is_a_first_class_optimum_model(tiny_onnx, tiny_dir):
    got, warned = optimum_generate(tiny_onnx, "The quick brown fox", 12)
    assert got == _torch_greedy(tiny_dir, "The quick brown fox", 12)
    assert not [w for w in warned if "legacy" in w.lower() or "position_ids" in w], warned


def test_position_ids_drive_the_rotary_positions(tiny_onnx):
    """The position_ids input is used (not just accepted): a decode step at another position
    gives other logits, and the plain-ORT runner feeds consecutive positions."""
    import numpy as np
    import onnxruntime as ort

    from exporters.onnx.runtime import Decoder

    dec = Decoder(tiny_onnx)
    assert dec.has_position_ids
    sess = ort.InferenceSession(str(tiny_onnx / "model.onnx"))
    info = dec.info
    ids = np.array([[5, 17, 33, 2, 90]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(5)[None]}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
    names = [o.name for o in sess.get_outputs()]
    present = dict(zip(names, sess.run(None, feeds)))
    step = {"input_ids": np.array([[41]]), "attention_mask": np.ones((1, 6), np.int64)}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            step[f"past_key_values.{i}.{kind}"] = present[f"present.{i}.{kind}"]
    at5 = sess.run(["logits"], {**step, "position_ids": np.array([[5]])})[0]
    at9 = sess.run(["logits"], {**step, "position_ids": np.array([[9]])})[0]
    assert np.abs(at5 - at9).max() > 1e-3
    whole = dec.logits(np.array([[5, 17, 33, 2, 90, 41]]))
    np.testing.assert_allclose(at5[0, -1], whole[0, -1], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- the consumers, real model


@pytest.fixture(scope="module")
def real_onnx(tmp_path_factory):
    from compress import api

    out = tmp_path_factory.mktemp("real") / "onnx"
    api.export(None, out, quiet=True)
    return out


@pytest.mark.slow
def test_real_tokenizer_gives_llama_cpp_ids_in_every_consumer(real_onnx):
    from transformers import AutoTokenizer

    from compress.models import model_folder
    from compress.sources import resolve_source_ref

    for folder in (model_folder(resolve_source_ref(None)), real_onnx):
        hf = AutoTokenizer.from_pretrained(folder)
        assert hf(MIXED)["input_ids"] == LLAMA_CPP_MIXED, folder  # no BOS added: the GGUF says add_bos false
        assert hf.decode(LLAMA_CPP_MIXED) == MIXED
        chat = hf(hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False))["input_ids"]
        assert chat[-len(LLAMA_CPP_CHAT_TAIL):] == LLAMA_CPP_CHAT_TAIL
    tok = _genai_tokenizer(real_onnx)
    assert [int(i) for i in tok.encode(MIXED)] == LLAMA_CPP_MIXED
    assert tok.decode(LLAMA_CPP_MIXED) == MIXED
    rendered = tok.apply_chat_template(json.dumps(CHAT), add_generation_prompt=True)
    assert [int(i) for i in tok.encode(rendered)][-len(LLAMA_CPP_CHAT_TAIL):] == LLAMA_CPP_CHAT_TAIL


@pytest.mark.slow
def test_real_export_generates_from_text_like_pytorch_in_genai_and_optimum(real_onnx):
    """What a user sees: "The capital of France is" continued from text, greedy, in each runtime."""
    from compress.models import model_folder
    from compress.sources import resolve_source_ref

    n = 16
    expected = _torch_greedy(model_folder(resolve_source_ref(None)), PROMPT, n)
    got, text = genai_generate(real_onnx, PROMPT, n)
    assert got == expected and text.startswith(" Paris"), text
    # optimum in a fresh process, as a user runs it: its stderr must not call the model legacy
    code = (
        "import sys, json\n"
        "from optimum.onnxruntime import ORTModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        "m = ORTModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "e = t(sys.argv[2], return_tensors='pt')\n"
        "o = m.generate(**e, max_new_tokens=int(sys.argv[3]), min_new_tokens=int(sys.argv[3]), do_sample=False)\n"
        "print(json.dumps(o[0, e['input_ids'].shape[1]:].tolist()))\n"
    )
    pytest.importorskip("optimum.onnxruntime")
    proc = subprocess.run([sys.executable, "-c", code, str(real_onnx), PROMPT, str(n)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
    assert "legacy" not in proc.stderr.lower() and "position_ids" not in proc.stderr, proc.stderr[-2000:]


def test_configs_read_alike_under_both_transformers_majors(tiny_dir, tmp_path):
    """transformers 5 writes RoPE as ``rope_parameters`` only, which transformers 4 ignores (falling back
    to rope_theta 10000: a silently different model). Folders we write carry both forms, and we read
    either form with the right rope_theta."""
    import shutil

    from compress.models import load_model, portable_config_

    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 8]])
    with torch.no_grad():
        ref = load_model(tiny_dir)(ids).logits
    v5 = tmp_path / "v5"
    shutil.copytree(tiny_dir, v5)
    cfg = json.loads((v5 / "config.json").read_text())
    theta = 12345.0  # not any default: a fallback would show
    for key in ("rope_theta", "rope_scaling"):
        cfg.pop(key, None)
    cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (v5 / "config.json").write_text(json.dumps(cfg))
    m = load_model(v5)
    assert getattr(m.config, "rope_theta", None) == theta or m.config.rope_parameters["rope_theta"] == theta
    with torch.no_grad():
        assert not torch.allclose(m(ids).logits, ref)  # another theta, another model: the key was read
    portable_config_(v5)
    written = json.loads((v5 / "config.json").read_text())
    assert written["rope_theta"] == theta and written["rope_scaling"] is None
    assert written["rope_parameters"]["rope_theta"] == theta
    with torch.no_grad():
        torch.testing.assert_close(load_model(v5)(ids).logits, m(ids).logits, rtol=0, atol=0)
