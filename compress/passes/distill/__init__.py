"""``distill``: knowledge distillation of the current model from the teacher."""

from ...registry import register_pass
from .config import DistillConfig

register_pass(
    "distill",
    config=DistillConfig,
    entry="compress.passes.distill.run:distill",
    summary="fine-tune the model towards the teacher (KL / reverse KL / SquareHead / CE)",
    needs_data=True,
    needs_teacher=True,
)
