"""``distill``: knowledge distillation of the current model from the teacher."""

from ...registry import register_pass
from .config import DistillConfig

register_pass(
    "distill",
    config=DistillConfig,
    entry="compress.passes.distill.run:distill",
    summary="fine-tune the model towards the teacher (KL / reverse KL / SquareHead / CE)",
    # algorithm 1: first release; 2: the parent's tokenizer files are copied verbatim (were re-saved)
    algorithm=2,
    accepts=("hf",),
    produces="hf",
    uses=("data", "teacher"),
)
