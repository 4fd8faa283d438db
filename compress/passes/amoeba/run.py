"""The ``amoeba`` pass: one supernet fine-tuning, then the table of its subnets.

1. Depth (:mod:`.dp`): the DP removal table on ``dp_sequences`` calibration sequences of
   ``dp_seq_len`` tokens (cut from the training blocks), loss metric.
2. Width (:mod:`.flap`): every layer's FLAP ranking of heads and MLP channels, and the means of
   their inputs (bias compensation), on ``flap_blocks`` training blocks.
3. The shape-aware mixture of LoRAs (:mod:`.smol`) on every decoder Linear; the base weights stay
   frozen (a sparse parent's zeros stay exact: the deltas are masked), or with ``tuning: full``
   are trained too, at ``base_lr`` (the loop holds a sparse parent's zeros after every step).
4. Sandwich training through the shared loop: per micro-batch the full subnet (``ce`` CE + ``kl``
   KL to the teacher), ``random_subnets`` random ones (depth in ``[min_layers, L)``, widths drawn
   without replacement) and the smallest, each distilled from the full subnet's detached logits
   (``kd`` KL + ``1 - kd`` CE), each loss scaled to the full one's magnitude (``balance``); one
   backward per subnet. Router noise and subnet draws come from generators seeded per step, so a
   resumed run equals an uninterrupted one.
5. The table (:mod:`.measure`): every depth x width point evaluated as the run evaluates a stage,
   latency and size measured at ``latency_points`` of them and predicted at the rest.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import torch

from ...arch import arch_of
from ...artifact import Artifact, hash_parts, link_model_files
from ...cache import cache_dir
from ...context import PassContext, PassResult
from ...errors import UserError
from ...evaluation import heldout_kl, heldout_split
from ...frontier import table_markdown
from ...models import load_model, save_model
from ...ops import losses
from ...target import load_target
from ...training.loop import Hooks, LossWeights
from .config import AmoebaConfig
from .dp import LossMetric, dp_evaluations, dp_layer_selection
from .flap import flap_widths, width_shape
from .measure import LATENCY_KEYS, measure_latency, measurement_order, predict, subnet_parameters
from .smol import SMoL
from .store import SMOL_MODULE, save_supernet
from .subnet import Subnet, Supernet


def dp_sequences(blocks: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """``n`` calibration sequences of ``seq_len`` tokens (at most a block's) cut from the training
    blocks, in order."""
    seq_len = min(seq_len, blocks.shape[1])
    per = blocks.shape[1] // seq_len
    cut = blocks[:, :per * seq_len].reshape(-1, seq_len)
    return cut[:n]


def sample_subnets(net: Supernet, cfg: AmoebaConfig, lo: int, g: torch.Generator) -> list[Subnet]:
    """The sandwich: ``random_subnets`` random subnets and the smallest (the full one is the caller's)."""
    L, nw = net.num_layers, len(net.widths)
    subs = []
    widths = torch.randperm(nw, generator=g).tolist()
    for k in range(cfg.random_subnets):
        depth = int(torch.randint(lo, L, (1,), generator=g)) if L > lo else L
        width = widths[k % nw] if k < nw else int(torch.randint(0, nw, (1,), generator=g))
        subs.append(net.subnet(depth, width))
    subs.append(net.subnet(lo, nw - 1))
    return subs


def sandwich_hooks(net: Supernet, cfg: AmoebaConfig, lo: int, record: dict[str, Any]) -> Hooks:
    state = {"step": -1, "micro": 0}

    def loss(inp) -> tuple[torch.Tensor, dict[str, float]]:
        if inp.step != state["step"]:
            state.update(step=inp.step, micro=0)
        else:
            state["micro"] += 1
        seed = (cfg.train.seed * 1_000_003 + inp.step) * 131 + state["micro"]
        draw = torch.Generator().manual_seed(seed)
        noise = torch.Generator().manual_seed(seed + 7)
        if inp.weights.needs_teacher:
            inp.teacher_outputs()
        with net.use(net.full(), noise=noise):
            out = inp.student_outputs()
        full, parts = inp.distillation(out)
        target = out.logits.detach()
        del out
        inp.backward_now(full)
        full_value = full.detach()
        last = None
        subs = sample_subnets(net, cfg, lo, draw)
        for k, sub in enumerate(subs):
            with net.use(sub, noise=noise):
                o = inp.student_outputs()
            sl = o.logits
            term = cfg.kd * losses.forward_kl(sl, target, None, cfg.temperature) if cfg.kd > 0 else 0
            if cfg.kd < 1:
                term = term + (1 - cfg.kd) * losses.cross_entropy(sl, inp.ids, None)
            raw = float(term.detach())
            if cfg.balance:
                term = term * (full_value / term.detach().clamp_min(1e-8))
            parts[f"sub{k}"] = raw
            record.setdefault("subnets", []).append([inp.step, sub.depth, sub.width, raw])
            if k < len(subs) - 1:
                inp.backward_now(term)
            else:
                last = term
        return last, parts

    return Hooks(loss=loss, unused_parameters=True)


def train_base_weights(student, cfg: AmoebaConfig,
                       names: list[str]) -> Callable[[torch.nn.Module], list[dict]] | None:
    """``tuning: full``: the decoder Linears' weights made trainable beside the adapters, in their
    own optimizer group at ``base_lr``; the optimizer's groups as a hook (None under ``lora``)."""
    if cfg.tuning != "full":
        return None
    for name in names:
        student.get_submodule(name).weight.requires_grad_(True)

    def groups(model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in named if n.startswith(SMOL_MODULE + ".")]},
                {"params": [p for n, p in named if not n.startswith(SMOL_MODULE + ".")], "lr": cfg.base_lr}]
    return groups


def save_base(student, parent_path, out) -> None:
    """The stage's own base model (trained under ``tuning: full``): its weights and config, the
    adapters left out (``save_supernet`` writes those), every other file of the parent's folder
    (tokenizer, a sparse parent's masks) linked beside them."""
    smol = student._modules.pop(SMOL_MODULE)
    try:
        save_model(student, out)
    finally:
        student.add_module(SMOL_MODULE, smol)
    link_model_files(parent_path, out, weights=False)


def grid(net: Supernet, cfg: AmoebaConfig) -> list[Subnet]:
    return [net.subnet(d, w) for d in cfg.table_depths(net.num_layers) for w in range(len(net.widths))]


def build_table(net: Supernet, subs: list[Subnet], cfg: AmoebaConfig, ctx: PassContext, tokenizer_src,
                masks: dict, target) -> list[dict]:
    config = net.model.config.to_dict()
    rows = []
    for sub in subs:
        w = net.widths[sub.width]
        heads = w.heads_per_group * net.kv
        bias = net.biased(sub.width)
        rows.append({"depth": sub.depth, "width": w.fraction, "width_index": sub.width, "layers": list(sub.layers),
                     "num_heads": heads, "intermediate_size": w.intermediate,
                     "parameters": subnet_parameters(config, sub.depth, heads, w.intermediate, bias=bias)})
    bar = ctx.progress(total=len(rows), desc="evaluate subnets", unit="subnet") if ctx.progress else None
    try:
        for sub, row in zip(subs, rows):
            if ctx.evaluate is not None:
                with net.use(sub):
                    ev = ctx.evaluate(net.model)
                row.update(perplexity=ev["perplexity"], kl=ev.get("kl"), top1_agreement=ev.get("top1_agreement"),
                           geomean_ratio=(ev.get("summary") or {}).get("geomean_ratio"),
                           domains={n: {k: r.get(k) for k in ("perplexity", "kl", "top1_agreement")}
                                    for n, r in ev.get("domains", {}).items()})
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    order = measurement_order([(r["depth"], r["width_index"]) for r in rows])[:cfg.latency_points]
    by_point = {(r["depth"], r["width_index"]): (s, r) for s, r in zip(subs, rows)}
    ctx.log(f"amoeba: latency of {len(order)} subnets ({', '.join(f'd{d}-w{net.widths[w].fraction}' for d, w in order)}), "
            f"{cfg.latency_rounds} interleaved rounds")
    points = [by_point[p] for p in order]
    measured = measure_latency([(f"d{sub.depth}-w{row['width']}", lambda s=sub: net.extract(s)[0])
                                for sub, row in points],
                               tokenizer_src, target, bits=cfg.latency_bits, group=cfg.latency_group,
                               prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens, runs=cfg.runs,
                               rounds=cfg.latency_rounds, log=ctx.log)
    for (_, row), m in zip(points, measured):
        row.update(m, latency_measured=True)
    for key in LATENCY_KEYS:
        predict(rows, key)
    for r in rows:
        r.setdefault("latency_measured", False)
    return rows


def amoeba(parent: Artifact, cfg: AmoebaConfig, ctx: PassContext) -> PassResult:
    t_start = time.perf_counter()
    student = load_model(parent.path)
    arch = arch_of(student)
    if arch.name != "llama":
        raise UserError(f"amoeba: subnets are extracted as LLaMA models; {arch.name} is not supported yet")
    cfg.check_dims({"num_layers": student.config.num_hidden_layers})
    for p in student.parameters():
        p.requires_grad_(False)
    masks = ctx.parent_masks()
    L = student.config.num_hidden_layers
    lo = cfg.resolved_min_layers(L)
    train_blocks, held = heldout_split(ctx.training_blocks(), cfg.heldout_blocks)
    summary: dict[str, Any] = {"num_layers": L, "min_layers": lo}

    # 1. depth
    t0 = time.perf_counter()
    calib = dp_sequences(train_blocks, cfg.dp_seq_len, cfg.dp_sequences)
    bar = None
    if ctx.progress:
        bar = ctx.progress(total=dp_evaluations(L, lo, cfg.keep_last), desc="DP layer table", unit="subnet")
    try:
        from ...hardware import resolve_bf16

        bf16 = resolve_bf16(cfg.train.bf16)[0]
        metric = LossMetric(student, calib, batch=16, stride=cfg.dp_loss_stride, bf16=bf16)
        # the DP depends on the parent, its calibration tokens and these settings only: kept in the
        # cache under that key, another stage of the same parent (other training steps, latency
        # settings, a baseline) takes it as it stands, and a killed one resumes at its next level
        key = hash_parts("amoeba-dp-1", parent.id, hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
                         f"{tuple(calib.shape)}|{L}|{lo}|{cfg.keep_last}|{cfg.dp_loss_stride}|{bf16}")
        now = []

        def progress(i, n):
            now.append(i)
            if bar:
                bar.update(1)
        dp = dp_layer_selection(L, lo, metric, keep_last=cfg.keep_last, progress=progress,
                                state=cache_dir() / "amoeba-dp" / f"{key}.json", fingerprint=key)
    finally:
        if bar:
            bar.close()
    summary["dp"] = {**dp.to_json(), "sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                     "seconds": time.perf_counter() - t0, "evaluated_now": len(now), "key": key}
    ctx.log(f"amoeba: DP table over {L} layers down to {lo} ({dp.evaluations} evaluations"
            f"{', taken from the cache' if not now else ''} on "
            f"{calib.shape[0]} x {calib.shape[1]} tokens); loss full {dp.scores[0]:.3f}, at {lo} layers "
            f"{dp.scores[L - lo]:.3f}")

    # 2. width
    t0 = time.perf_counter()
    plan = flap_widths(student, train_blocks[:cfg.flap_blocks])
    c = student.config
    widths = [width_shape(f, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads or
                          c.num_attention_heads, intermediate=c.intermediate_size) for f in cfg.widths]
    summary["widths"] = [{"fraction": w.fraction, "heads_per_group": w.heads_per_group,
                          "intermediate": w.intermediate} for w in widths]
    summary["flap_seconds"] = time.perf_counter() - t0

    # 3. adapters and the supernet
    smol = SMoL(student, arch.linear_names(student), num_layers=L, num_widths=len(widths), experts=cfg.experts,
                rank=cfg.lora_rank, alpha=cfg.lora_alpha, router_hidden=cfg.router_hidden, top_k=cfg.top_k,
                seed=cfg.train.seed, masks=masks).attach(student)
    student.add_module(SMOL_MODULE, smol)
    net = Supernet(student, dp, widths, plan, smol, compensate=cfg.compensate)
    base_groups = train_base_weights(student, cfg, arch.linear_names(student))
    teacher = ctx.load_teacher()
    net.rest()
    summary["kl_heldout_before"] = heldout_kl(student, teacher, held)
    smallest = net.subnet(lo, len(widths) - 1)
    with net.use(smallest):  # one-shot (DP + FLAP): what the training starts the smallest from
        summary["kl_heldout_smallest_before"] = heldout_kl(student, teacher, held)
    summary["trainable_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)

    # 4. sandwich training
    settings, why = cfg.train.settings(LossWeights(ce=cfg.ce, kl=cfg.kl, temperature=cfg.temperature))
    what = "adapter parameters" if cfg.tuning == "lora" else "parameters (the base's Linears and the adapters)"
    ctx.log(f"amoeba: sandwich training of {summary['trainable_parameters'] / 1e6:.2f} M {what} "
            f"({cfg.experts} experts of rank {cfg.lora_rank} per Linear), {settings.steps} steps of "
            f"{settings.batch_size * settings.grad_accum} sequences x {2 + cfg.random_subnets} subnets, bf16 "
            f"{'on' if settings.bf16 else 'off'} ({why})")
    record: dict[str, Any] = {}
    hooks = sandwich_hooks(net, cfg, lo, record)
    hooks.param_groups = base_groups
    summary["train"] = ctx.train(student, teacher, train_blocks, settings, hooks=hooks)
    summary["train"]["bf16_reason"] = why
    for p in student.parameters():
        p.requires_grad_(False)
    net.rest()
    summary["kl_heldout"] = heldout_kl(student, teacher, held)
    with net.use(smallest):
        summary["kl_heldout_smallest"] = heldout_kl(student, teacher, held)
    summary["sampled_subnets"] = record.get("subnets", [])

    # 5. the table
    target = ctx.target or load_target("cpu")
    rows = build_table(net, grid(net, cfg), cfg, ctx, parent.path, masks, target)
    summary["seconds"] = time.perf_counter() - t_start

    # the artifact: the base (the parent's model files when frozen, its own when trained) + the supernet's own
    net.detach_hooks()
    if cfg.tuning == "full":
        save_base(student, parent.path, ctx.out_dir)
    else:
        link_model_files(parent.path, ctx.out_dir)
    save_supernet(net, ctx.out_dir, extra={
        "latency_bits": cfg.latency_bits, "latency_group": cfg.latency_group,
        "prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens, "runs": cfg.runs,
        "rounds": cfg.latency_rounds,
        "min_layers": lo})
    measured = sum(r["latency_measured"] for r in rows)
    best = min(rows, key=lambda r: r["ms_per_token"])
    report = [f"AmoebaLLM supernet: {L} layers down to {lo} (DP table, {dp.evaluations} evaluations), widths "
              f"{', '.join(str(w) for w in cfg.widths)}; {cfg.experts} LoRA experts per Linear"
              f"{' and the base weights' if cfg.tuning == 'full' else ''} trained "
              f"{settings.steps} steps (sandwich: full + {cfg.random_subnets} random + smallest). Held-out KL of "
              f"the full subnet {summary['kl_heldout_before']:.4f} -> {summary['kl_heldout']:.4f}, of the smallest "
              f"{summary['kl_heldout_smallest_before']:.4f} -> {summary['kl_heldout_smallest']:.4f}.",
              "", f"Subnet table ({len(rows)} points; latency and size at {cfg.latency_bits}"
              f"{'-bit' if cfg.latency_bits != 'fp32' else ''} on {target.label()}, measured at {measured}, "
              "predicted (*) at the rest):", "", *table_markdown(rows),
              "", f"Fastest: depth {best['depth']} width {best['width']} at {best['ms_per_token']:.2f} ms/token. "
              "`compress subnets pick RUN --max-ms-per-token X` extracts the most accurate subnet within a budget."]
    return PassResult(metrics={"amoeba": summary, "subnets": rows, "subnets_target": target.to_dict()}, report=report,
                      shape=arch.shape(student.config.to_dict()))
