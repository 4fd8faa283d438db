"""One distillation/fine-tuning loop for every training pass.

- losses: CE, forward KL, reverse KL and SquareHead from ``compress.ops.losses``,
  weighted; the frozen teacher runs under ``no_grad``;
- AdamW, linear warmup then cosine decay to ``min_lr_ratio``, gradient accumulation,
  gradient clipping, optional bf16 autocast;
- hooks: ``param_groups(model)`` shapes the optimizer, ``after_step(model, step)``
  runs after every ``optimizer.step()``, ``loss(inputs)`` replaces the step's loss (extra
  terms such as regularizers, several forwards per step: :class:`LossInputs`);
- sparsity masks (``masks``: module name -> bool, True = kept) are applied before the first
  step and re-applied after every optimizer step, so a sparse model stays exactly sparse;
- checkpoints every ``checkpoint_every`` steps (trainable parameters, optimizer
  state, step, loss history) that a resumed run continues from exactly;
- device-agnostic through Hugging Face Accelerate: the same code runs on CPU, one
  GPU, or several processes (``accelerate launch`` / ``torchrun``; gloo on CPU).
  Each process takes its own slice of every global batch. Token-mean losses (CE,
  KL) then equal the single-process loss on the global batch; SquareHead, a ratio
  of means, is normalized per process batch, as in the authors' multi-GPU runs.

The data order is a pure function of (seed, step), so a resumed run sees exactly
the batches the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..ops import losses

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.0
    kl: float = 1.0
    reverse_kl: float = 0.0
    squarehead: float = 0.0
    temperature: float = 1.0

    @classmethod
    def of(cls, cfg: Any) -> "LossWeights":
        """The weights a pass config states (its ``ce``, ``kl``, ``reverse_kl``, ``squarehead``,
        ``temperature``; the ones it lacks at 0, the temperature at 1)."""
        return cls(**{f: getattr(cfg, f, 1.0 if f == "temperature" else 0.0)
                      for f in ("ce", "kl", "reverse_kl", "squarehead", "temperature")})

    @property
    def needs_teacher(self) -> bool:
        return any(w > 0 for w in (self.kl, self.reverse_kl, self.squarehead))


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float = 5e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    batch_size: int = 4  # sequences per process per micro-step
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    bf16: bool = False
    schedule: str = "cosine"  # after warm-up: cosine | linear decay to min_lr_ratio, or constant
    loss: LossWeights = field(default_factory=LossWeights)


@dataclass
class Hooks:
    param_groups: Callable[[torch.nn.Module], list[dict]] | None = None
    after_step: Callable[[torch.nn.Module, int], None] | None = None
    # state outside the trainable parameters that a resumed run needs (e.g. re-rounded codes)
    state: Callable[[torch.nn.Module], dict] | None = None
    load_state: Callable[[torch.nn.Module, dict], None] | None = None
    # the loss of one micro-batch: (loss, {term: value}); default: the weighted distillation terms
    loss: Callable[["LossInputs"], tuple[torch.Tensor, dict[str, float]]] | None = None
    # some trainable parameters stop receiving gradients part-way (e.g. PAT's mask after 0.8 G):
    # under several processes DDP must then look for unused parameters each step
    unused_parameters: bool = False


@dataclass
class LossInputs:
    """What a loss hook gets for one micro-batch. Forwards run under the loop's autocast; the
    teacher's outputs are computed once per micro-batch, whoever asks first."""

    student: torch.nn.Module  # as wrapped for training (DDP under several processes)
    unwrapped: torch.nn.Module  # the same model, unwrapped (to reach modules and parameters)
    teacher: torch.nn.Module | None
    ids: torch.Tensor
    step: int
    weights: LossWeights
    need_hidden: bool
    autocast: Any
    _teacher_out: Any = None
    _backward: Callable[[torch.Tensor], None] | None = None
    partial_loss: float = 0.0  # the parts already back-propagated (backward_now)

    def backward_now(self, loss: torch.Tensor) -> None:
        """Back-propagate part of this micro-batch's loss now, freeing its graph (a loss of several
        forwards: a supernet's subnets); the loop adds its value to the step's loss."""
        if self._backward is None:
            raise RuntimeError("backward_now: not inside the training loop")
        self._backward(loss)
        self.partial_loss += float(loss.detach())

    def teacher_outputs(self):
        if self._teacher_out is None:
            if self.teacher is None:
                raise ValueError("this loss needs a teacher")
            with self.autocast, torch.no_grad():
                self._teacher_out = self.teacher(input_ids=self.ids, output_hidden_states=self.need_hidden,
                                                 use_cache=False)
        return self._teacher_out

    def student_outputs(self, **kwargs: Any):
        with self.autocast:
            return self.student(input_ids=self.ids, output_hidden_states=self.need_hidden, use_cache=False, **kwargs)

    def distillation(self, s_out) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured weighted CE / KL / reverse KL / SquareHead terms for ``s_out``."""
        t_out = self.teacher_outputs() if self.weights.needs_teacher else None
        return distillation_loss(self.weights, s_out, t_out, self.ids, None)


def default_loss(inp: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    if inp.weights.needs_teacher:
        inp.teacher_outputs()  # the teacher runs first, as it always has (same numerics)
    return inp.distillation(inp.student_outputs())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_indices(step: int, micro: int, rank: int, settings: TrainSettings, world: int, n: int) -> torch.Tensor:
    """Block indices of one process's micro-batch: a pure function of (seed, step)."""
    per_step = settings.batch_size * world * settings.grad_accum
    first = step * per_step + micro * settings.batch_size * world + rank * settings.batch_size
    positions = torch.arange(first, first + settings.batch_size)
    out = torch.empty_like(positions)
    for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        sel = positions.div(n, rounding_mode="floor") == epoch
        out[sel] = perm[positions[sel] % n]
    return out


def distillation_loss(weights: LossWeights, s_out, t_out, ids: torch.Tensor, mask: torch.Tensor | None):
    parts: dict[str, torch.Tensor] = {}
    if weights.ce > 0:
        parts["ce"] = losses.cross_entropy(s_out.logits, ids, mask)
    if weights.kl > 0:
        parts["kl"] = losses.forward_kl(s_out.logits, t_out.logits, mask, weights.temperature)
    if weights.reverse_kl > 0:
        parts["reverse_kl"] = losses.reverse_kl(s_out.logits, t_out.logits, mask, weights.temperature)
    if weights.squarehead > 0:
        parts["squarehead"] = losses.squarehead(s_out.hidden_states[1:], t_out.hidden_states[1:], mask)
    if not parts:
        raise ValueError("every loss weight is zero")
    total = sum(getattr(weights, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(
    student: torch.nn.Module, teacher: torch.nn.Module | None, blocks: torch.Tensor, settings: TrainSettings,
    *, work_dir: Path, fingerprint: str = "", hooks: Hooks | None = None, progress: Callable | None = None,
    log: Callable[[str], None] | None = None, masks: dict[str, torch.Tensor] | None = None, device: str = "auto",
) -> dict:
    """Train ``student`` in place on ``blocks`` (``(N, T)`` token ids); return a summary.

    ``work_dir`` holds the checkpoint; one whose ``fingerprint`` differs is ignored. ``masks``
    (module name -> bool, True = kept) hold exactly throughout. ``device``: ``cpu``, ``cuda``
    or ``auto`` (CUDA where available). Torch's thread count is the caller's (the runner sets
    it from the profile's target for the duration of a pass).
    """
    from accelerate import Accelerator

    from ..masks import apply_masks_

    hooks = hooks or Hooks()
    loss_fn = hooks.loss or default_loss
    if hooks.loss is None and settings.loss.needs_teacher and teacher is None:
        raise ValueError("these loss weights need a teacher")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    handlers = []
    if hooks.unused_parameters:
        from accelerate.utils import DistributedDataParallelKwargs

        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(cpu=not use_cuda, kwargs_handlers=handlers)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    work_dir = Path(work_dir)
    ckpt_path = work_dir / CHECKPOINT

    student.train()
    student.config.use_cache = False
    groups = hooks.param_groups(student) if hooks.param_groups else [{"params": list(_trainable(student).values())}]
    for g in groups:
        g.setdefault("weight_decay", settings.weight_decay)
        g["base_lr"] = g.get("lr", settings.lr)
        g["lr"] = g["base_lr"]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)

    masks = masks or {}
    if masks:
        apply_masks_(student, masks)  # the parent's zeros, exactly (a no-op when it already obeys them)
    start_step, history = 0, []
    state = _load_checkpoint(ckpt_path, _trainable(student), len(groups), fingerprint, world,
                             log if accelerator.is_main_process else None, set_aside=accelerator.is_main_process)
    if state is not None:
        params = _trainable(student)
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        if hooks.load_state and state.get("extra") is not None:
            hooks.load_state(student, state["extra"])
        start_step, history = int(state["step"]), list(state["history"])
        if log and accelerator.is_main_process:
            log(f"resuming from checkpoint at step {start_step}/{settings.steps}")

    if teacher is not None:
        teacher.eval().requires_grad_(False)
        teacher.to(device)
    student, optimizer = accelerator.prepare(student, optimizer)
    unwrapped = accelerator.unwrap_model(student)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    need_hidden = settings.loss.squarehead > 0
    n = blocks.shape[0]
    t0 = time.perf_counter()
    tokens = 0
    bar = None
    if progress and accelerator.is_main_process:
        bar = progress(total=settings.steps, initial=start_step, desc="train", unit="step")
    try:
        for step in range(start_step, settings.steps):
            factor = lr_factor(step, settings.warmup_steps, settings.steps, settings.min_lr_ratio, settings.schedule)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            step_loss, step_parts = 0.0, {}
            for micro in range(settings.grad_accum):
                ids = blocks[batch_indices(step, micro, rank, settings, world, n)].to(device)
                sync = micro == settings.grad_accum - 1
                ctx = accelerator.no_sync(student) if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    inp = LossInputs(student, unwrapped, teacher, ids, step, settings.loss, need_hidden, autocast,
                                     _backward=lambda part: accelerator.backward(part / settings.grad_accum))
                    loss, parts = loss_fn(inp)
                    accelerator.backward(loss / settings.grad_accum)
                step_loss += (float(loss.detach()) + inp.partial_loss) / settings.grad_accum
                for k, v in parts.items():
                    step_parts[k] = step_parts.get(k, 0.0) + v / settings.grad_accum
                tokens += ids.numel() * world
            if settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masks:
                apply_masks_(unwrapped, masks)
            if hooks.after_step:
                hooks.after_step(unwrapped, step + 1)
            if world > 1:
                step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=device), "mean"))
            history.append(step_loss)
            if bar:
                bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.3f}" for k, v in step_parts.items()})
                bar.update(1)
            done = step + 1
            if settings.checkpoint_every > 0 and done % settings.checkpoint_every == 0 and done < settings.steps:
                _save_checkpoint(accelerator, unwrapped, optimizer, done, history, fingerprint, world, ckpt_path,
                                 hooks.state(unwrapped) if hooks.state else None)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(student)
    student.eval()
    accelerator.free_memory()
    return {
        "steps": settings.steps,
        "resumed_from_step": start_step,
        "loss_first": history[0] if history else None,
        "loss_last": history[-1] if history else None,
        "history": history,
        "train_seconds": seconds,
        "train_tokens_per_second": tokens / seconds if seconds > 0 and tokens else None,
        "world_size": world,
        "settings": {**asdict(settings)},
    }


def _save_checkpoint(accelerator, model, optimizer, step, history, fingerprint, world, path: Path,
                     extra: dict | None = None) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "params": {k: v.detach().cpu().clone() for k, v in _trainable(model).items()},
            "optimizer": optimizer.state_dict(),
            "history": list(history),
            "fingerprint": fingerprint,
            "world": world,
            "extra": extra,
        }
        write_checkpoint(state, path)
    accelerator.wait_for_everyone()


def write_checkpoint(state: dict, path: Path) -> None:
    """Publish a checkpoint atomically and durably: written to a temp file and fsynced, the
    current one kept as ``.prev`` (the last good one, should the new one be damaged later), then
    renamed into place. A failed write (disk full) removes its temp file and is one line."""
    from ..artifact import fsync_dir, remove_stale_temps

    remove_stale_temps(path.parent)  # temp files of killed writers
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, _previous(path))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        from ..artifact import disk_full
        from ..errors import UserError, one_line

        if disk_full(exc, path.parent):
            raise UserError(f"no space left on device while writing checkpoint {path}") from None
        if isinstance(exc, OSError):
            raise UserError(f"cannot write checkpoint {path}: {one_line(exc.strerror or exc)}") from None
        raise


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _load_checkpoint(path: Path, params: dict[str, torch.Tensor], n_groups: int, fingerprint: str, world: int,
                     log: Callable | None, set_aside: bool = True) -> dict | None:
    """The newest good checkpoint of this training (``path``, else its ``.prev``), or None.

    A checkpoint that does not load or does not fit this model (truncated, refused by the
    safe unpickler, other shapes) is reported in one line and set aside as ``*.bad``; one of a
    different run (fingerprint, world size) is ignored."""
    for candidate in (path, _previous(path)):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            problem = _checkpoint_problem(state, params, n_groups)
        except Exception as exc:  # noqa: BLE001 - any failure to read means damaged
            from ..errors import one_line

            problem = f"{type(exc).__name__}: {one_line(exc)[:200]}"
        if problem is not None:
            if set_aside:  # the main process only: the others just skip it
                bad = candidate.with_name(candidate.name + f".bad-{int(time.time())}")
                with contextlib.suppress(OSError):
                    os.replace(candidate, bad)
                if log:
                    log(f"checkpoint {candidate} is damaged ({problem}); set aside as {bad.name}")
            continue
        if state.get("fingerprint") != fingerprint or state.get("world") != world:
            continue
        return state
    if log and any(path.parent.glob(path.name + ".bad-*")):
        log("no good checkpoint left: training restarts from the start")
    return None


def _checkpoint_problem(state: Any, params: dict[str, torch.Tensor], n_groups: int) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a checkpoint"
    for key, kind in (("step", int), ("params", dict), ("optimizer", dict), ("history", list)):
        if not isinstance(state.get(key), kind):
            return f"no {key!r}"
    if state.get("fingerprint") is None:
        return "no fingerprint"
    for name, value in state["params"].items():
        if name not in params:
            return f"unknown parameter {name!r}"
        if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
            return f"parameter {name!r} has another shape"
        if not torch.isfinite(value).all():
            return f"parameter {name!r} is not finite"
    if set(state["params"]) != set(params):
        return "parameters missing"
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or len(groups) != n_groups:
        return "optimizer state of another shape"
    return None

