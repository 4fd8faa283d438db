"""The ``pat`` pass: pruning-aware tuning of the hidden dimension, then the sliced model.

1. The shared mask and the 2L + 1 HSMs (:mod:`.hsm`) are hooked into the model; with
   ``tuning: lora`` every decoder Linear gets a low-rank adapter (:mod:`compress.ops.lora`) and the
   model's own weights stay frozen, with ``full`` every weight is tuned.
2. Tuning through the shared loop for ``G = train.steps`` steps with the loss hook:
   ``ce * CE + kl * KL (+ squarehead * SquareHead)`` on the masked model, plus before ``0.8 G`` the
   mask losses ``count * |#kept - d'| / d' + polarization * (pull of theta to +-0.5)``, plus
   ``identity * sum MSE(A A^T, I)``. The mask, the HSMs and the model's weights are three optimizer
   groups with their own rates. From ``0.5 G`` the kept count is held at exactly ``d'`` (theta shifted
   by one constant before each step); at ``0.8 G`` theta is snapped so that exactly ``d'`` channels
   are kept (a no-op after the hold, but for ties), and the mask is binary from then on.
3. Materialization: adapters folded, every HSM folded into its producer, the kept channels sliced
   out (:func:`.hsm.materialize`). The pass checks that the sliced model's held-out KL equals the
   hard-masked model's, and states the new shape as the stage's ``shape`` invariant.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...arch import arch_of
from ...artifact import Artifact
from ...context import PassContext, PassResult
from ...errors import UserError
from ...evaluation import heldout_kl, heldout_split
from ...models import load_model, save_model
from ...ops.lora import Adapters
from ...sources import config_dims
from ...tokenizer import copy_tokenizer_files
from ...training.loop import Hooks, LossInputs, LossWeights
from .config import PATConfig
from .hsm import PATModules, materialize


def _tunable(student, cfg: PATConfig) -> Adapters | None:
    """Set what of ``student`` trains: every weight (``full``), or low-rank adapters on the decoder
    Linears (``lora``: hooked in, and registered as the submodule ``pat_lora``; returned)."""
    full = cfg.tuning == "full"
    for p in student.parameters():
        p.requires_grad_(full)
    if full:
        return None
    adapters = Adapters(student, arch_of(student).linear_names(student), cfg.lora_rank, cfg.lora_alpha,
                        seed=cfg.train.seed).attach(student)
    student.add_module("pat_lora", adapters)
    return adapters


def _tuned(student, adapters: Adapters | None) -> None:
    """After tuning: nothing trains any more, and the adapters (if any) are folded into the weights."""
    for p in student.parameters():
        p.requires_grad_(False)
    if adapters is not None:
        adapters.fold(student)
        del student._modules["pat_lora"]


def attach(student, cfg: PATConfig) -> tuple[PATModules, Adapters | None]:
    """Hook the PAT modules (and the adapters, under them) into ``student`` as its submodules
    ``pat`` / ``pat_lora``, and set what trains: theta, the HSMs, and the weights or the adapters."""
    adapters = _tunable(student, cfg)  # first: an HSM on o_proj / down_proj then transforms the adapted output
    modules = PATModules(student, cfg.train.steps, cfg.rank, seed=cfg.train.seed).attach(student)
    student.add_module("pat", modules)
    return modules, adapters


def hooks_for(modules: PATModules, cfg: PATConfig, record: dict[str, Any]) -> Hooks:
    mask = modules.mask
    hsm_params = [p for h in modules.transforms() for p in (h.A, h.B, h.scale)]

    def param_groups(model) -> list[dict]:
        own = {id(mask.theta), *map(id, hsm_params)}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
        return [{"params": rest, "lr": cfg.train.lr},
                {"params": [mask.theta], "lr": cfg.mask_lr, "weight_decay": 0.0},
                {"params": hsm_params, "lr": cfg.hsm_lr, "weight_decay": 0.0}]

    def loss(inp: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
        mask.step = inp.step
        if mask.holding():
            shift = mask.hold(cfg.hidden)
            record["hold_shift_max"] = max(record.get("hold_shift_max", 0.0), abs(shift))
        if mask.frozen() and "snapped" not in record:
            record["kept_before_snap"] = int((mask.theta.detach() > 0).sum())
            record["snapped"] = mask.snap(cfg.hidden)
            record["snap_step"] = inp.step
        if inp.weights.needs_teacher:
            inp.teacher_outputs()
        total, parts = inp.distillation(inp.student_outputs())
        if not mask.frozen():
            count, polar = mask.losses(cfg.hidden)
            total = total + cfg.count * count + cfg.polarization * polar
            parts.update(count=float(count.detach()), polar=float(polar.detach()))
        if cfg.identity > 0:
            ident = modules.identity_loss()
            total = total + cfg.identity * ident
            parts["identity"] = float(ident.detach())
        counted = int((mask.theta.detach() >= 0).sum())  # as the count loss counts (theta = 0 is kept)
        parts["kept"] = counted
        record.setdefault("kept", {})[inp.step] = counted
        return total, parts

    return Hooks(param_groups=param_groups, loss=loss, unused_parameters=True)  # theta, from 0.8 G


@torch.no_grad()
def channel_scores(model, method: str, calib: torch.Tensor) -> torch.Tensor:
    """One-shot importance of each residual channel, for the prune-then-tune baselines.

    ``magnitude``: per matrix that writes the channel (the embedding's column, each residual
    writer's row) or reads it (each reader's column, scaled by the norm weight in front of it; the
    head's column), the channel's share of that matrix's squared weights, summed over the matrices.
    ``activation``: per hidden state (the embedding's output and every layer's), the channel's share
    of the residual stream's energy on ``calib``, summed over the hidden states."""
    arch = arch_of(model)

    def share(sq: torch.Tensor) -> torch.Tensor:
        return sq / sq.sum().clamp_min(1e-30)

    if method == "activation":
        total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
        for i in range(calib.shape[0]):
            states = model(input_ids=calib[i:i + 1], output_hidden_states=True, use_cache=False).hidden_states
            for h in states[:-1]:  # the last is after the final norm
                total += share(h.double().pow(2).sum(dim=(0, 1)))
        return total.float()
    score = share(model.get_input_embeddings().weight.double().pow(2).sum(0))
    for layer in arch.decoder_layers(model):
        for rel in arch.residual_writers:
            score += share(layer.get_submodule(rel).weight.double().pow(2).sum(1))
        for rel, norm in arch.reader_norms().items():
            w = layer.get_submodule(rel).weight.double() * layer.get_submodule(norm).weight.double()
            score += share(w.pow(2).sum(0))
    head = model.get_output_embeddings().weight.double() * model.get_submodule(arch.final_norm).weight.double()
    score += share(head.pow(2).sum(0))
    return score.float()


def prune_then_tune(student, teacher, cfg: PATConfig, ctx: PassContext, train_blocks, held, settings,
                    summary: dict[str, Any]) -> int:
    """The baselines: the ``hidden`` best channels by ``channel_scores``, sliced at once, then the
    same losses for the same steps on the sliced model (full or LoRA)."""
    modules = PATModules(student, cfg.train.steps, rank=1)  # identity transforms: a pure slice
    with torch.no_grad():  # scores are >= 0: the snap keeps the `hidden` highest (ties by channel index)
        modules.mask.theta.copy_(channel_scores(student, cfg.method, train_blocks[:cfg.calibration_blocks]))
    modules.mask.snap(cfg.hidden)
    summary["kept_channels"] = modules.mask.kept().tolist()
    d_new = materialize(student, modules)
    summary["kl_heldout_oneshot"] = heldout_kl(student, teacher, held)
    ctx.log(f"pat ({cfg.method}): sliced one-shot to {d_new} channels, held-out KL {summary['kl_heldout_oneshot']:.4f}")
    adapters = _tunable(student, cfg)
    summary["trainable_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    summary["train"] = ctx.train(student, teacher, train_blocks, settings)
    _tuned(student, adapters)
    return d_new


def _pat(student, teacher, cfg: PATConfig, ctx: PassContext, train_blocks, held, settings, why: str,
         summary: dict[str, Any]) -> int:
    """PAT proper: the mask learned while tuning, then the model sliced; returns ``d'``."""
    scores = (channel_scores(student, cfg.mask_init, train_blocks[:cfg.calibration_blocks])
              if cfg.mask_init != "zero" else None)  # on the unhooked model
    modules, adapters = attach(student, cfg)
    summary["mask_init"] = cfg.mask_init
    if scores is not None:
        modules.mask.rank_init(scores, cfg.hidden, cfg.mask_init_spread)
        summary["init_channels"] = modules.mask.kept().tolist()
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    summary["trainable_parameters"] = trainable
    ctx.log(f"pat: hidden {summary['hidden_from']} -> {cfg.hidden}, {cfg.tuning} tuning ({trainable / 1e6:.1f} M "
            f"trainable), {settings.steps} steps of {settings.batch_size * settings.grad_accum} sequences, bf16 "
            f"{'on' if settings.bf16 else 'off'} ({why})")
    record: dict[str, Any] = {}
    summary["train"] = ctx.train(student, teacher, train_blocks, settings, hooks=hooks_for(modules, cfg, record))
    summary["train"]["bf16_reason"] = why
    _tuned(student, adapters)  # the adapters fold into the weights before the HSMs fold on top
    mask = modules.mask
    mask.step, mask.hard = settings.steps, True
    mask.snap(cfg.hidden)  # a no-op after a full schedule (snapped at 0.8 G)
    kept_per_step = record.get("kept", {})
    summary["kept_per_step"] = [kept_per_step[k] for k in sorted(kept_per_step)]
    summary.update({k: record[k] for k in ("kept_before_snap", "snapped", "snap_step", "hold_shift_max") if k in record})
    summary["kl_heldout_masked"] = heldout_kl(student, teacher, held)
    summary["kept_channels"] = mask.kept().tolist()
    if "init_channels" in summary:  # how far tuning moved the mask from its warm start
        summary["kept_changed_from_init"] = len(set(summary["kept_channels"]) - set(summary["init_channels"]))
    d_new = materialize(student, modules)
    del student._modules["pat"]
    summary["kl_heldout"] = heldout_kl(student, teacher, held)
    a, b = summary["kl_heldout_masked"], summary["kl_heldout"]
    if a == a and abs(a - b) > 1e-3 + 1e-2 * abs(a):  # NaN (no held-out sequences): nothing to compare
        raise RuntimeError(f"pat: the sliced model's held-out KL {b:.5f} differs from the hard-masked model's {a:.5f}")
    return d_new


def pat(parent: Artifact, cfg: PATConfig, ctx: PassContext) -> PassResult:
    t_start = time.perf_counter()
    if ctx.parent_masks():
        raise UserError("pat: the input model is sparse (it has sparsity masks); PAT slices the hidden dimension "
                        "of a dense model: run it before sparse_ft")
    student = load_model(parent.path)
    cfg.check_dims(config_dims(student.config.to_dict()))  # the plan checked the source; an artifact may differ
    d = student.config.hidden_size
    train_blocks, held = heldout_split(ctx.training_blocks(), cfg.heldout_blocks)
    teacher = ctx.load_teacher()
    settings, why = cfg.train.settings(LossWeights.of(cfg))
    summary: dict[str, Any] = {"method": cfg.method, "hidden_from": d, "hidden_to": cfg.hidden, "tuning": cfg.tuning}
    if cfg.method != "pat":
        d_new = prune_then_tune(student, teacher, cfg, ctx, train_blocks, held, settings, summary)
        summary["train"]["bf16_reason"] = why
        summary["kl_heldout"] = heldout_kl(student, teacher, held)
    else:
        d_new = _pat(student, teacher, cfg, ctx, train_blocks, held, settings, why, summary)
    save_model(student, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    summary["parameters_after"] = sum(p.numel() for p in student.parameters())
    summary["seconds"] = time.perf_counter() - t_start
    shape = arch_of(student).shape(student.config.to_dict())
    t = summary["train"]
    if cfg.method == "pat":
        line = (f"PAT sliced the hidden dimension {d} -> {d_new} ({cfg.tuning} tuning, {t['steps']} steps, theta "
                f"from {cfg.mask_init}; the mask "
                f"kept {summary.get('kept_before_snap', d_new)} channels at 0.8 G, snapped to {d_new}): held-out KL to "
                f"the teacher {summary['kl_heldout']:.4f}.")
    else:
        line = (f"Sliced the hidden dimension {d} -> {d_new} one-shot by {cfg.method} (the prune-then-tune baseline), "
                f"then {cfg.tuning} tuning for {t['steps']} steps: held-out KL to the teacher "
                f"{summary['kl_heldout_oneshot']:.4f} -> {summary['kl_heldout']:.4f}.")
    return PassResult(metrics={"pat": summary}, report=[line], shape=shape)
