"""The data-generation decode loop: the same greedy tokens as transformers' generate, a cache that
outgrows its first buffer, finished rows leaving the batch, seeded nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from compress.generation import generate, new_cache, next_tokens


def _model_and_batch(tiny_dir):
    from compress.models import load_model

    model = load_model(tiny_dir).eval()
    torch.manual_seed(3)
    lengths = [5, 9, 3, 12]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):  # left-padded, as data generation pads
        ids[r, width - n:] = torch.randint(5, model.config.vocab_size, (n,))
        mask[r, width - n:] = 1
    return model, ids, mask


def _hf(model, ids, mask, n, eos):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:].tolist()
    rows = []
    for r in out:
        cut = next((i for i, t in enumerate(r) if t == eos), len(r) - 1)
        rows.append(r[:cut + 1])
    return rows


def test_greedy_matches_transformers_generate_past_the_first_buffer_and_with_rows_leaving(tiny_dir):
    model, ids, mask = _model_and_batch(tiny_dir)
    n = 90  # the cache's first buffer holds prompt + 64: it must grow once
    plain = generate(model, ids, mask, max_new_tokens=n, eos_ids=[])
    assert [len(r) for r in plain] == [n] * 4
    assert plain == _hf(model, ids, mask, n, eos=model.config.vocab_size + 7)  # an id never emitted
    # an EOS that rows emit at different steps: those rows leave, the others continue unchanged
    eos = plain[1][20]
    ours = generate(model, ids, mask, max_new_tokens=n, eos_ids=[eos])
    assert ours == _hf(model, ids, mask, n, eos)
    ends = [len(r) for r in ours]
    assert min(ends) < n and ours[1][-1] == eos
    for r, row in enumerate(ours):
        assert row == plain[r][:len(row)]  # leaving rows do not disturb the rest


def test_growing_cache_reads_as_a_dynamic_cache(tiny_dir):
    from compress.models import load_model

    model = load_model(tiny_dir)
    cache = new_cache(model)
    layer = cache.layers[0]
    k = torch.randn(2, 1, 70, 8)
    layer.update(k, k + 1)
    for i in range(80):
        step = torch.full((2, 1, 1, 8), float(i))
        keys, values = layer.update(step, step + 1)
    assert keys.shape == (2, 1, 150, 8) and layer.get_seq_length() == 150
    assert torch.equal(keys[:, :, :70], k) and torch.equal(values[:, :, -1], torch.full((2, 1, 8), 80.0))
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape == (1, 1, 150, 8) and torch.equal(layer.keys[0, :, :70], k[1])


def test_nucleus_sampling_is_seeded_and_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draw = lambda seed, **kw: [int(next_tokens(logits, sample=True, generator=torch.Generator().manual_seed(seed + i),
                                               **kw)) for i in range(4000)]
    assert draw(1, top_p=0.7) == draw(1, top_p=0.7)
    counts = torch.bincount(torch.tensor(draw(1, top_p=0.7)), minlength=4).float() / 4000
    # nucleus at 0.7 = {0.5, 0.3}, renormalized to 0.625 / 0.375
    assert counts[2] == 0 and counts[3] == 0 and abs(counts[0] - 0.625) < 0.03
    counts = torch.bincount(torch.tensor(draw(2, top_p=1.0, temperature=2.0)), minlength=4).float() / 4000
    p = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts, p, atol=0.03)
    assert all(t == 0 for t in draw(3, top_p=1e-6))  # a vanishing nucleus is the argmax
    assert int(next_tokens(logits)) == 0


def test_sampled_rows_stop_at_any_stop_id(tiny_dir):
    model, ids, mask = _model_and_batch(tiny_dir)
    a = generate(model, ids, mask, max_new_tokens=40, eos_ids=[], sample=True, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(0))
    b = generate(model, ids, mask, max_new_tokens=40, eos_ids=[], sample=True, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(0))
    assert a == b
    stops = [a[0][5], a[2][9]]
    c = generate(model, ids, mask, max_new_tokens=40, eos_ids=stops, sample=True, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(0))
    # the first stop ends its row at step 6 at the latest (rows that leave change the others' draws)
    assert c[0][-1] in stops and len(c[0]) <= 6
    for row in c:  # every row ends at its first stop id, or runs the full length
        assert all(t not in stops for t in row[:-1]) and (row[-1] in stops or len(row) == 40)


@pytest.mark.parametrize("eos,gen_eos,expected", [(2, None, [2]), (2, [2, 7], [2, 7]), (None, 5, [5])])
def test_stop_ids_join_the_tokenizer_and_the_generation_config(eos, gen_eos, expected):
    from types import SimpleNamespace

    from compress.data import stop_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen_eos))
    assert stop_ids(model, SimpleNamespace(eos_token_id=eos)) == expected
