"""Typed, versioned, strict configuration objects.

Every pass config, and the pipeline's ``data`` and ``evaluation`` sections, is a
frozen dataclass deriving from :class:`Config`. Loading from a dict rejects unknown
keys (naming the key and the allowed ones), coerces values given as strings (from
``--set``), and validates ranges in ``validate``. Configs round-trip through
``{"type", "version", "data"}`` dicts and have a canonical JSON form that artifact
ids are hashed from.

This module must not import torch: the CLI resolves profiles with it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from .errors import UserError
from .untrusted import yaml_scalar


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field documented next to itself (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; parse strings where unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.strip().lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and not isinstance(value, bool):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no (e.g. --set x=on) as booleans
            names = ("on", "true", "yes") if value else ("off", "false", "no")
        elif isinstance(value, (str, int, float)):  # any case; numbers reach string choices (embeddings: 8)
            names = (str(value).strip().lower(),)
        else:
            names = ()
        for a in allowed:
            if str(a).lower() in names:
                return a
        raise UserError(f"{where}: expected one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{where}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


@dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every config: strict dict loading, canonical JSON, validation."""

    VERSION: ClassVar[int] = 1
    #: Name used in error messages (``data``, ``evaluation`` or the pass name).
    SECTION: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UserError` for out-of-range values. Override per config."""

    def preflight(self) -> None:
        """Checks against this machine before a run starts (e.g. a CUDA target). Override per config."""

    def training_sequences(self) -> int | None:
        """How many training sequences (of ``data.seq_len`` tokens) the pass draws, for sizing the
        teacher-written data; None: it takes no training data. Override per pass config."""
        return None

    def _fail(self, key: str, message: str) -> None:
        raise UserError(f"{self.SECTION}.{key}: {message}")

    def _nonnegative(self, *keys: str) -> None:
        for key in keys:
            if getattr(self, key) < 0:
                self._fail(key, "must be >= 0")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def sections(cls) -> dict[str, type["Config"]]:
        """Fields that are themselves configs (e.g. a training pass's ``train``), by name."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if isinstance(hints[f.name], type) and issubclass(hints[f.name], Config)}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Help of every field; the fields of an embedded section as ``section.key``."""
        nested = cls.sections()
        out = {}
        for f in dataclasses.fields(cls):
            if f.name in nested:
                out.update({f"{f.name}.{k}": h for k, h in nested[f.name].field_help().items()})
            else:
                out[f.name] = f.metadata.get("help", "")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, section: str | None = None) -> "Config":
        """Build from a plain dict, rejecting unknown keys and coercing values.

        An embedded section (a field whose type is a Config) takes a mapping that is merged over
        the field's default, ``section.key`` keys, or — where the name is unambiguous — its keys
        at the top level (``steps`` for ``train.steps``), so ``--set quantize.steps=16`` still works.
        """
        section = section or cls.SECTION
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{section}: expected a mapping, got {data!r}")
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        allowed = cls.field_names()
        nested = cls.sections()
        sub: dict[str, dict[str, Any]] = {name: {} for name in nested}
        for key in list(data):
            head, dot, rest = key.partition(".")
            if dot and head in nested:
                sub[head][rest] = data.pop(key)
            elif key not in allowed:
                owners = [n for n, c in nested.items() if key in c.field_names()]
                if len(owners) == 1:
                    sub[owners[0]][key] = data.pop(key)
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            keys = [k for k in allowed if k not in nested] + [f"{n}.{k}" for n, c in nested.items() for k in c.field_names()]
            raise UserError(f"{section}: unknown key {unknown[0]!r}; allowed keys: {', '.join(keys)}")
        values = {}
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        for k, v in data.items():
            if k in nested:
                if isinstance(v, Config):
                    v = v.to_dict()
                if not isinstance(v, dict):
                    raise UserError(f"{section}.{k}: expected a mapping, got {v!r}")
                sub[k] = {**v, **sub[k]}
            else:
                values[k] = _coerce(v, hints[k], f"{section}.{k}")
        for name, given in sub.items():
            if given or name in data:
                base = _field_default(defaults[name])
                merged = {**(base.to_dict() if base is not None else {}), **given}
                values[name] = nested[name].from_dict(merged, f"{section}.{name}")
        try:
            return cls(**values)
        except UserError as exc:
            msg = str(exc)
            if section != cls.SECTION and msg.startswith(f"{cls.SECTION}."):  # an embedded section: full path
                raise UserError(f"{section}{msg[len(cls.SECTION):]}") from None
            raise
        except TypeError as exc:  # pragma: no cover - dataclass signature errors
            raise UserError(f"{section}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            out[f.name] = list(v) if isinstance(v, tuple) else (dict(v) if isinstance(v, dict) else v)
        return out

    def to_typed_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "version": self.VERSION, "data": self.to_dict()}

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` (or ``section.sub.key=value`` for an embedded section such as
    ``distill.train.steps``); the value is read as a YAML scalar."""
    if "=" not in text:
        raise UserError(f"bad override {text!r}: expected SECTION.KEY=VALUE, e.g. distill.lr=1e-4")
    lhs, raw = text.split("=", 1)
    if lhs.count(".") not in (1, 2) or not all(lhs.split(".")):
        raise UserError(f"bad override {text!r}: expected SECTION.KEY=VALUE, e.g. distill.lr=1e-4")
    section, key = lhs.split(".", 1)
    try:
        value = yaml_scalar(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section.strip(), key.strip(), value


# ----------------------------------------------------------------------------------------
# Pipeline-level sections. Pass configs live next to their pass (compress/passes/<name>).


@dataclass(frozen=True, kw_only=True)
class DataConfig(Config):
    """Training/calibration data: user files, or text the teacher writes itself."""

    SECTION: ClassVar[str] = "data"

    seq_len: int = help_field(512, "tokens per packed training block")
    num_prompts: int | None = help_field(
        None, "self-generated data: how many prompts of the built-in set the teacher answers "
        "(None = sized to what the passes train and calibrate on)"
    )
    eval_prompts: int = help_field(
        32, "self-generated evaluation data: held-out prompts answered (never trained on)"
    )
    max_new_tokens: int = help_field(256, "self-generated data: longest answer, in tokens")
    sampled: float = help_field(
        0.5, "self-generated training data: fraction of the prompts answered by sampling (the others greedily)")
    temperature: float = help_field(0.7, "self-generated data: temperature of the sampled answers")
    top_p: float = help_field(0.95, "self-generated data: nucleus of the sampled answers")
    mix: float = help_field(
        0.25, "with --data: fraction of the training sequences the teacher writes itself (0 = the user's text only)")
    generation_batch_size: int = help_field(32, "self-generated data: prompts decoded together")
    seed: int = help_field(0, "self-generated data: sampling seed")

    def validate(self) -> None:
        if not 8 <= self.seq_len <= 32768:
            self._fail("seq_len", f"must be in 8..32768, got {self.seq_len}")
        if self.num_prompts is not None and self.num_prompts < 1:
            self._fail("num_prompts", "must be at least 1")
        if self.eval_prompts < 1:
            self._fail("eval_prompts", "must be at least 1")
        if not 1 <= self.max_new_tokens <= 4096:
            self._fail("max_new_tokens", "must be in 1..4096")
        if not 0.0 < self.temperature <= 2.0:
            self._fail("temperature", "must be in (0, 2]")
        if not 0.0 <= self.sampled <= 1.0:
            self._fail("sampled", "must be in 0..1")
        if not 0.0 <= self.mix < 1.0:
            self._fail("mix", "must be in [0, 1): the share of the teacher's text beside the user's")
        if not 0.0 < self.top_p <= 1.0:
            self._fail("top_p", "must be in (0, 1]")
        if self.generation_batch_size < 1:
            self._fail("generation_batch_size", "must be at least 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """Held-out evaluation run after every stage."""

    SECTION: ClassVar[str] = "evaluation"

    max_tokens: int = help_field(16384, "evaluate on the first N tokens of each evaluation domain")
    window: int = help_field(512, "non-overlapping window length, tokens")
    batch_size: int = help_field(1, "windows per forward pass")
    domains: tuple[str, ...] = help_field(
        ("answers", "python-code", "python-docs"),
        "built-in held-out domains besides --eval-data: answers (the teacher's answers to held-out prompts), "
        "python-code, python-docs (the Python standard library's source and docstrings)")

    def validate(self) -> None:
        from .domains import BUILTIN_DOMAINS

        for d in self.domains:
            if d not in BUILTIN_DOMAINS:
                self._fail("domains", f"unknown domain {d!r}; built in: {', '.join(BUILTIN_DOMAINS)}")
        if len(set(self.domains)) != len(self.domains):
            self._fail("domains", "a domain is listed twice")
        if self.window < 2:
            self._fail("window", "must be at least 2")
        if self.max_tokens < self.window:
            self._fail("max_tokens", f"must be at least one window ({self.window})")
        if self.batch_size < 1:
            self._fail("batch_size", "must be at least 1")
