import json

import pytest
import torch

from compress.config import DataConfig
from compress.data import (
    ensure_self_data, pack_blocks, read_documents, self_data_spec, token_stream, tokenize_document, user_data_spec,
)
from compress.errors import UserError
from compress.models import load_model, load_tokenizer
from compress.prompts import prompt_set, split_prompts


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def test_jsonl_text_and_messages_and_folder(tmp_path, tok):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("plain text here")
    (d / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "row text"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
    )
    (d / "ignored.bin").write_bytes(b"\x00")
    docs = read_documents(user_data_spec(d, "train"))
    assert docs[0] == "plain text here" and docs[1] == "row text" and isinstance(docs[2], list)
    ids = tokenize_document(docs[2], tok)
    assert ids[-2:] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"][-2:]  # EOS kept
    assert tok.eos_token_id in ids


def test_unfinished_answers_do_not_end_with_eos(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cut off", "unfinished": True}]
    ids = tokenize_document(msgs, tok)
    assert ids.count(tok.eos_token_id) == 1  # only the user turn's end
    assert tok.decode(ids).endswith("cut off")


def test_bad_jsonl_lines_name_the_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "a"}\n{"foo": 1}\n')
    with pytest.raises(UserError, match=r"x.jsonl:2: expected an object"):
        read_documents(user_data_spec(f, "train"))
    f.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(UserError, match="x.jsonl:1"):
        read_documents(user_data_spec(f, "train"))


def test_fingerprint_follows_content(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("one")
    a = user_data_spec(f, "train").fingerprint
    f.write_text("two")
    assert user_data_spec(f, "train").fingerprint != a


def test_stream_and_packing(tok):
    stream = token_stream(["aaa bbb", "ccc"], tok)
    assert tok.eos_token_id in stream.tolist()  # documents separated by EOS
    blocks = pack_blocks(torch.arange(103), 10)
    assert blocks.shape == (10, 10) and torch.equal(blocks.flatten(), torch.arange(100))
    with pytest.raises(UserError, match="fewer than one block"):
        pack_blocks(torch.arange(5), 10)


def test_prompt_set_split_is_disjoint_and_stable():
    import hashlib

    from compress.prompts import HELDOUT_SET_VERSION, article_prompts, is_article

    train, held = split_prompts(10_000, 10_000)
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(prompt_set()) + len(article_prompts()) and len(held) >= 32
    assert split_prompts(5, 3) == (train[:5], held[:3])
    assert "What is the capital of France?" not in prompt_set()
    # the held-out prompts (the `answers` domain) are version 2's, exactly: articles train only
    assert not any(is_article(p) for p in held)
    assert HELDOUT_SET_VERSION == 2 and hashlib.sha256("\n".join(held).encode()).hexdigest()[:16] == "512efd12fcc3cff0"
    # every fourth training prompt is an article, from the first four on
    assert [is_article(p) for p in train[:8]] == [False, False, False, True] * 2
    assert sum(map(is_article, train[:400])) == 100


def test_self_data_is_generated_once_and_cached(tiny_dir, tok):
    cfg = DataConfig(num_prompts=5, eval_prompts=3, max_new_tokens=8, generation_batch_size=2)
    spec = self_data_spec("tiny", cfg, "eval")
    assert spec.fingerprint != self_data_spec("tiny", cfg, "train").fingerprint
    assert spec.fingerprint != self_data_spec("tiny", DataConfig.from_dict({**cfg.to_dict(), "max_new_tokens": 9}), "eval").fingerprint
    said = []
    path = ensure_self_data(spec, cfg, load_model(tiny_dir), tok, log=said.append)
    assert len(said) == 1 and "3 answers — once" in said[0] and str(path.parent) in said[0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert 1 <= len(rows) <= 3
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    held = split_prompts(5, 3)[1]
    assert {r["messages"][0]["content"] for r in rows} <= set(held)
    mtime = path.stat().st_mtime_ns
    ensure_self_data(spec, cfg, None, tok, log=said.append)  # no model needed: cache hit, nothing said
    assert path.stat().st_mtime_ns == mtime and len(said) == 1
    assert len(read_documents(spec)) == len(rows)


def test_prompt_set_covers_every_kind_in_any_prefix():
    from compress.prompts import KIND_SHARES, _kinds

    from compress.prompts import is_article

    kinds = _kinds()
    kind_of = {p: i for i, k in enumerate(kinds) for p in k}
    train = [p for p in split_prompts(120, 0)[0] if not is_article(p)]
    assert len(train) == 90  # and 30 articles
    counts = [sum(kind_of[p] == i for p in train) for i in range(len(kinds))]
    total = sum(KIND_SHARES)
    for i, c in enumerate(counts):  # code, technical, narrative/dialogue, lists, math all present in 90
        assert abs(c - 90 * KIND_SHARES[i] / total) <= 2, (i, counts)


def test_self_data_is_sized_to_the_passes_needs():
    from compress.data import TOKENS_PER_ANSWER, self_prompt_count

    cfg = DataConfig(max_new_tokens=256)
    per = TOKENS_PER_ANSWER[0] + TOKENS_PER_ANSWER[1] * 256
    assert self_prompt_count(cfg, 84) == -(-84 * 512 // int(per))  # 4 held out + max(32 calibration, 40 x 2)
    assert self_prompt_count(cfg, 10) == 64  # a floor for variety
    assert self_prompt_count(cfg, 10**6) == len(split_prompts(10**9, 0)[0])  # at most the training half
    assert self_prompt_count(DataConfig(num_prompts=7), 10**6) == 7  # an explicit count wins
    a, b = (self_data_spec("m", cfg, "train", n) for n in (84, 200))
    assert a.fingerprint != b.fingerprint and a.prompts < b.prompts
    # the evaluation answers do not depend on how the training answers are sampled
    other = DataConfig(sampled=0.0, temperature=1.0)
    assert self_data_spec("m", cfg, "eval").fingerprint == self_data_spec("m", other, "eval").fingerprint
    assert self_data_spec("m", cfg, "train", 84).fingerprint != self_data_spec("m", other, "train", 84).fingerprint
    from compress.passes.quantize.config import QuantizeConfig

    q = QuantizeConfig.from_dict({"calibration_blocks": 32, "heldout_blocks": 4, "steps": 40, "batch_size": 2})
    assert q.training_sequences() == 84


def test_half_the_training_prompts_are_sampled_and_sampling_is_seeded(tiny_dir, tok):
    from compress.data import generate_answers, sampled_indices

    assert sampled_indices(10, 0.5) == {1, 3, 5, 7, 9} and sampled_indices(4, 0.0) == set()
    assert len(sampled_indices(1000, 0.3)) == 300
    model = load_model(tiny_dir)
    cfg = DataConfig(max_new_tokens=12, generation_batch_size=2, temperature=1.0)
    prompts = split_prompts(4, 0)[0]
    greedy = generate_answers(model, tok, prompts, cfg)
    one = generate_answers(model, tok, prompts, cfg, sampled={0, 1, 2, 3})
    assert one == generate_answers(model, tok, prompts, cfg, sampled={0, 1, 2, 3})  # seeded
    assert one != greedy
    assert generate_answers(model, tok, prompts, DataConfig(**{**cfg.to_dict(), "seed": 1}), sampled={0, 1, 2, 3}) != one
    # an encyclopedia article's answer is kept as plain prose (a document without the chat wrapper)
    assert [("text" in r, "messages" in r) for r in greedy] == [(False, True)] * 3 + [(True, False)]
    assert greedy[3]["prompt"] == prompts[3] and greedy[3]["text"] == greedy[3]["text"].strip()


def test_user_text_is_mixed_with_the_teachers_in_every_prefix():
    from compress.data import mix_blocks

    user = torch.zeros(9, 4, dtype=torch.long)
    own = torch.ones(5, 4, dtype=torch.long)
    mixed = mix_blocks(user, own, 0.25)
    flags = mixed[:, 0].tolist()
    assert len(flags) == 14 and sum(flags) == 5
    for n in range(4, 13):  # every prefix holds about a quarter of the teacher's text, until it runs out
        assert abs(sum(flags[:n]) - 0.25 * n) <= 1 or sum(flags[:n]) == 5
    with pytest.raises(UserError, match="data.mix"):
        DataConfig(mix=1.0)
