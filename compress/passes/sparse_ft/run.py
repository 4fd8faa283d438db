"""The ``sparse_ft`` pass: one-shot pruning layer by layer, then fine-tuning with the masks fixed.

1. Per-layer sparsity: uniform, or OWL (each layer's share of outlier Wanda scores, measured on
   the dense model, spreads the layers over ``sparsity +- owl_lambda``; the mean stays the target).
2. Pruning, layer by layer on the calibration sequences (:mod:`compress.calibration`, GPTQ's
   sequential scheme: each layer sees the inputs of the already pruned layers before it):
   SparseGPT (mask and OBS updates of the kept weights), Wanda or magnitude (mask only).
   Embeddings, norms and the head are never pruned.
3. Fine-tuning through the shared loop with the new masks re-applied after every optimizer step:
   ``ce * CE + kl * KL + squarehead * SquareHead`` (the authors' CE 1, SquareHead 1 summed over
   the block outputs, each normalized by the teacher's, padding excluded).

The masks become the stage's ``sparsity`` invariant (``masks.safetensors``): quantize keeps the
pruned weights at exactly zero (integer zero points) and the export carries them.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...arch import arch_of
from ...artifact import Artifact
from ...calibration import LayerwiseCalibration
from ...context import NewMasks, PassContext, PassResult
from ...errors import UserError
from ...evaluation import heldout_kl, heldout_split
from ...models import load_model, save_model
from ...ops import prune as P
from ...ops import quant as Q
from ...tokenizer import copy_tokenizer_files
from ...training.loop import LossWeights
from .config import SparseFTConfig

DENSE_KERNELS_NOTE = ("ONNX Runtime's CPU kernels are dense: the zeros shrink neither the loaded size nor the "
                      "latency of this export; what they change is the compressed download (the 'download MB "
                      "(zstd)' row: smaller only where the kept weights compress no worse than the parent's), "
                      "and they carry into quantization exactly.")


def owl_layer_sparsities(model, calib: torch.Tensor, cfg: SparseFTConfig, arch) -> tuple[list[float], list[float]]:
    """OWL on the dense model: per layer the share of outlier Wanda scores over its Linears."""
    ratios = []
    for step in LayerwiseCalibration(model, calib, batch=4, arch=arch):
        stats = step.stats(list(arch.linears))
        scores = torch.cat([P.wanda_scores(step.layer.get_submodule(rel).weight, stats[rel].sq_norm).reshape(-1)
                            for rel in arch.linears])
        ratios.append(P.outlier_ratio(scores, cfg.owl_m))
    return P.owl_sparsities(ratios, cfg.sparsity, cfg.owl_lambda), ratios


def prune_layerwise(model, calib: torch.Tensor, cfg: SparseFTConfig, sparsities: list[float], arch,
                    progress=None) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Prune every decoder Linear in place; returns ``(masks, per-layer records)``."""
    masks: dict[str, torch.Tensor] = {}
    records = []
    need = cfg.method != "magnitude"
    steps = LayerwiseCalibration(model, calib, batch=4, arch=arch) if need else None
    layers = arch.decoder_layers(model)
    bar = progress(total=len(layers), desc="prune layers", unit="layer") if progress else None
    try:
        for i, step in enumerate(steps if steps is not None else (None for _ in layers)):
            layer = layers[i]
            stats = step.stats(list(arch.linears)) if step is not None else {}
            rec: dict[str, Any] = {"layer": i, "sparsity": sparsities[i], "rel_error": {}}
            for rel in arch.linears:
                lin = layer.get_submodule(rel)
                w = lin.weight.detach().float()
                if cfg.method == "sparsegpt":
                    new, keep = P.sparsegpt(w, stats[rel].h, sparsities[i], cfg.pattern, damp=cfg.damp,
                                            block=cfg.block_size)
                elif cfg.method == "wanda":
                    keep = P.wanda_mask(w, stats[rel].sq_norm, sparsities[i], cfg.pattern)
                    new = w * keep
                else:
                    keep = P.magnitude_mask(w, sparsities[i], cfg.pattern)
                    new = w * keep
                if rel in stats:  # output error on the calibration inputs, relative to the layer's output energy
                    rec["rel_error"][rel] = Q.output_error(w, new, stats[rel].h)
                with torch.no_grad():
                    lin.weight.copy_(new.to(lin.weight.dtype))
                masks[f"{arch.layer_prefix(i)}{rel}"] = keep
            records.append(rec)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    return masks, records


def sparse_ft(parent: Artifact, cfg: SparseFTConfig, ctx: PassContext) -> PassResult:
    t_start = time.perf_counter()
    if ctx.parent_masks():
        raise UserError("sparse_ft: the input model is already sparse (it has sparsity masks); prune a dense model "
                        "once, at the final sparsity")
    student = load_model(parent.path)
    arch = arch_of(student)
    for p in student.parameters():
        p.requires_grad_(False)
    nm = cfg.n_m()
    if nm is not None:
        bad = [n for n in arch.linear_names(student) if student.get_submodule(n).in_features % nm[1]]
        if bad:
            raise UserError(f"sparse_ft.pattern: {cfg.pattern} needs input sizes that are multiples of {nm[1]}; "
                            f"{bad[0]} has {student.get_submodule(bad[0]).in_features}")
    train_blocks, held = heldout_split(ctx.training_blocks(), cfg.heldout_blocks)
    calib = train_blocks[:cfg.calibration_blocks]
    n_layers = len(arch.decoder_layers(student))
    ctx.log(f"sparse_ft: {cfg.method} {cfg.pattern} at {cfg.sparsity:g} ({cfg.ratios}), "
            f"{calib.shape[0]} calibration sequences")
    summary: dict[str, Any] = {"method": cfg.method, "pattern": cfg.pattern, "target_sparsity": cfg.sparsity}
    if cfg.ratios == "owl":
        sparsities, outliers = owl_layer_sparsities(student, calib, cfg, arch)
        summary["owl_outlier_ratios"] = outliers
    else:
        sparsities = [cfg.sparsity] * n_layers
    t0 = time.perf_counter()
    masks, records = prune_layerwise(student, calib, cfg, sparsities, arch, ctx.progress)
    summary["layers"] = records
    summary["prune_seconds"] = time.perf_counter() - t0

    teacher = ctx.load_teacher()
    kl_oneshot = heldout_kl(student, teacher, held)
    summary["kl_heldout_oneshot"] = kl_oneshot
    ctx.log(f"one-shot {cfg.method}: held-out KL {kl_oneshot:.4f}")
    if cfg.train.steps > 0:
        weights = LossWeights.of(cfg)
        settings, why = cfg.train.settings(weights)
        for p in student.parameters():
            p.requires_grad_(True)
        ctx.log(f"sparse fine-tuning: {settings.steps} steps of {settings.batch_size * settings.grad_accum} "
                f"sequences, masks fixed, bf16 {'on' if settings.bf16 else 'off'} ({why})")
        summary["train"] = ctx.train(student, teacher if weights.needs_teacher else None, train_blocks, settings,
                                     masks=masks)
        summary["train"]["bf16_reason"] = why
        for p in student.parameters():
            p.requires_grad_(False)
        summary["kl_heldout_tuned"] = heldout_kl(student, teacher, held)
    save_model(student, ctx.out_dir)
    copy_tokenizer_files(parent.path, ctx.out_dir)  # verbatim: never re-serialized
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    summary["sparsity"] = zeros / max(total, 1)
    summary["seconds"] = time.perf_counter() - t_start
    line = (f"Pruned {len(masks)} decoder Linears with {cfg.method} ({cfg.pattern}, {cfg.ratios}): "
            f"{100 * zeros / max(total, 1):.2f} % zeros; held-out KL {kl_oneshot:.4f} (one-shot)")
    if "kl_heldout_tuned" in summary:
        t = summary["train"]
        line += (f" -> {summary['kl_heldout_tuned']:.4f} after {t['steps']} steps of sparse fine-tuning "
                 f"(CE {cfg.ce:g}, KL {cfg.kl:g}, SquareHead {cfg.squarehead:g})")
    return PassResult(metrics={"sparse_ft": summary}, report=[line + ".", DENSE_KERNELS_NOTE],
                      sparsity=NewMasks(masks, cfg.pattern))
