"""AmoebaLLM (issue 19): the DP layer table, FLAP widths, the mixture of LoRAs and subnet extraction."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress.passes.amoeba.dp import DPResult, LossMetric, dp_layer_selection
from compress.passes.amoeba.flap import flap_widths, width_shape
from compress.passes.amoeba.smol import SMoL
from compress.passes.amoeba.subnet import Supernet
from compress.arch import arch_of
from compress.models import config_from_dict
from tiny import make_model

V = 96


def _model(layers: int = 6, seed: int = 0, hidden: int = 80):
    """6 query heads in 2 key/value groups of head_dim 16 on a residual width of 80: not a multiple of
    the heads, as after PAT (transformers 5 refuses such a config unless built past its check)."""
    from transformers import LlamaForCausalLM

    base = make_model(V, seed, num_hidden_layers=1).config.to_dict()
    base.update(num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, hidden_size=hidden)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config_from_dict(base))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def _blocks(n: int = 8, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


class Additive:
    """A metric that is a sum of per-layer costs: the DP recurrence is then exact."""

    def __init__(self, costs):
        self.costs, self.calls = costs, 0

    def level(self, first):
        pass

    def score(self, removed):
        self.calls += 1
        return sum(self.costs[i] for i in removed)


@pytest.mark.parametrize("seed", range(5))
def test_dp_equals_brute_force_on_an_additive_metric(seed):
    g = torch.Generator().manual_seed(seed)
    L, min_layers, keep_last = 7, 3, 1
    costs = torch.rand(L, generator=g).tolist()
    metric = Additive(costs)
    res = dp_layer_selection(L, min_layers, metric, keep_last=keep_last)
    for m in range(1, L - min_layers + 1):
        best = min(itertools.combinations(range(L - keep_last), m), key=lambda s: sum(costs[i] for i in s))
        assert res.removed[m] == tuple(sorted(best))
        assert res.scores[m] == pytest.approx(sum(costs[i] for i in best))
        assert L - 1 not in res.removed[m]  # the last layer is kept
    n, M = L - keep_last, L - min_layers
    assert res.evaluations == metric.calls == 1 + sum(min(k, M) for k in range(1, n + 1))
    assert DPResult.from_json(res.to_json()).removed == res.removed


def _bypassed_loss(model, blocks, removed):
    """The loss of ``model`` with ``removed`` layers bypassed, computed from scratch."""
    arch = arch_of(model)
    layers = arch.decoder_layers(model)
    keep = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in removed])
    inner = arch.inner(model)
    inner.layers, n = keep, model.config.num_hidden_layers
    model.config.num_hidden_layers = len(keep)
    try:
        with torch.no_grad():
            out = model(input_ids=blocks, labels=blocks, use_cache=False)
    finally:
        inner.layers, model.config.num_hidden_layers = layers, n
    return float(out.loss)


def test_the_loss_metric_starts_each_level_where_its_candidates_differ_and_equals_a_full_forward():
    model, blocks = _model(), _blocks()
    metric = LossMetric(model, blocks, batch=3)
    res = dp_layer_selection(6, 3, metric, keep_last=1)
    assert res.scores[0] == pytest.approx(_bypassed_loss(model, blocks, set()), rel=1e-5)
    for m, removed in res.removed.items():
        assert len(removed) == m
        assert res.scores[m] == pytest.approx(_bypassed_loss(model, blocks, set(removed)), rel=1e-5)
    with pytest.raises(ValueError):
        dp_layer_selection(6, 0, metric)


def test_width_shapes_round_to_whole_heads_per_group_and_to_32_channels():
    assert width_shape(1.0, num_heads=9, num_kv_heads=3, intermediate=1536) .heads_per_group == 3
    s = width_shape(0.75, num_heads=9, num_kv_heads=3, intermediate=1536)
    assert (s.heads_per_group, s.intermediate) == (2, 1152)
    s = width_shape(0.625, num_heads=9, num_kv_heads=3, intermediate=1536)
    assert (s.heads_per_group, s.intermediate) == (2, 960)
    assert width_shape(0.01, num_heads=9, num_kv_heads=3, intermediate=1536).intermediate == 32


def _supernet(model, blocks, smol: bool = True, seed: int = 0, masks=None):
    res = dp_layer_selection(6, 3, LossMetric(model, blocks, batch=4), keep_last=1)
    cfg = model.config
    widths = [width_shape(f, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                          intermediate=cfg.intermediate_size) for f in (1.0, 0.67, 0.34)]
    plan = flap_widths(model, blocks)
    mix = None
    if smol:
        arch = arch_of(model)
        mix = SMoL(model, arch.linear_names(model), num_layers=6, num_widths=len(widths), experts=5, rank=4,
                   alpha=8.0, seed=seed, masks=masks)
        with torch.no_grad():  # trained-looking adapters, so the merge is tested
            g = torch.Generator().manual_seed(seed + 7)
            for e in mix.experts:
                e.B.normal_(0, 0.05, generator=g)
            for p in mix.router.parameters():
                p.normal_(0, 1.0, generator=g)
        mix.attach(model)
        model.add_module("amoeba_smol", mix)
    return Supernet(model, res, widths, plan, mix)


def test_flap_keeps_whole_heads_per_group_and_the_best_channels():
    model, blocks = _model(), _blocks()
    plan = flap_widths(model, blocks)
    assert len(plan) == 6
    for p in plan:
        heads = p.kept_heads(2)
        assert heads.tolist() == sorted(heads.tolist())
        assert [int(h) // 3 for h in heads] == [0, 0, 1, 1]  # two query heads of each key/value group
        best = [int(torch.argmax(p.head_scores[g * 3:(g + 1) * 3])) + 3 * g for g in range(2)]
        assert set(best) <= set(heads.tolist())
        top = set(torch.topk(p.channel_scores, 64).indices.tolist())
        assert set(p.kept_channels(64).tolist()) == top


@pytest.mark.parametrize("smol", [False, True])
def test_extracted_subnet_logits_equal_the_supernet_running_it(smol):
    torch.manual_seed(0)
    model, blocks = _model(), _blocks()
    net = _supernet(model, blocks, smol=smol)
    ids = _blocks(2, 20, seed=5)
    for depth, width in [(6, 0), (5, 1), (4, 2), (3, 1)]:
        sub = net.subnet(depth, width)
        with torch.no_grad(), net.use(sub):
            want = model(input_ids=ids, use_cache=False).logits
        small, _ = net.extract(sub)
        with torch.no_grad():
            got = small(input_ids=ids, use_cache=False).logits
        assert small.config.num_hidden_layers == depth
        assert small.config.intermediate_size == net.widths[width].intermediate
        assert small.config.num_attention_heads == 2 * net.widths[width].heads_per_group
        assert torch.allclose(got, want, atol=1e-4), (depth, width, (got - want).abs().max())
    # the supernet is itself again outside `use`
    assert model.config.num_hidden_layers == 6 and len(arch_of(model).decoder_layers(model)) == 6


def test_kv_index_remap_lets_a_subnet_generate_with_a_cache_as_its_extraction_does():
    model, blocks = _model(), _blocks()
    net = _supernet(model, blocks)
    sub = net.subnet(4, 1)
    prompt = _blocks(1, 6, seed=9)
    with torch.no_grad(), net.use(sub):
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    small, _ = net.extract(sub)
    with torch.no_grad():
        got = small.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert got.tolist() == want.tolist()


def test_router_is_deterministic_at_evaluation_and_noisy_in_training():
    model, blocks = _model(), _blocks()
    net = _supernet(model, blocks)
    sub = net.subnet(4, 1)
    a = net.smol.router(sub.layers, sub.width).detach()
    b = net.smol.router(sub.layers, sub.width).detach()
    assert torch.equal(a, b) and int((a > 0).sum()) == 2 and float(a.sum()) == pytest.approx(1.0)
    noisy = [net.smol.router(sub.layers, sub.width, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(not torch.equal(n, a) for n in noisy)
    assert torch.equal(net.smol.router(sub.layers, sub.width, torch.Generator().manual_seed(3)), noisy[3])


def test_a_sparse_parent_stays_exactly_sparse_through_the_merge():
    model, blocks = _model(), _blocks()
    arch = arch_of(model)
    g = torch.Generator().manual_seed(3)
    masks = {}
    with torch.no_grad():
        for name in arch.linear_names(model):
            lin = model.get_submodule(name)
            masks[name] = torch.rand(lin.weight.shape, generator=g) > 0.5
            lin.weight.mul_(masks[name])
    net = _supernet(model, blocks, masks=masks)
    sub = net.subnet(4, 1)
    ids = _blocks(2, 16, seed=4)
    with torch.no_grad(), net.use(sub):
        want = model(input_ids=ids, use_cache=False).logits
    small, new_masks = net.extract(sub, masks)
    assert len(new_masks) == 4 * 7
    for name, m in new_masks.items():
        w = small.get_submodule(name).weight
        assert w.shape == m.shape and bool((w[~m] == 0).all())
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids, use_cache=False).logits, want, atol=1e-4)
