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

Sparsity masks of the parent (:mod:`compress.masks`) hold throughout: a pruned weight is
quantized to the zero point (exactly 0) and stays there. Layer-wise calibration is the shared
:mod:`compress.calibration`; the math (GPTQ, clip search, output error) lives in :mod:`compress.ops.quant`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ...arch import arch_of
from ...artifact import Artifact
from ...calibration import LayerwiseCalibration, run_layer
from ...context import PassContext, PassResult
from ...errors import UserError
from ...evaluation import heldout_kl, heldout_split
from ...models import load_model
from ...ops import quant as Q
from ...quantized import LinearQuant, QuantLinear, quant_modules, quantize_tied_head_, replace_module, save_quantized
from ...tokenizer import copy_tokenizer_files
from ...training.loop import Hooks, LossWeights
from .config import QuantizeConfig


def init_linear(lin, q: LinearQuant, cfg: QuantizeConfig, h: torch.Tensor | None, mask: torch.Tensor | None):
    w = lin.weight.detach().float()
    if cfg.init == "gptq":
        shrinks = ([1 - cfg.clip_max_shrink * i / max(cfg.clip_grid - 1, 1) for i in range(cfg.clip_grid)]
                   if cfg.gptq_mse_clip else None)
        codes, s, z = Q.gptq(w, h, q.bits, q.group, q.sym, damp=cfg.gptq_damp, mask=mask, shrinks=shrinks)
    elif cfg.init == "clip":
        codes, s, z = Q.clip_search(w, h, q.bits, q.group, q.sym, cfg.clip_grid, cfg.clip_max_shrink, mask)
    else:
        s, z = Q.minmax_params(w, q.bits, q.group, q.sym)
        codes = Q.quantize(w, s, z, q.bits, q.group)
    return QuantLinear.from_linear(lin, q, codes, s, z, mask)


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


def block_ap(layer, x_q, y_fp, cfg: QuantizeConfig, seed: int, bf16: bool = False,
             reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Train one layer's quantized weights (straight-through), scales and zero points to map
    the quantized-path inputs onto the full-precision outputs (MSE). ``bf16``: matmuls under bf16
    autocast (the loss, the optimizer and the before/after errors stay float32). ``reference``:
    the layer's full-precision weights by module name, where each latent starts (inside its cell)."""
    reference = reference or {}
    named = [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantLinear)]
    mods = [m for _, m in named]
    before = _layer_mse(layer, x_q, y_fp)
    snap = {id(m): (m.codes.clone(), m.scale.detach().clone(), m.zero.detach().clone()) for m in mods}
    for n, m in named:
        m.start("ste", reference.get(n))
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
            with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=bf16):
                y = layer(h, **kw)
            y = y[0] if isinstance(y, tuple) else y
            loss = loss + F.mse_loss(y.float(), targets[i]) / len(idx)
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
    for y, t in zip(run_layer(layer, x_q), y_fp):
        tot += float(F.mse_loss(y, t, reduction="sum"))
        n += t.numel()
    return tot / max(n, 1)


# ---------------------------------------------------------------- the pass

def _plan_bits(model, cfg: QuantizeConfig) -> dict[str, LinearQuant]:
    arch = arch_of(model)
    n = len(arch.decoder_layers(model))
    plan = {name: LinearQuant(cfg.bits_for(name, n), cfg.group_for(model.get_submodule(name).in_features), cfg.sym)
            for name in arch.linear_names(model)}
    # packed exports (q|k|v, gate|up) need one format per pack
    for i in range(n):
        for pack in arch.pack_groups:
            fmts = {plan[f"{arch.layer_prefix(i)}{p}"] for p in pack}
            if len(fmts) > 1:
                raise UserError(f"bits_overrides give layer {i} projections {', '.join(pack)} different bit "
                                "widths: they are packed into one MatMulNBits and must match")
    return plan


def quantize(parent: Artifact, cfg: QuantizeConfig, ctx: PassContext) -> PassResult:
    t_start = time.perf_counter()
    student = load_model(parent.path)
    arch = arch_of(student)
    for p in student.parameters():
        p.requires_grad_(False)
    masks = ctx.parent_masks()
    plan = _plan_bits(student, cfg)
    train_blocks, held = heldout_split(ctx.training_blocks(), cfg.heldout_blocks)
    calib = train_blocks[:cfg.calibration_blocks]
    bits_set = sorted({q.bits for q in plan.values()})
    ctx.log(f"quantize: {len(plan)} Linears to {'/'.join(map(str, bits_set))}-bit g{cfg.group_size} "
            f"{'sym' if cfg.sym else 'asym'}, init {cfg.init}, embeddings {cfg.embeddings}, "
            f"{calib.shape[0]} calibration sequences")
    teacher = ctx.load_teacher()
    kl_fp = heldout_kl(student, teacher, held)

    # 1-3: layer by layer (Block-AP under bf16 autocast where block_ap_bf16 resolves on)
    from ...hardware import resolve_bf16

    bf16, bf16_why = resolve_bf16(cfg.block_ap_bf16)
    summary: dict[str, Any] = {"init": cfg.init, "layers": [], "block_ap_bf16": bf16, "block_ap_bf16_reason": bf16_why}
    need_stats = cfg.init in ("gptq", "clip")
    any_ap = any(cfg.use_block_ap(q.bits) for q in plan.values()) and cfg.block_ap_steps > 0
    layers = arch.decoder_layers(student)
    steps = (LayerwiseCalibration(student, calib, batch=4, reference=any_ap, arch=arch) if (need_stats or any_ap)
             else None)
    bar = ctx.progress(total=len(layers), desc="quantize layers", unit="layer") if ctx.progress else None
    t0 = time.perf_counter()
    reference: dict[str, torch.Tensor] = {}  # the parent's weights (fp16), by module name
    keep_reference = cfg.recovery in ("ste", "pv") and cfg.train.steps > 0
    try:
        for i, step in enumerate(steps if steps is not None else (None for _ in layers)):
            layer = layers[i]
            stats = step.stats(list(arch.linears)) if step is not None else {}
            errs = {}
            layer_ref = {}
            layer_bits = set()
            for rel in arch.linears:
                full = f"{arch.layer_prefix(i)}{rel}"
                lin = layer.get_submodule(rel)
                q = plan[full]
                layer_bits.add(q.bits)
                h = stats[rel].h if rel in stats else None
                qm = init_linear(lin, q, cfg, h, masks.get(full))
                if h is not None:
                    errs[rel] = Q.output_error(lin.weight.detach().float(), qm.weight, h)
                layer_ref[rel] = lin.weight.detach()
                if keep_reference:
                    reference[full] = lin.weight.detach().half()  # where recovery's latents start
                replace_module(layer, rel, qm)
            rec = {"layer": i, "init_rel_error": errs}
            if any_ap and cfg.use_block_ap(min(layer_bits)):
                with torch.enable_grad():
                    rec["block_ap"] = block_ap(layer, step.inputs, step.reference, cfg, cfg.train.seed * 1000 + i,
                                              bf16=bf16, reference=layer_ref)
            summary["layers"].append(rec)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    summary["layerwise_seconds"] = time.perf_counter() - t0
    del steps

    # embeddings / tied head
    _quantize_embeddings(student, cfg)
    kl_init = heldout_kl(student, teacher, held)
    ctx.log(f"initialization done: held-out KL {kl_init:.4f} (full precision {kl_fp:.4f})")

    # 4: recovery
    recovery: dict[str, Any] = {"mode": cfg.recovery, "kl_heldout_init": kl_init}
    if cfg.recovery != "none" and cfg.train.steps > 0:
        snapshot = _snapshot(student)
        recovery["train"] = _recover(student, teacher, train_blocks, cfg, ctx, reference)
        kl_rec = heldout_kl(student, teacher, held)
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

    if cfg.fp16_scales:
        recovery["fp16_scales"] = _round_scales_fp16(student)
    info = {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym, "init": cfg.init,
            "embeddings": cfg.embeddings, "recovery": cfg.recovery}
    save_quantized(student, ctx.out_dir, info)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    stats = bits_per_weight(student)
    kept = recovery["kept"]
    report = [f"Quantized {len(plan)} Linears to {'/'.join(map(str, bits_set))}-bit g{cfg.group_size} "
              f"({'sym' if cfg.sym else 'asym'}, init {cfg.init}, embeddings {cfg.embeddings}); "
              f"{stats['bits_per_quantized_weight']:.2f} stored bits per quantized weight; held-out KL "
              f"{kl_fp:.4f} (full precision) -> {kl_init:.4f} (initialization)"
              + (f" -> {recovery['kl_heldout_recovered']:.4f} ({cfg.recovery} recovery, kept: {kept})"
                 if "kl_heldout_recovered" in recovery else "") + "."]
    return PassResult(
        metrics={"quantize": {**summary, "recovery": recovery, "kl_heldout_fp": kl_fp, **stats,
                              "seconds": time.perf_counter() - t_start}},
        report=report,
        quantization={**info, "bits_overrides": dict(cfg.bits_overrides),
                      "bits_per_quantized_weight": stats["bits_per_quantized_weight"]},
    )


@torch.no_grad()
def _round_scales_fp16(model) -> dict[str, int]:
    """Round every module's scales to fp16 values (a Linear whose scales fp16 cannot hold, zero or
    out of range, keeps fp32 ones); the weights move by at most 2^-11 of a step."""
    rounded = kept = 0
    for m in quant_modules(model).values():
        s16 = m.scale.detach().half().float()
        if torch.isfinite(s16).all() and bool((s16 > 0).all()):
            m.scale.copy_(s16)
            rounded += 1
        else:
            kept += 1
    return {"rounded": rounded, "kept_fp32": kept}


def _quantize_embeddings(model, cfg: QuantizeConfig) -> None:
    if cfg.embeddings == "keep":
        return
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    if not tied:
        raise UserError("embeddings: quantizing an untied embedding/head is not supported; use embeddings=keep")
    cfg.check_dims({"hidden_size": head.in_features})
    quantize_tied_head_(model, LinearQuant(int(cfg.embeddings), cfg.embed_group_size, cfg.embed_sym))


def bits_per_weight(model) -> dict[str, Any]:
    """Stored bits per quantized weight, scales and zero points included; parameters by kind."""
    qbits = qparams = 0
    for m in quant_modules(model).values():
        n = m.codes.numel()
        qparams += n
        qbits += n * Q.container_bits(m.q.bits) + m.scale.numel() * 32 + (0 if m.q.sym else m.zero.numel() * 8)
    return {"quantized_params": qparams, "bits_per_quantized_weight": qbits / max(qparams, 1)}


# ---------------------------------------------------------------- recovery

def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _restore(model, snap: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(snap[k])


def _recover(student, teacher, blocks, cfg: QuantizeConfig, ctx: PassContext,
             reference: dict[str, torch.Tensor]) -> dict:
    mods = quant_modules(student)
    mode = {"ste": "ste", "pv": "pv", "scales": "frozen"}[cfg.recovery]
    body = {n: m for n, m in mods.items() if n != "lm_head"}
    for n, m in body.items():
        m.start(mode, reference.get(n))
        m.scale.requires_grad_(True)
        m.zero.requires_grad_(not m.q.sym)
    norms = [p for n, p in student.named_parameters() if n.endswith("norm.weight")] if cfg.train_norms else []
    for p in norms:
        p.requires_grad_(True)

    def groups(model):
        lr = cfg.train.lr
        out = [{"params": [m.scale for m in body.values()], "lr": lr}]
        zeros = [m.zero for m in body.values() if m.zero.requires_grad]
        if zeros:
            out.append({"params": zeros, "lr": lr})
        if norms:
            out.append({"params": norms, "lr": lr})
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

    settings, _ = cfg.train.settings(LossWeights.of(cfg))
    ctx.log(f"recovery ({cfg.recovery}): {settings.steps} steps of {settings.batch_size * settings.grad_accum} sequences")
    summary = ctx.train(student, teacher, blocks, settings,
                        hooks=Hooks(param_groups=groups, after_step=after_step, state=state, load_state=load_state))
    for m in body.values():
        m.freeze()
        m.scale.requires_grad_(False)
        m.zero.requires_grad_(False)
    for p in norms:
        p.requires_grad_(False)
    if mode == "pv":
        summary["codes_changed"] = sum(changed)
    return summary
