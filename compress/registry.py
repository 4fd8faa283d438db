"""The pass registry: explicit registration, metadata readable without torch.

A pass registers its name, its config class and the dotted path of its run
function. The CLI can list and validate passes (and resolve profiles) without
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
    "compress.passes.distill", "compress.passes.export_onnx", "compress.passes.profile_latency",
    "compress.passes.quantize",
)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: type[Config]
    entry: str  # "module:function"
    summary: str
    needs_data: bool = False  # consumes training/calibration data (part of its artifact id)
    needs_teacher: bool = False
    output_format: str | None = "hf"  # "hf" | "onnx"; None: the same format as the input
    changes_model: bool = True  # False: the output computes exactly what the input does (not re-evaluated)

    @property
    def version(self) -> int:
        return self.config.VERSION

    def load(self) -> Callable:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


_REGISTRY: dict[str, PassSpec] = {}
_loaded = False


def register_pass(
    name: str,
    *,
    config: type[Config],
    entry: str,
    summary: str,
    needs_data: bool = False,
    needs_teacher: bool = False,
    output_format: str | None = "hf",
    changes_model: bool = True,
) -> PassSpec:
    if not _NAME.match(name):
        raise ValueError(f"pass name {name!r} must be lowercase letters, digits and underscores")
    if name in _REGISTRY:
        raise ValueError(f"pass {name!r} is already registered")
    if not (isinstance(config, type) and issubclass(config, Config)):
        raise TypeError(f"pass {name!r}: config must be a Config subclass")
    spec = PassSpec(name, config, entry, summary, needs_data, needs_teacher, output_format, changes_model)
    _REGISTRY[name] = spec
    return spec


def _ensure_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for pkg in BUILTIN_PASS_PACKAGES:
            importlib.import_module(pkg)


def list_passes() -> list[PassSpec]:
    _ensure_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_pass(name: str) -> PassSpec:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown pass {name!r}; available passes: {', '.join(sorted(_REGISTRY)) or 'none'}"
        ) from None
