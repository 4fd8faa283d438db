"""Profiles: YAML files naming a target, data/evaluation settings and passes.

```yaml
description: one line
target: cpu                     # a target name (profiles/targets), or {name: cpu, threads: 2}
data: {seq_len: 512}            # DataConfig fields
evaluation: {max_tokens: 16384} # EvalConfig fields
passes:
  - name: distill
    config: {steps: 100}
```
Overrides (``--set SECTION.KEY=VALUE``) address ``target``, ``data``, ``evaluation`` or a
pass by name (``--set quantize.train.steps=16``). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


from .config import Config, DataConfig, EvalConfig, parse_override
from .errors import UserError
from .registry import PassSpec, get_pass
from .untrusted import read_yaml
from .target import TargetConfig, target_from_profile

TOP_LEVEL_KEYS = ("description", "target", "data", "evaluation", "passes")
DEFAULT_PROFILE = "quick-4bit"  # compresses: a newcomer sees the product; `baseline` only evaluates


def profiles_dir() -> Path:
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("compress.profiles")))


def available_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(profiles_dir().glob("*.yaml"))}


def profile_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"profile file not found: {name}")
        return path
    known = available_profiles()
    if name not in known:
        raise UserError(f"unknown profile {name!r}; available: {', '.join(known)} (or a path to a .yaml file)")
    return known[name]


@dataclass
class Stage:
    spec: PassSpec
    config: Config


@dataclass
class Pipeline:
    name: str
    description: str
    target: TargetConfig
    data: DataConfig
    evaluation: EvalConfig
    stages: list[Stage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "description": self.description,
            "target": self.target.to_dict(),
            "data": self.data.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "passes": [
                {"name": s.spec.name, "version": s.spec.version, "config": s.config.to_dict()} for s in self.stages
            ],
        }


def read_profile(name: str) -> tuple[str, dict[str, Any]]:
    path = profile_path(name)
    raw = read_yaml(path, "profile")
    if not isinstance(raw, dict):
        raise UserError(f"profile {path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UserError(f"profile {path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(TOP_LEVEL_KEYS)}")
    return path.stem, raw


def _section(raw: dict[str, Any], key: str, pname: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"profile {pname}: '{key}' must be a mapping of settings, not a {type(value).__name__}")
    return dict(value)


def load_pipeline(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    pname, raw = read_profile(name)
    passes_raw = raw.get("passes") or []
    if not isinstance(passes_raw, list):
        raise UserError(f"profile {pname}: 'passes' must be a list")
    entries: list[tuple[PassSpec, dict[str, Any]]] = []
    for i, item in enumerate(passes_raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"profile {pname}: passes[{i}] needs a 'name'")
        extra = sorted(set(item) - {"name", "config"})
        if extra:
            raise UserError(f"profile {pname}: passes[{i}]: unknown key {extra[0]!r}; allowed keys: name, config")
        cfg = item.get("config") or {}
        if not isinstance(cfg, dict):
            raise UserError(f"profile {pname}: passes[{i}].config must be a mapping, not a {type(cfg).__name__}")
        entries.append((get_pass(str(item["name"])), dict(cfg)))

    data_raw = _section(raw, "data", pname)
    eval_raw = _section(raw, "evaluation", pname)
    target_over: dict[str, Any] = {}
    names = [spec.name for spec, _ in entries]
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "target":
            target_over[key] = value
        elif section == "data":
            data_raw[key] = value
        elif section == "evaluation":
            eval_raw[key] = value
        elif section in names:
            if names.count(section) > 1:
                raise UserError(f"override {text!r}: pass {section!r} appears more than once in profile {pname}")
            entries[names.index(section)][1][key] = value
        else:
            allowed = ", ".join(["target", "data", "evaluation", *dict.fromkeys(names)])
            raise UserError(f"override {text!r}: unknown section {section!r}; this profile has: {allowed}")

    stages = [Stage(spec, spec.config.from_dict(cfg, spec.name)) for spec, cfg in entries]
    target = target_from_profile(raw.get("target"), target_over, f"profile {pname}")
    return Pipeline(
        name=pname,
        description=str(raw.get("description", "")),
        target=target,
        data=DataConfig.from_dict(data_raw),
        evaluation=EvalConfig.from_dict(eval_raw),
        stages=stages,
    )

