"""``pat``: pruning-aware tuning of the hidden dimension (PAT): a shared trainable mask over the
residual channels learned while the model is tuned, then the model sliced to ``hidden`` channels.
The modules and their materialization are in :mod:`.hsm`, the pass in :mod:`.run`."""

from ...registry import register_pass
from .config import PATConfig

register_pass(
    "pat",
    config=PATConfig,
    entry="compress.passes.pat.run:pat",
    summary="learn which residual channels to keep while tuning (shared mask, HSM transforms, CE + KL), then slice "
            "the hidden dimension to pat.hidden",
    # algorithm 1: first release; 2: the kept count held at d' from 0.5 G (theta shifted before each step);
    # 3: theta starts ranked by the activation scores (mask_init: activation, the new default)
    algorithm=3,
    accepts=("hf",),
    produces="hf",
    uses=("data", "teacher"),
)
