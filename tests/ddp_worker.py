"""Train the tiny model with the shared loop; run alone or under torchrun (gloo on CPU).

Usage: python ddp_worker.py OUT_FILE BATCH_SIZE
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compress.training.loop import LossWeights, TrainSettings, train  # noqa: E402
from tiny import make_model  # noqa: E402

out, batch = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
teacher, student = make_model(64, seed=1), make_model(64, seed=2)
blocks = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(0))
settings = TrainSettings(steps=6, lr=5e-3, warmup_steps=1, batch_size=batch, grad_accum=2, checkpoint_every=0,
                         loss=LossWeights(kl=1.0, ce=0.1))
res = train(student, teacher, blocks, settings, work_dir=out.parent / f"work-{out.stem}")
import torch.distributed as dist  # noqa: E402

if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({"state": student.state_dict(), "history": res["history"], "world": res["world_size"]}, out)
