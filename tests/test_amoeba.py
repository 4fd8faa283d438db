"""AmoebaLLM (issue 19): the DP layer table, FLAP widths, the mixture of LoRAs and subnet extraction."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from compress.passes.amoeba.dp import DPResult, LossMetric, dp_layer_selection
from compress.passes.amoeba.flap import flap_widths, width_shape
from compress.passes.amoeba.smol import SMoL
from compress.passes.amoeba.subnet import Supernet
from compress.arch import arch_of
from compress.models import config_from_dict
from conftest import killed_during_training, run_cli
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


class Dies(Additive):
    """Additive, killed at its ``at``-th evaluation."""

    def __init__(self, costs, at):
        super().__init__(costs)
        self.at = at

    def score(self, removed):
        if self.calls + 1 == self.at:
            raise KeyboardInterrupt
        return super().score(removed)


def test_a_killed_dp_resumes_at_its_next_level_and_ends_as_an_uninterrupted_one(tmp_path):
    costs = torch.rand(9, generator=torch.Generator().manual_seed(4)).tolist()
    ref = dp_layer_selection(9, 4, Additive(costs), keep_last=1)
    state = tmp_path / "dp.json"
    with pytest.raises(KeyboardInterrupt):
        dp_layer_selection(9, 4, Dies(costs, 17), keep_last=1, state=state, fingerprint="a")
    done = json.loads(state.read_text())["evaluations"]
    again = Additive(costs)
    res = dp_layer_selection(9, 4, again, keep_last=1, state=state, fingerprint="a")
    assert res.removed == ref.removed and res.scores == ref.scores and res.evaluations == ref.evaluations
    assert 1 < done < 17 and again.calls == ref.evaluations - done  # only the levels not yet finished
    other = Additive(costs)
    dp_layer_selection(9, 4, other, keep_last=1, state=state, fingerprint="b")  # another run's state: ignored
    assert other.calls == ref.evaluations


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


def test_dp_on_the_tiny_model_against_brute_force():
    """With the real loss the DP is a heuristic, except for one removal (it then tries every layer):
    its single-layer pick is the brute-force best, and no removal set it returns scores below the
    brute-force optimum of its size (a scoring that disagreed with a from-scratch forward would)."""
    model, blocks = _model(), _blocks()
    res = dp_layer_selection(6, 3, LossMetric(model, blocks, batch=4), keep_last=1)
    for m in (1, 2, 3):
        scores = {c: _bypassed_loss(model, blocks, set(c)) for c in itertools.combinations(range(5), m)}
        best = min(scores, key=scores.get)
        if m == 1:
            assert res.removed[1] == best
        assert res.scores[m] >= scores[best] - 1e-5
        assert res.scores[m] == pytest.approx(scores[res.removed[m]], rel=1e-5)


def test_the_loss_metric_on_every_nth_position_is_the_loss_on_those_positions():
    model, blocks = _model(), _blocks()
    metric = LossMetric(model, blocks, batch=3, stride=3)
    metric.level(2)
    removed = frozenset({3})
    arch = arch_of(model)
    layers = arch.decoder_layers(model)
    inner = arch.inner(model)
    inner.layers = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in removed])
    model.config.num_hidden_layers = 5
    try:
        with torch.no_grad():
            logits = model(input_ids=blocks, use_cache=False).logits
    finally:
        inner.layers, model.config.num_hidden_layers = layers, 6
    pos = torch.arange(blocks.shape[1] - 2, -1, -3).flip(0)
    want = torch.nn.functional.cross_entropy(logits[:, pos].reshape(-1, V), blocks[:, pos + 1].reshape(-1))
    assert metric.score(removed) == pytest.approx(float(want), rel=1e-5)
    assert pos[-1] == blocks.shape[1] - 2 and pos[1] - pos[0] == 3


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


def test_a_narrowed_sparse_model_loads_with_its_masks_beside_it(tmp_path):
    """A hidden size that is not a multiple of the heads (PAT's) is loaded past transformers 5's
    check from its weight files only: a sparse stage's masks.safetensors (module names, no
    ``.weight``) is not a weight file (the real edge chain's sparse_ft stage failed on it)."""
    from compress.masks import write_masks
    from compress.models import load_model, save_model

    model = _model(layers=2)
    masks = {name: torch.ones_like(model.get_submodule(name).weight, dtype=torch.bool)
             for name in arch_of(model).linear_names(model)}
    save_model(model, tmp_path)
    write_masks(tmp_path, masks)
    ids = _blocks(1, 8)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------- the passes, through the pipeline

EDGE = str(Path(__file__).parent / "profiles" / "edge-tiny.yaml")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny4") / "model", num_hidden_layers=4)


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """The edge chain on a tiny model: pat -> sparse_ft -> amoeba -> pick -> quantize -> export. Its
    6 query heads in 2 groups on a width of 96 make PAT's 32 a width that is not a multiple of the
    heads, as 448 is not of SmolLM2's 9: every stage loads and saves a narrowed model."""
    from compress import api
    from tiny import CORPUS, save_tiny

    model = save_tiny(tmp_path_factory.mktemp("tiny6") / "model", num_hidden_layers=4, hidden_size=96,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    text = tmp_path_factory.mktemp("text") / "corpus.txt"
    text.write_text(CORPUS)
    out = tmp_path_factory.mktemp("edge") / "run"
    rep = api.run(api.plan(str(model), EDGE, data=str(text), eval_data=str(text)), out, quiet=True)
    return out, rep


def _stage(rep, name):
    return next(s for s in rep["stages"] if s["name"].endswith(name))


def test_edge_chain_keeps_every_invariant_and_the_pick_matches_its_row(edge_run):
    from compress.artifact import read_artifact
    from compress.masks import read_masks

    out, rep = edge_run
    sup = read_artifact(out / "stages" / "03-amoeba")
    rows = sup.manifest["metrics"]["subnets"]
    assert [(r["depth"], r["width"]) for r in rows] == [(d, w) for d in (4, 3, 2) for w in (1.0, 0.75, 0.5)]
    assert sum(r["latency_measured"] for r in rows) == 3
    assert all(r["perplexity"] > 1 and r["ms_per_token"] > 0 and r["size_mb"] > 0 for r in rows)
    shape = sup.manifest["invariants"]["shape"]
    assert shape["hidden_size"] == 32 and shape["num_heads"] == 6  # PAT's width, not a multiple of the heads
    pick = read_artifact(out / "stages" / "04-pick")
    row = pick.manifest["metrics"]["pick"]["row"]
    best = min(rows, key=lambda r: r["perplexity"])
    assert (row["depth"], row["width"]) == (best["depth"], best["width"])  # the budget admits every point
    assert row["latency_measured"]
    # the runner's evaluation of the extracted subnet is its row (same text, same windows)
    assert _stage(rep, "pick")["perplexity"] == pytest.approx(row["perplexity"], rel=1e-4)
    inv = pick.manifest["invariants"]
    assert inv["shape"]["hidden_size"] == 32 and inv["shape"]["num_layers"] == row["depth"]
    assert inv["shape"]["intermediate_size"] == row["intermediate_size"]
    masks = read_masks(out / "stages" / "04-pick")
    assert len(masks) == 7 * row["depth"] and inv["sparsity"]["modules"] == len(masks)
    # the parent's masks, sliced with the weights (the runner verified the zeros are exact after the merge)
    from compress.models import load_model
    from compress.passes.amoeba.flap import head_channels

    parent_masks = read_masks(out / "stages" / "02-sparse_ft")
    net = load_model(out / "stages" / "03-amoeba").supernet
    for j, i in enumerate(row["layers"]):
        heads, channels = net.kept(i, row["width_index"])
        cols = head_channels(heads, 16)
        old, new = f"model.layers.{i}.", f"model.layers.{j}."
        assert torch.equal(masks[new + "self_attn.q_proj"], parent_masks[old + "self_attn.q_proj"][cols])
        assert torch.equal(masks[new + "self_attn.o_proj"], parent_masks[old + "self_attn.o_proj"][:, cols])
        assert torch.equal(masks[new + "mlp.down_proj"], parent_masks[old + "mlp.down_proj"][:, channels])
        assert torch.equal(masks[new + "self_attn.k_proj"], parent_masks[old + "self_attn.k_proj"])
    q = read_artifact(out / "stages" / "05-quantize")
    assert q.manifest["invariants"]["sparsity"]["fraction"] == inv["sparsity"]["fraction"]
    export = read_artifact(out / "stages" / "06-export_onnx")
    assert export.manifest["metrics"]["export"]["validation"]["greedy_tokens"] == 16


def test_subnets_list_and_pick_from_the_command_line(edge_run, tmp_path):
    out, _ = edge_run
    r = run_cli("subnets", "list", str(out), "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert len(table["subnets"]) == 9 and table["latency_bits"] == "4"
    text = run_cli("subnets", "list", str(out))
    assert text.returncode == 0 and "| depth | width |" in text.stdout and "*" in text.stdout
    err = table["prediction_error"]["ms_per_token"]
    assert err["points"] == 3 and len(err["per_point"]) == 3 and err["max_abs_error"] >= err["median_abs_error"] >= 0
    assert f"{100 * err['max_abs_error']:.0f} % (worst, d" in text.stdout and "predicted from the other 2" in text.stdout
    measured = [s for s in table["subnets"] if s["latency_measured"]]
    budget = 3 * max(s["ms_per_token"] for s in measured)
    r = run_cli("subnets", "pick", str(out), "--max-ms-per-token", str(budget), "--out", str(tmp_path / "sub"),
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["row"]["latency_measured"] and got["row"]["ms_per_token"] <= budget
    feasible = [s for s in table["subnets"] if s["ms_per_token"] <= budget]
    assert got["row"]["perplexity"] <= min(s["perplexity"] for s in feasible if s["latency_measured"]) + 1e-9
    assert (tmp_path / "sub" / "config.json").is_file() and (tmp_path / "sub" / "masks.safetensors").is_file()
    r = run_cli("subnets", "pick", str(out), "--max-ms-per-token", "1e-6", "--out", str(tmp_path / "none"), "--quiet")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no subnet meets the budget" in r.stderr and "closest: depth" in r.stderr
    assert not (tmp_path / "none").exists()
    r = run_cli("subnets", "list", str(tmp_path))
    assert r.returncode == 2 and "holds no supernet" in r.stderr
    # given the stage itself and no --out: the subnet goes beside the stages, never into the artifact
    r = run_cli("subnets", "pick", str(out / "stages" / "03-amoeba"), "--max-ppl", "1e9", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == str(out / "subnet") and (out / "subnet" / "config.json").is_file()
    assert json.loads(r.stdout)["measured"] == []  # the table's own target: its measurement stands
    # another target than the table's: the pick is measured there before it is taken
    r = run_cli("subnets", "pick", str(out), "--max-ppl", "1e9", "--target", "cpu:2", "--out", str(tmp_path / "t2"),
                "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["measured"]) == 1 and got["measured"][0]["profile"]["threads"] == 2


def _tiny_amoeba(tiny4, tmp_path, **over):
    """The amoeba pass on the tiny model, called directly: (parent, config, context factory)."""
    from compress.artifact import Artifact
    from compress.context import PassContext
    from compress.models import load_model
    from compress.passes.amoeba.config import AmoebaConfig
    from tiny import CORPUS, make_tokenizer

    ids = make_tokenizer()(CORPUS)["input_ids"]
    blocks = torch.tensor(ids[:16 * 32]).reshape(16, 32)
    parent = Artifact(tiny4, {"id": "parent", "format": "hf", "invariants": {}})
    teacher = load_model(tiny4)
    cfg = AmoebaConfig.from_dict(dict(dict(min_layers=2, widths=[1.0, 0.5], dp_sequences=8, dp_seq_len=16,
                                           flap_blocks=4, lora_rank=4, steps=8, lr=1e-3, warmup_steps=1, batch_size=2,
                                           checkpoint_every=2, heldout_blocks=2, latency_points=1, runs=1,
                                           latency_rounds=1, prompt_tokens=4, new_tokens=2, latency_group=32,
                                           bf16="off"), **over))

    def ctx(name):
        (tmp_path / name).mkdir()
        return PassContext(artifact_id=name, out_dir=tmp_path / name, work_dir=tmp_path / f"{name}-work",
                           teacher_path=tiny4, load_teacher=lambda: teacher, training_blocks=lambda: blocks,
                           progress=None, log=lambda m: None)
    return parent, cfg, ctx


def test_an_untrained_supernet_is_the_parent_as_its_full_subnet(tiny4, tmp_path):
    """steps 0 (the one-shot table the benchmark's baselines start from): the experts start at zero,
    so the full subnet is the parent exactly (held-out KL 0) while the smaller ones differ."""
    from compress.passes.amoeba.run import amoeba

    parent, cfg, ctx = _tiny_amoeba(tiny4, tmp_path, steps=0, dp_sequences=6)
    a = amoeba(parent, cfg, ctx("oneshot")).metrics["amoeba"]
    assert a["train"]["steps"] == 0 and a["train"]["history"] == [] and a["sampled_subnets"] == []
    assert a["kl_heldout"] == pytest.approx(0.0, abs=1e-6) and a["kl_heldout_smallest"] > 1e-3
    assert a["kl_heldout_smallest"] == a["kl_heldout_smallest_before"]  # nothing trained
    # another stage of the same parent and DP settings (here: trained) takes the cached DP table
    _, trained, _ = _tiny_amoeba(tiny4, tmp_path, steps=2, dp_sequences=6)
    b = amoeba(parent, trained, ctx("trained")).metrics["amoeba"]
    assert a["dp"]["evaluated_now"] == a["dp"]["evaluations"] - 1 > 0 and b["dp"]["evaluated_now"] == 0
    assert b["dp"]["removed"] == a["dp"]["removed"] and b["dp"]["scores"] == a["dp"]["scores"]


def test_full_tuning_trains_the_base_keeps_a_sparse_parent_exact_and_saves_its_own_base(tiny4, tmp_path):
    """tuning full: every decoder Linear moves (embeddings and norms do not), a sparse parent's zeros
    stay exact in the stage's own base weights (its masks linked beside them), and the stage loads
    back as the model it trained: the loaded full subnet's held-out KL is the pass's. Under the
    default (lora) the base is the parent's file, untouched."""
    from compress.evaluation import heldout_kl, heldout_split
    from compress.masks import read_masks, write_masks
    from compress.models import load_model, save_model
    from compress.passes.amoeba.run import amoeba
    from compress.tokenizer import copy_tokenizer_files
    from safetensors.torch import load_file

    sparse = tmp_path / "sparse"
    model = load_model(tiny4)
    g = torch.Generator().manual_seed(5)
    masks = {}
    with torch.no_grad():
        for name in arch_of(model).linear_names(model):
            w = model.get_submodule(name).weight
            masks[name] = torch.rand(w.shape, generator=g) > 0.5
            w.mul_(masks[name])
    save_model(model, sparse)
    copy_tokenizer_files(tiny4, sparse)
    write_masks(sparse, masks)
    orig = load_file(sparse / "model.safetensors")
    parent, cfg, ctx = _tiny_amoeba(sparse, tmp_path, tuning="full", base_lr=1e-3, steps=4)
    c = ctx("full")
    c.parent_masks = lambda: masks
    a = amoeba(parent, cfg, c).metrics["amoeba"]
    base = load_file(tmp_path / "full" / "model.safetensors")
    linear = {n + ".weight" for n in masks}
    assert base.keys() == orig.keys()
    assert all(not torch.equal(base[k], orig[k]) for k in linear)
    assert all(torch.equal(base[k], orig[k]) for k in orig if k not in linear)
    assert all(int((base[n + ".weight"][~m] != 0).sum()) == 0 for n, m in masks.items())
    assert read_masks(tmp_path / "full").keys() == masks.keys()
    adapters = sum(p.numel() for p in load_model(tmp_path / "full").supernet.smol.parameters())
    assert a["trainable_parameters"] == adapters + sum(m.numel() for m in masks.values())
    held = heldout_split(c.training_blocks(), cfg.heldout_blocks)[1]
    assert heldout_kl(load_model(tmp_path / "full"), c.load_teacher(), held) == pytest.approx(a["kl_heldout"], rel=1e-5)
    assert a["kl_heldout"] > 1e-4  # it trained away from the teacher's copy
    parent, lora, ctx = _tiny_amoeba(sparse, tmp_path, steps=4)
    c = ctx("lora")
    c.parent_masks = lambda: masks
    amoeba(parent, lora, c)
    assert (tmp_path / "lora" / "model.safetensors").read_bytes() == (sparse / "model.safetensors").read_bytes()


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_resumed_amoeba_equals_uninterrupted(tiny4, tmp_path, tuning):
    from compress.passes.amoeba.run import amoeba
    from safetensors.torch import load_file

    parent, cfg, ctx = _tiny_amoeba(tiny4, tmp_path, tuning=tuning)
    ref = amoeba(parent, cfg, ctx("ref"))
    c = ctx("killed")
    killed_during_training(lambda: amoeba(parent, cfg, c), step=5)
    shutil.rmtree(c.out_dir)
    c.out_dir.mkdir()
    res = amoeba(parent, cfg, c)
    a, b = ref.metrics["amoeba"], res.metrics["amoeba"]
    assert b["train"]["resumed_from_step"] == 4 and b["train"]["history"] == a["train"]["history"]
    assert b["sampled_subnets"][-3:] == a["sampled_subnets"][-3:]
    x = load_file(tmp_path / "ref" / "supernet" / "adapters.safetensors")
    y = load_file(tmp_path / "killed" / "supernet" / "adapters.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    x, y = (load_file(tmp_path / run / "model.safetensors") for run in ("ref", "killed"))  # the trained base too
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_amoeba_and_pick_settings_are_refused_at_plan_time(tiny4, tmp_path):
    for sets, message in [(["amoeba.widths=0.5,1.0"], "must start with 1.0"),
                          (["amoeba.min_layers=9"], "exceeds the model's 4 layers"),
                          (["amoeba.depths=4,1"], "outside min_layers"),
                          (["pick.depth=3"], "give depth and width together"),
                          (["amoeba.top_k=9"], "at most experts")]:
        r = run_cli("model", str(tiny4), "--profile", EDGE, "--dry-run", *[a for s in sets for a in ("--set", s)])
        assert r.returncode == 2, (sets, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1, (sets, r.stderr)


def test_squarehead_after_a_stage_that_changes_the_width_or_depth_is_refused_at_plan_time(tiny4, tmp_path):
    r = run_cli("model", str(tiny4), "--profile", EDGE, "--dry-run", "--set", "sparse_ft.squarehead=1")
    assert r.returncode == 2 and "sparse_ft.squarehead" in r.stderr and "hidden size 32" in r.stderr, r.stderr
    prof = tmp_path / "p.yaml"
    prof.write_text("passes:\n  - {name: amoeba, config: {min_layers: 2}}\n  - {name: pick, config: {max_ppl: 100}}\n"
                    "  - {name: quantize, config: {squarehead: 1}}\n")
    r = run_cli("model", str(tiny4), "--profile", str(prof), "--dry-run")
    assert r.returncode == 2 and "quantize.squarehead" in r.stderr and "layer count known only when it runs" in r.stderr
    r = run_cli("model", str(tiny4), "--profile", str(prof), "--dry-run", "--set", "pick.depth=4",
                "--set", "pick.width=1")
    assert r.returncode == 0, r.stderr  # the teacher's depth, asked for


def test_the_report_shows_the_frontier_plot_and_the_pick_example_runs(edge_run, tmp_path):
    import subprocess
    import sys

    out, rep = edge_run
    png = out / "frontier-03-amoeba.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "![size / accuracy / latency frontier of the subnets](frontier-03-amoeba.png)" in (out / "report.md").read_text()
    script = Path(__file__).resolve().parent.parent / "examples" / "pick_subnet.py"
    p = subprocess.run([sys.executable, str(script), str(out), "--max-ppl", "1e9", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "| depth | width |" in p.stdout and "picked depth" in p.stdout and "(measured)" in p.stdout
    p = subprocess.run([sys.executable, str(script), str(out), "--max-size-mb", "1e-9"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and "closest: depth" in p.stderr


def test_a_multi_process_run_of_the_supernet_is_refused_up_front(tiny4, tmp_path):
    r = run_cli("model", str(tiny4), "--profile", EDGE, "--out", str(tmp_path / "run"),
                env={"WORLD_SIZE": "2", "RANK": "0"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "pass amoeba runs in one process" in r.stderr and not (tmp_path / "run").exists()


def test_latency_rounds_interleave_the_points_and_take_each_points_median(monkeypatch, tmp_path):
    """A slow spell hits one round of every point, not one point: three rounds A B A B A B, each
    point's figures the median over its rounds."""
    from compress import formats
    from compress.passes.amoeba import measure
    from compress.profiling import harness
    from compress.target import load_target

    def export(model, src, out, *, bits, group):
        (out / "onnx").mkdir(parents=True)
        (out / "onnx" / "model.onnx.data").write_bytes(b"x" * model)
        return out / "onnx"

    calls, slow = [], {("b", 1): 3.0}  # b's second round ran during a slow spell

    def profile(onnx, target, settings, *, label, log):
        name = "a" if (onnx / "model.onnx.data").stat().st_size == 1000 else "b"
        k = sum(c == name for c in calls)
        calls.append(name)
        ms = {"a": [4.0, 4.4, 4.2], "b": [2.0, 2.2, 2.1]}[name][k] * slow.get((name, k), 1.0)
        return {"token_latency_ms": {"p50": ms}, "ttft_ms": {"median": 10 * ms},
                "decode_tokens_per_second": {"median": 1000 / ms}, "peak_rss_bytes": 5e6, "target": "cpu"}

    monkeypatch.setattr(measure, "export_for_latency", export)
    monkeypatch.setattr(harness, "profile_model", profile)
    monkeypatch.setattr(formats, "weight_bytes", lambda p: sum(f.stat().st_size for f in p.iterdir()))
    made = []
    a, b = measure.measure_latency([("a", lambda: made.append("a") or 1000), ("b", lambda: made.append("b") or 2000)],
                                  tmp_path, load_target("cpu"), bits="4", group=128, prompt_tokens=8, new_tokens=4,
                                  runs=1, rounds=3)
    assert made == ["a", "b"] and calls == ["a", "b"] * 3
    assert a["ms_per_token"] == pytest.approx(4.2) and b["ms_per_token"] == pytest.approx(2.1)
    assert b["ms_per_token_rounds"] == [2.0, 6.6, 2.1] and a["ttft_ms"] == pytest.approx(42.0)
    assert b["size_mb"] == 2000 / 1e6 and a["peak_rss_mb"] == 5.0


def test_prediction_error_is_each_measured_point_predicted_from_the_others():
    """Leave-one-out over the measured rows with the fit ``predict`` uses: an exactly linear latency
    gives no error; one point 20 % off the plane the others lie on is predicted 1/1.2 - 1 off, and the
    predicted (unmeasured) rows are never scored."""
    from compress.passes.amoeba.measure import predict, prediction_error

    def ms(p, d):
        return 0.5 + 0.02 * p + 0.03 * d
    rows = [{"depth": d, "width": w, "parameters": p * 1e6, "ms_per_token": ms(p, d), "latency_measured": True}
            for d, w, p in [(30, 1.0, 130), (30, 0.5, 90), (20, 1.0, 95), (20, 0.5, 70), (25, 0.75, 96)]]
    rows.append({"depth": 25, "width": 1.0, "parameters": 112e6, "ms_per_token": None, "latency_measured": False})
    predict(rows, "ms_per_token")
    assert rows[-1]["ms_per_token"] == pytest.approx(ms(112, 25))
    err = prediction_error(rows)
    assert err["points"] == 5 and err["max_abs_error"] < 1e-9
    rows[4]["ms_per_token"] *= 1.2  # the middle point measured slow: the plane of the corners misses it
    err = prediction_error(rows)
    mid = err["per_point"][4]
    assert (mid["depth"], mid["width"]) == (25, 0.75) and mid["measured"] == pytest.approx(1.2 * ms(96, 25))
    assert mid["predicted"] == pytest.approx(ms(96, 25)) and mid["error"] == pytest.approx(1 / 1.2 - 1)
    # the corners, each predicted through the slow point, are off too, and the summary is over all five
    assert all(abs(e["error"]) > 1e-3 for e in err["per_point"][:4])
    assert err["max_abs_error"] == max(abs(e["error"]) for e in err["per_point"]) >= 1 - 1 / 1.2 - 1e-12
    assert prediction_error(rows[:2] + rows[-1:]) is None  # two measured points: nothing left to fit on
