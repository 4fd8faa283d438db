"""``sparse_ft``: one-shot pruning (SparseGPT / Wanda / magnitude; unstructured, OWL or N:M), then
fine-tuning with the masks fixed (SquareHead distillation)."""

from ...registry import register_pass
from .config import SparseFTConfig

register_pass(
    "sparse_ft",
    config=SparseFTConfig,
    entry="compress.passes.sparse_ft.run:sparse_ft",
    summary="prune decoder Linears one-shot (SparseGPT / Wanda / magnitude, unstructured or N:M), then fine-tune "
            "with the masks fixed (CE + SquareHead distillation)",
    # algorithm 1: first release
    algorithm=1,
    accepts=("hf",),
    produces="hf",
    uses=("data", "teacher"),
)
