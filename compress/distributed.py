"""Which process this is, when ``compress`` runs under ``accelerate launch`` or ``torchrun``.

Rank 0 owns every write (stages, data generation, evaluation, report); the other ranks only
take part in the training passes. Torch-free until a process group is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    world: int = 1
    rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self) -> None:
        """Join the process group (gloo on CPU, NCCL on GPUs) through Accelerate."""
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # the same arguments the training loop's Accelerator uses, or it falls back to one process
            PartialState(cpu=not torch.cuda.is_available())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
