"""Targets: where a pipeline runs and its model deploys — YAML files under ``profiles/targets``
(or any path), torch-free.

``--target cpu`` reads ``cpu.yaml``; ``cpu:4`` is the same with 4 threads. A profile names its
target (``target: cpu``, or a mapping of these fields over a named base); ``--set
target.threads=2`` overrides a field. The runner hands the typed target to every pass and sets
torch's thread count from it for the duration of each pass only (:meth:`TargetConfig.torch_threads`),
so no pass leaks a process-wide setting into the next.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal


from .config import Config, help_field
from .untrusted import read_yaml
from .errors import UserError


@dataclass(frozen=True, kw_only=True)
class TargetConfig(Config):
    """Where and how a model runs: device, threads, ONNX Runtime options."""

    SECTION: ClassVar[str] = "target"

    name: str = help_field("cpu", "target name (file stem)")
    description: str = help_field("", "one line")
    device: Literal["cpu", "cuda"] = help_field("cpu", "execution device")
    threads: int = help_field(0, "intra-op threads (0 = one per physical core)")
    precision: Literal["fp32", "fp16"] = help_field("fp32", "export precision for this target")
    accuracy_level: int = help_field(4, "MatMulNBits accuracy level (0 = unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)")
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = help_field("all", "ONNX Runtime graph optimization level")
    session_options: dict[str, Any] = help_field({}, "ONNX Runtime session config entries")
    provider_options: dict[str, Any] = help_field({}, "execution provider options")

    def validate(self) -> None:
        if self.threads < 0:
            self._fail("threads", "must be >= 0")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            self._fail("accuracy_level", "must be 0..4")

    def resolved_threads(self) -> int:
        """The thread count actually used (0 resolved to the physical core count)."""
        if self.threads:
            return self.threads
        try:
            import psutil

            return psutil.cpu_count(logical=False) or os.cpu_count() or 1
        except ImportError:
            return os.cpu_count() or 1

    def preflight(self) -> None:
        """Fail before any work where this machine cannot be the target."""
        if self.device == "cuda":
            from exporters.onnx.runtime import check_provider

            check_provider("cuda")

    @contextlib.contextmanager
    def torch_threads(self):
        """torch's intra-op threads = ``threads`` (0: torch's default) inside, the old value after."""
        if not self.threads:
            yield
            return
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def label(self) -> str:
        return f"{self.device}:{self.resolved_threads()}" if self.device == "cpu" else self.device


def targets_dir() -> Path:
    from .profiles import profiles_dir

    return profiles_dir() / "targets"


def available_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.yaml"))


def load_target(spec: str) -> TargetConfig:
    """``cpu``, ``cpu:4``, ``cuda`` or a path to a target YAML file (optionally ``:THREADS``)."""
    name, threads = spec, None
    if ":" in spec and spec.rsplit(":", 1)[1].isdigit():
        name, t = spec.rsplit(":", 1)
        threads = int(t)
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"target file not found: {name}")
    else:
        path = targets_dir() / f"{name}.yaml"
        if not path.is_file():
            raise UserError(f"unknown target {name!r}; available: {', '.join(available_targets())} "
                            "(optionally :THREADS, e.g. cpu:4, or a path to a .yaml file)")
    raw = read_yaml(path, "target") or {}
    if not isinstance(raw, dict):
        raise UserError(f"target {path}: expected a mapping")
    raw.setdefault("name", path.stem)
    if threads is not None:
        raw["threads"] = threads
    return TargetConfig.from_dict(raw, f"target {path.stem}")


def target_from_profile(raw: Any, overrides: dict[str, Any] | None = None, where: str = "profile") -> TargetConfig:
    """A profile's ``target``: a name (``cpu``, ``cuda:1``, a .yaml path) or a mapping of fields over
    the target named by its ``name`` (default: its ``device``, else ``cpu``); ``overrides`` last."""
    overrides = dict(overrides or {})
    if raw is None or raw == {}:
        raw = "cpu"
    if isinstance(raw, str):
        base, fields = load_target(raw), {}
    elif isinstance(raw, dict):
        fields = dict(raw)
        base = load_target(str(fields.pop("name", fields.get("device", "cpu"))))
    else:
        raise UserError(f"{where}: 'target' must be a target name or a mapping, got {raw!r}")
    if not fields and not overrides:
        return base
    return TargetConfig.from_dict({**base.to_dict(), **fields, **overrides}, "target")
