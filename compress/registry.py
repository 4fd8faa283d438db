"""The pass registry: explicit registration, metadata readable without torch.

A pass registers its name, its config class, the dotted path of its run function, its
algorithm version, the formats it accepts and produces, and what its stage id depends on.
The CLI can list and validate passes, resolve profiles and check a plan's formats without
importing the run function, which is imported only when the pass executes.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

from .config import Config
from .errors import UserError

#: Packages whose ``__init__`` registers a built-in pass. Explicit, never scanned.
BUILTIN_PASS_PACKAGES = (
    "compress.passes.distill", "compress.passes.export_onnx", "compress.passes.pat", "compress.passes.profile_latency",
    "compress.passes.quantize", "compress.passes.sparse_ft", "compress.passes.amoeba",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: type[Config]
    entry: str  # "module:function"
    summary: str
    algorithm: int  # bumped whenever the output for the same config and input changes (cache ids follow it)
    accepts: tuple[str, ...]  # input formats (compress.formats)
    produces: str | None  # output format; None: the input's (a pass that measures, or keeps the format)
    uses: tuple[str, ...] = ()  # "data" (training blocks), "teacher", "target", "eval": what its stage id depends on
    changes_model: bool = True  # False: the output computes exactly what the input does (not re-evaluated)
    single_process: bool = False  # True: refuses a multi-process run (accelerate launch / torchrun) up front

    @property
    def version(self) -> str:
        """Schema and algorithm version, as recorded in manifests and hashed into stage ids."""
        return f"{self.config.VERSION}.{self.algorithm}"

    @property
    def needs_data(self) -> bool:
        return "data" in self.uses

    def output_format(self, input_format: str) -> str:
        return self.produces or input_format

    def load(self) -> Callable:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


_REGISTRY: dict[str, PassSpec] = {}
_loaded = False
USES = ("data", "teacher", "target", "eval")  # eval: the run's evaluation text and settings (ctx.evaluate)


def register_pass(
    name: str,
    *,
    config: type[Config],
    entry: str,
    summary: str,
    algorithm: int,
    accepts: tuple[str, ...],
    produces: str | None,
    uses: tuple[str, ...] = (),
    changes_model: bool = True,
    single_process: bool = False,
) -> PassSpec:
    """Register a pass. ``algorithm`` starts at 1 and is bumped (with a line saying why) whenever
    the pass's output changes for the same config and input: stage ids include it, so a rerun
    never reuses a stale stage; ``tests/test_golden.py`` fails until it is bumped."""
    from .formats import _FORMATS

    if not _NAME.match(name):
        raise ValueError(f"pass name {name!r} must be lowercase letters, digits and underscores")
    if name in _REGISTRY:
        raise ValueError(f"pass {name!r} is already registered")
    if not (isinstance(config, type) and issubclass(config, Config)):
        raise TypeError(f"pass {name!r}: config must be a Config subclass")
    if not isinstance(algorithm, int) or algorithm < 1:
        raise ValueError(f"pass {name!r}: algorithm must be an integer >= 1")
    unknown = [f for f in (*accepts, *([produces] if produces else [])) if f not in _FORMATS]
    if unknown or not accepts:
        raise ValueError(f"pass {name!r}: unknown or missing formats {unknown}; known: {', '.join(_FORMATS)}")
    if set(uses) - set(USES):
        raise ValueError(f"pass {name!r}: uses must be among {USES}")
    spec = PassSpec(name, config, entry, summary, algorithm, tuple(accepts), produces, tuple(uses), changes_model,
                    single_process)
    _REGISTRY[name] = spec
    return spec


def ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for pkg in BUILTIN_PASS_PACKAGES:
            importlib.import_module(pkg)


def list_passes() -> list[PassSpec]:
    ensure_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_pass(name: str) -> PassSpec:
    ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown pass {name!r}; available passes: {', '.join(sorted(_REGISTRY)) or 'none'}"
        ) from None
