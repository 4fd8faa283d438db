"""What a pass receives besides its input artifact and config, and what it returns (torch-free).

A pass is ``def run(parent: Artifact, cfg, ctx: PassContext) -> PassResult``. It writes its
model into ``ctx.out_dir`` in the format it registered; the runner renames the folder into
place and writes the manifest from the :class:`PassResult`: metrics, report lines, latency
rows and the stage's invariants.

Invariants (``manifest["invariants"]``): ``sparsity`` (:mod:`compress.masks`), ``quantization``
and ``shape``. A pass *keeps* its parent's by default — the runner carries the mask file,
and the training loop (``ctx.train``) re-applies the masks after every optimizer step — and
the runner checks the output against them. A pass that changes one states the new value
(``sparsity=NewMasks(...)``, ``quantization={...}``, ``shape={...}``); a pass that cannot keep
one names it in ``drop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

INVARIANTS = ("sparsity", "quantization", "shape")


@dataclass
class NewMasks:
    """Masks a pass creates or changes: module name -> bool tensor (True = kept)."""

    masks: dict[str, Any]
    pattern: str = "unstructured"


@dataclass
class PassResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    #: markdown lines of this stage's section in report.md (the pass renders its own results)
    report: list[str] = field(default_factory=list)
    #: latency rows (``compress.profiling.harness.profile_model``) measured by this pass
    latency: list[dict[str, Any]] = field(default_factory=list)
    sparsity: NewMasks | None = None  # None: the parent's masks (if any) are kept
    quantization: dict[str, Any] | None = None  # None: the parent's (if any)
    shape: dict[str, Any] | None = None  # None: unchanged
    drop: tuple[str, ...] = ()  # invariants of the parent this pass cannot keep
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    artifact_id: str  # the id of the artifact being produced
    out_dir: Path | None  # temp folder: write the model here; it is renamed into place (None: measure only)
    work_dir: Path  # survives a killed run: checkpoints go here
    teacher_path: Path  # the pipeline's input model (HF folder)
    load_teacher: Callable[[], Any]  # the frozen teacher model (loaded once)
    training_blocks: Callable[[], Any]  # (N, data.seq_len) LongTensor of training data
    progress: Callable[..., Any] | None
    log: Callable[[str], None]
    target: Any = None  # compress.target.TargetConfig: where the pipeline runs and deploys
    parent_masks: Callable[[], dict[str, Any]] = lambda: {}  # the parent's sparsity masks (bool tensors)
    #: the run's evaluation of a PyTorch model (every evaluation domain, as the runner scores a stage;
    #: the teacher's references cached): for a pass that declares ``uses=("eval",)``, else None
    evaluate: Callable[[Any], dict[str, Any]] | None = None

    def train(self, student, teacher, blocks, settings, *, hooks=None, masks=None) -> dict[str, Any]:
        """The shared loop with everything the pass need not know: the parent's sparsity masks
        (held exactly; ``masks`` replaces them for a pass that makes new ones), the checkpoint
        folder and fingerprint, the device, progress and log."""
        from .training.loop import train

        device = getattr(self.target, "device", "auto") or "auto"
        return train(student, teacher, blocks, settings, work_dir=self.work_dir, fingerprint=self.artifact_id,
                     hooks=hooks, progress=self.progress, log=self.log,
                     masks=self.parent_masks() if masks is None else masks, device=device)
