"""The ``quantize`` pass: initialization layer by layer, Block-AP, then recovery distillation.

1. Calibration: the decoder layers run one at a time on ``calibration_blocks`` sequences; each
   layer's Linears see the inputs produced by the *already quantized* earlier layers (GPTQ's
   sequential scheme), so errors are corrected where they arise.
2. Initialization of every Linear: RTN (min-max), a clipping search on the layer's output
   error (BitDistiller/AWQ-style, per group, Hessian-weighted), or GPTQ without act-order.
3. Block-AP (EfficientQAT), below 4 bits by default: per layer, train weights (straight-through),
   scales and zero points to reproduce the full-precision layer's output (MSE).
4. Recovery: the whole model distills from the teacher through the shared training loop
   (forward KL, optionally SquareHead and CE), in one of three modes: ``ste``, ``pv``, ``scales``.
   The recovered model is kept only if its KL on held-out sequences beats the initialization.

Sparsity masks (``manifest["sparsity"]``) hold throughout: a pruned weight is quantized to the
zero point (exactly 0) and stays there.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ...artifact import Artifact
from ...context import PassContext
from ...errors import UserError
from ...models import load_model
from ...tokenizer import copy_tokenizer_files
from ...ops import losses
from ...ops import quant as Q
from ...quantized import (
    LinearQuant, QuantLinear, is_quantized, quant_modules, replace_module, save_quantized, tie_quantized_head,
)
from ...training.loop import Hooks, LossWeights, TrainSettings, train
from .config import QuantizeConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ---------------------------------------------------------------- masks

def sparsity_masks(model, manifest: dict) -> dict[str, torch.Tensor]:
    """Masks of pruned weights recorded by earlier passes: ``manifest["sparsity"]["modules"]``
    lists the Linears whose zeros are structural (True = kept weight)."""
    sp = manifest.get("sparsity") or {}
    names = sp.get("modules") or []
    masks = {}
    for name in names:
        try:
            w = model.get_submodule(name).weight
        except AttributeError:
            raise UserError(f"sparsity mask names {name!r}, which the model does not have") from None
        masks[name] = w.detach() != 0
    return masks


# ---------------------------------------------------------------- calibration

def _layer_inputs(model, blocks: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments the first decoder layer receives, per batch."""
    layer0 = model.model.layers[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    class _Stop(Exception):
        pass

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k in ("attention_mask", "position_ids", "position_embeddings",
                                                       "cache_position")}
        captured.append((hidden.detach(), kw))
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, blocks.shape[0], batch):
                try:
                    model(input_ids=blocks[i:i + batch], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = []
        for h, kw in inputs:
            y = layer(h, **kw)
            outs.append((y[0] if isinstance(y, tuple) else y).detach())
    return outs


def _input_stats(layer, inputs, names: list[str]) -> dict[str, dict]:
    """Per Linear: the Hessian proxy H = 2 XᵀX / n over calibration tokens."""
    stats = {n: {"h": None, "n": 0} for n in names}
    handles = []
    for n in names:
        mod = layer.get_submodule(n)

        def hook(m, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st = stats[n]
            h = x.T @ x
            st["h"] = h if st["h"] is None else st["h"] + h
            st["n"] += x.shape[0]
        handles.append(mod.register_forward_hook(hook))
    try:
        _run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st["h"] = st["h"] * (2.0 / max(st["n"], 1))
    return stats


# ---------------------------------------------------------------- initialization

def clip_search(w: torch.Tensor, h: torch.Tensor, q: LinearQuant, grid: int, max_shrink: float,
                mask: torch.Tensor | None = None):
    """Per (row, group): the range shrink (max side, min side) minimizing the group's output
    error δᵀ H_gg δ (δ = W − Ŵ over the group), over a ``grid`` × ``grid`` set of shrinks."""
    n, k = w.shape
    g = q.group
    kb = Q.num_groups(k, g)
    pad = kb * g - k
    hp = F.pad(h, (0, pad, 0, pad))
    hb = torch.stack([hp[j * g:(j + 1) * g, j * g:(j + 1) * g] for j in range(kb)])  # (kb, g, g)
    wg = F.pad(w, (0, pad)).reshape(n, kb, g)
    best_err = torch.full((n, kb), float("inf"))
    best_s = torch.zeros(n, kb)
    best_z = torch.zeros(n, kb)
    ratios = [1 - max_shrink * i / max(grid - 1, 1) for i in range(grid)] if grid > 1 else [1.0]
    pairs = [(a, a) for a in ratios] if q.sym else [(a, b) for a in ratios for b in ratios]
    for a, b in pairs:
        s, z = Q.minmax_params(w, q.bits, g, q.sym, shrink_max=a, shrink_min=b)
        codes = Q.quantize(w, s, z, q.bits, g)
        deq = Q.dequantize(codes, s, z, g)
        d = wg - F.pad(deq, (0, pad)).reshape(n, kb, g)
        if mask is not None:
            d = d * F.pad(mask.float(), (0, pad)).reshape(n, kb, g)
        err = torch.einsum("nkg,kgh,nkh->nk", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return Q.quantize(w, best_s, best_z, q.bits, g), best_s, best_z


def init_linear(lin, q: LinearQuant, cfg: QuantizeConfig, h: torch.Tensor | None, mask: torch.Tensor | None):
    w = lin.weight.detach().float()
    if cfg.init == "gptq":
        shrinks = ([1 - cfg.clip_max_shrink * i / max(cfg.clip_grid - 1, 1) for i in range(cfg.clip_grid)]
                   if cfg.gptq_mse_clip else None)
        codes, s, z = Q.gptq(w, h, q.bits, q.group, q.sym, damp=cfg.gptq_damp, mask=mask, shrinks=shrinks)
    elif cfg.init == "clip":
        codes, s, z = clip_search(w, h, q, cfg.clip_grid, cfg.clip_max_shrink, mask)
    else:
        s, z = Q.minmax_params(w, q.bits, q.group, q.sym)
        codes = Q.quantize(w, s, z, q.bits, q.group)
    return QuantLinear.from_linear(lin, q, codes, s, z, mask)


def output_error(lin_fp, lin_q, h: torch.Tensor) -> float:
    """Relative layer-output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration inputs."""
    w = lin_fp.weight.detach().float()
    d = w - lin_q.weight
    return float(torch.einsum("nk,kj,nj->", d, h, d) / torch.einsum("nk,kj,nj->", w, h, w).clamp_min(1e-20))


# ---------------------------------------------------------------- Block-AP

def _row(kw: dict, i: int, batch: int) -> dict:
    """Layer keyword arguments of batch row ``i`` (tensors with a batch dimension sliced)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            return v[i:i + 1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


def block_ap(layer, x_q, y_fp, cfg: QuantizeConfig, seed: int) -> dict:
    """Train one layer's quantized weights (straight-through), scales and zero points to map
    the quantized-path inputs onto the full-precision outputs (MSE)."""
    mods = [m for m in layer.modules() if isinstance(m, QuantLinear)]
    before = _layer_mse(layer, x_q, y_fp)
    snap = {id(m): (m.codes.clone(), m.scale.detach().clone(), m.zero.detach().clone()) for m in mods}
    for m in mods:
        m.start("ste")
    groups = [{"params": [m.scale for m in mods], "lr": cfg.block_ap_lr},
              {"params": [m.latent for m in mods], "lr": cfg.block_ap_weight_lr}]
    zeros = [m.zero for m in mods if m.zero.requires_grad]
    if zeros:
        groups.append({"params": zeros, "lr": cfg.block_ap_lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    # flatten calibration batches into single sequences
    seqs = [(h[i:i + 1], _row(kw, i, h.shape[0])) for h, kw in x_q for i in range(h.shape[0])]
    targets = [y[i:i + 1] for y in y_fp for i in range(y.shape[0])]
    gen = torch.Generator().manual_seed(seed)
    first = last = None
    steps = cfg.block_ap_steps
    for step in range(steps):
        for g in opt.param_groups:  # cosine to lr/20 (EfficientQAT)
            g["lr"] = g["base_lr"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        idx = torch.randint(len(seqs), (cfg.block_ap_batch,), generator=gen).tolist()
        loss = 0.0
        for i in idx:
            h, kw = seqs[i]
            y = layer(h, **kw)
            y = y[0] if isinstance(y, tuple) else y
            loss = loss + F.mse_loss(y, targets[i]) / len(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 0.3)
        opt.step()
        with torch.no_grad():
            for m in mods:
                m.scale.clamp_(min=1e-8)
        v = float(loss.detach())
        first = v if first is None else first
        last = v
    for m in mods:
        m.freeze()
    after = _layer_mse(layer, x_q, y_fp)
    kept = "trained"
    if not after < before:  # a noisy few-step run can overshoot: never leave the layer worse than its init
        for m in mods:
            codes, scale, zero = snap[id(m)]
            m.set_codes(codes, scale, zero)
        kept = "initialization"
    return {"mse_calib_before": before, "mse_calib_after": after, "kept": kept,
            "mse_batch_first": first, "mse_batch_last": last}


def _layer_mse(layer, x_q, y_fp) -> float:
    """Mean squared error of the layer's outputs on every calibration sequence against the targets."""
    tot, n = 0.0, 0
    for y, t in zip(_run_layer(layer, x_q), y_fp):
        tot += float(F.mse_loss(y, t, reduction="sum"))
        n += t.numel()
    return tot / max(n, 1)


# ---------------------------------------------------------------- the pass

def _plan_bits(model, cfg: QuantizeConfig) -> dict[str, LinearQuant]:
    plan = {}
    for i, _ in enumerate(model.model.layers):
        for rel in LINEARS:
            name = f"model.layers.{i}.{rel}"
            plan[name] = LinearQuant(cfg.bits_for(name, len(model.model.layers)), cfg.group_size, cfg.sym)
    # packed exports (q|k|v, gate|up) need one format per pack
    for i, _ in enumerate(model.model.layers):
        for pack in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            sub = "self_attn" if pack[0] == "q_proj" else "mlp"
            fmts = {plan[f"model.layers.{i}.{sub}.{p}"] for p in pack}
            if len(fmts) > 1:
                raise UserError(f"bits_overrides give layer {i} {sub} projections {', '.join(pack)} different bit "
                                "widths: they are packed into one MatMulNBits and must match")
    return plan


def _check_model(model, parent: Artifact) -> None:
    if is_quantized(parent.path):
        raise UserError(f"{parent.path} is already quantized: quantize the full-precision model")
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UserError("quantize supports LLaMA-family decoders (model.model.layers)")


def quantize(parent: Artifact, cfg: QuantizeConfig, ctx: PassContext) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    student = load_model(parent.path)
    _check_model(student, parent)
    for p in student.parameters():
        p.requires_grad_(False)
    masks = sparsity_masks(student, parent.manifest)
    plan = _plan_bits(student, cfg)
    blocks = ctx.training_blocks()
    n_held = min(cfg.heldout_blocks, max(blocks.shape[0] - 1, 0))
    held = blocks[blocks.shape[0] - n_held:] if n_held else blocks[:0]
    train_blocks = blocks[:blocks.shape[0] - n_held]
    calib = train_blocks[:cfg.calibration_blocks]
    bits_set = sorted({q.bits for q in plan.values()})
    ctx.log(f"quantize: {len(plan)} Linears to {'/'.join(map(str, bits_set))}-bit g{cfg.group_size} "
            f"{'sym' if cfg.sym else 'asym'}, init {cfg.init}, embeddings {cfg.embeddings}, "
            f"{calib.shape[0]} calibration sequences")
    teacher = ctx.load_teacher()
    kl_fp = _heldout_kl(student, teacher, held)

    # 1-3: layer by layer
    summary: dict[str, Any] = {"init": cfg.init, "layers": []}
    need_stats = cfg.init in ("gptq", "clip")
    any_ap = any(cfg.use_block_ap(q.bits) for q in plan.values()) and cfg.block_ap_steps > 0
    x_q = _layer_inputs(student, calib, 4) if (need_stats or any_ap) else None
    x_fp = [(h.clone(), kw) for h, kw in x_q] if (x_q is not None and any_ap) else None
    layers = student.model.layers
    bar = ctx.progress(total=len(layers), desc="quantize layers", unit="layer") if ctx.progress else None
    t0 = time.perf_counter()
    try:
        for i, layer in enumerate(layers):
            names = [rel for rel in LINEARS]
            y_fp = _run_layer(layer, x_fp) if x_fp is not None else None
            stats = _input_stats(layer, x_q, names) if need_stats or any_ap else {}
            errs = {}
            layer_bits = set()
            for rel in names:
                full = f"model.layers.{i}.{rel}"
                lin = layer.get_submodule(rel)
                q = plan[full]
                layer_bits.add(q.bits)
                h = stats.get(rel, {}).get("h")
                qm = init_linear(lin, q, cfg, h, masks.get(full))
                if h is not None:
                    errs[rel] = output_error(lin, qm, h)
                replace_module(layer, rel, qm)
            rec = {"layer": i, "init_rel_error": errs}
            if any_ap and cfg.use_block_ap(min(layer_bits)):
                with torch.enable_grad():
                    rec["block_ap"] = block_ap(layer, x_q, y_fp, cfg, cfg.seed * 1000 + i)
            if x_q is not None and i + 1 < len(layers):
                x_q = [(y, kw) for y, (_, kw) in zip(_run_layer(layer, x_q), x_q)]
            if x_fp is not None:
                x_fp = [(y, kw) for y, (_, kw) in zip(y_fp, x_fp)]
            summary["layers"].append(rec)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    summary["layerwise_seconds"] = time.perf_counter() - t0
    del x_q, x_fp

    # embeddings / tied head
    _quantize_embeddings(student, cfg)
    kl_init = _heldout_kl(student, teacher, held)
    ctx.log(f"initialization done: held-out KL {kl_init:.4f} (full precision {kl_fp:.4f})")

    # 4: recovery
    recovery: dict[str, Any] = {"mode": cfg.recovery, "kl_heldout_init": kl_init}
    if cfg.recovery != "none" and cfg.steps > 0:
        snapshot = _snapshot(student)
        recovery["train"] = _recover(student, teacher, train_blocks, cfg, ctx)
        kl_rec = _heldout_kl(student, teacher, held)
        recovery["kl_heldout_recovered"] = kl_rec
        if held.shape[0] and kl_rec > kl_init:
            _restore(student, snapshot)
            recovery["kept"] = "initialization"
            ctx.log(f"recovery raised held-out KL ({kl_init:.4f} -> {kl_rec:.4f}): keeping the initialization")
        else:
            recovery["kept"] = "recovered"
            ctx.log(f"recovery: held-out KL {kl_init:.4f} -> {kl_rec:.4f}")
    else:
        recovery["kept"] = "initialization"

    info = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "init": cfg.init,
            "embeddings": cfg.embeddings, "recovery": cfg.recovery}
    save_quantized(student, ctx.out_dir, info)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    stats = bits_per_weight(student)
    return {"quantize": {**summary, "recovery": recovery, "kl_heldout_fp": kl_fp, **stats,
                         "seconds": time.perf_counter() - t_start}}


def _quantize_embeddings(model, cfg: QuantizeConfig) -> None:
    if cfg.embeddings == "keep":
        return
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    if not tied:
        raise UserError("embeddings: quantizing an untied embedding/head is not supported; use embeddings=keep")
    d = head.in_features
    if d % cfg.embed_group_size:
        raise UserError(f"embed_group_size {cfg.embed_group_size} does not divide hidden_size {d}")
    q = LinearQuant(int(cfg.embeddings), cfg.embed_group_size, False)
    w = head.weight.detach().float()
    s, z = Q.minmax_params(w, q.bits, q.group, q.sym)
    lin = torch.nn.Linear(d, head.out_features, bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    qm = QuantLinear.from_linear(lin, q, Q.quantize(w, s, z, q.bits, q.group), s, z)
    qm.scale.requires_grad_(False)
    qm.zero.requires_grad_(False)
    model.set_output_embeddings(qm)
    tie_quantized_head(model)


def bits_per_weight(model) -> dict[str, Any]:
    """Stored bits per quantized weight, scales and zero points included; parameters by kind."""
    qbits = qparams = 0
    for m in quant_modules(model).values():
        n = m.codes.numel()
        qparams += n
        qbits += n * Q.container_bits(m.q.bits) + m.scale.numel() * 32 + (0 if m.q.sym else m.zero.numel() * 8)
    return {"quantized_params": qparams, "bits_per_quantized_weight": qbits / max(qparams, 1)}


# ---------------------------------------------------------------- recovery

def _heldout_kl(student, teacher, held: torch.Tensor) -> float:
    if held.shape[0] == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for i in range(held.shape[0]):
            ids = held[i:i + 1]
            total += float(losses.forward_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits, None))
    return total / held.shape[0]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model, snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(snap[k])


def _recover(student, teacher, blocks, cfg: QuantizeConfig, ctx: PassContext) -> dict:
    mods = quant_modules(student)
    mode = {"ste": "ste", "pv": "pv", "scales": "frozen"}[cfg.recovery]
    body = {n: m for n, m in mods.items() if n != "lm_head"}
    for m in body.values():
        m.start(mode)
        m.scale.requires_grad_(True)
        m.zero.requires_grad_(not m.q.sym)
    norms = [p for n, p in student.named_parameters() if n.endswith("norm.weight")] if cfg.train_norms else []
    for p in norms:
        p.requires_grad_(True)

    def groups(model):
        out = [{"params": [m.scale for m in body.values()], "lr": cfg.lr}]
        zeros = [m.zero for m in body.values() if m.zero.requires_grad]
        if zeros:
            out.append({"params": zeros, "lr": cfg.lr})
        if norms:
            out.append({"params": norms, "lr": cfg.lr})
        if mode in ("ste", "pv"):
            out.append({"params": [m.latent for m in body.values()], "lr": cfg.weight_lr,
                        **({"betas": (0.0, 0.95)} if mode == "pv" else {})})
        return out

    changed = []

    def after_step(model, step):
        with torch.no_grad():
            for m in body.values():
                m.scale.clamp_(min=1e-8)
        if mode == "pv":
            changed.append(sum(m.pv_step(cfg.pv_max_change) for m in body.values()))

    def state(model):
        return {n: m.codes.clone() for n, m in body.items()} if mode == "pv" else {}

    def load_state(model, st):
        with torch.no_grad():
            for n, codes in st.items():
                body[n].codes.copy_(codes)

    settings = TrainSettings(
        steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, bf16=False, threads=cfg.threads,
        loss=LossWeights(ce=cfg.ce, kl=cfg.kl, squarehead=cfg.squarehead, temperature=cfg.temperature),
    )
    ctx.log(f"recovery ({cfg.recovery}): {cfg.steps} steps of {cfg.batch_size * cfg.grad_accum} sequences")
    summary = train(student, teacher, blocks, settings, work_dir=ctx.work_dir, fingerprint=ctx.artifact_id,
                    hooks=Hooks(param_groups=groups, after_step=after_step, state=state, load_state=load_state),
                    progress=ctx.progress, log=ctx.log)
    for m in body.values():
        m.freeze()
        m.scale.requires_grad_(False)
        m.zero.requires_grad_(False)
    for p in norms:
        p.requires_grad_(False)
    if mode == "pv":
        summary["codes_changed"] = sum(changed)
    return summary
