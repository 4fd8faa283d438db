"""``amoeba``: AmoebaLLM (Tang et al. 2024) — one supernet fine-tuning whose every depth x width subnet is
usable, and the measured table of its subnets (format ``supernet``); ``pick``: the most accurate subnet
within a budget, extracted as a plain dense model. The DP layer table is in :mod:`.dp`, FLAP widths in
:mod:`.flap`, the mixture of LoRAs in :mod:`.smol`, running / extracting subnets in :mod:`.subnet`, the
table in :mod:`.measure` (rendered by :mod:`compress.frontier`), the artifact in :mod:`.store`, the passes in :mod:`.run` and :mod:`.pick`."""

from ...formats import Format, _count_safetensors, register_format
from ...registry import register_pass
from .config import AmoebaConfig, PickConfig
from .store import is_supernet, supernet_bytes  # torch-free

SUPERNET = register_format(Format(
    "supernet", "AmoebaLLM supernet (base model + LoRA experts + router + DP table + width orders + subnet table)",
    detect=is_supernet, loader="compress.passes.amoeba.store:load_supernet", count=_count_safetensors,
    weight_bytes=supernet_bytes, priority=15))

register_pass(
    "amoeba",
    config=AmoebaConfig,
    entry="compress.passes.amoeba.run:amoeba",
    summary="AmoebaLLM: DP layer table, FLAP widths, a shape-routed mixture of LoRAs trained with the sandwich "
            "rule; then every depth x width subnet evaluated and its latency measured or predicted",
    # algorithm 1: first release; 2: the measured points' latency is the median of interleaved
    # rounds (latency_rounds), not one profile each
    algorithm=2,
    accepts=("hf",),
    produces="supernet",
    uses=("data", "teacher", "target", "eval"),
    single_process=True,  # the sandwich: four forwards and backwards per optimizer step, which DDP does not take
)

register_pass(
    "pick",
    config=PickConfig,
    entry="compress.passes.amoeba.pick:pick",
    summary="extract the most accurate subnet of a supernet's table within a size / latency / perplexity budget "
            "(measured), as a dense model",
    # algorithm 1: first release; 2: a predicted point is measured in the supernet's rounds
    algorithm=2,
    accepts=("supernet",),
    produces="hf",
    uses=("target",),
)
