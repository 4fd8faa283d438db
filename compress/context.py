"""What a pass receives besides its input artifact and config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class PassContext:
    artifact_id: str  # the id of the artifact being produced
    out_dir: Path  # temp folder: write the HF model here; it is renamed into place
    work_dir: Path  # survives a killed run: checkpoints go here
    teacher_path: Path  # the pipeline's input model (HF folder)
    load_teacher: Callable[[], Any]  # the frozen teacher model (loaded once)
    training_blocks: Callable[[], Any]  # (N, data.seq_len) LongTensor of training data
    progress: Callable[..., Any] | None
    log: Callable[[str], None]
