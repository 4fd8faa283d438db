"""Evaluation domains: held-out text of several kinds, none ever used for calibration or training.

Every evaluation scores the model on each domain and reports the ratio to the teacher per
domain, their geometric mean and the worst — a recipe that only wins on its own kind of text
shows up as a bad worst ratio. Built in, with nothing downloaded:

- ``answers``: the teacher's answers to the held-out half of the built-in prompt set (disjoint
  from the prompts it writes training text for);
- ``python-code``: source code of the running Python's standard library (PSF License), the
  top-level modules in name order;
- ``python-docs``: English technical prose — the docstrings of the same modules (module, class
  and function docstrings of 300+ characters), in the same order.

The Python-derived texts depend on the interpreter's version (their label names it; their
fingerprint is their content). A user adds domains with ``--eval-data`` (one per path, named by
the file or folder). Torch-free.
"""

from __future__ import annotations

import ast
import inspect
import sys
import sysconfig
from pathlib import Path

from .artifact import atomic_write_text, hash_parts
from .cache import cache_dir, cached_digest
from .data import DataSpec, user_data_spec
from .errors import UserError

BUILTIN_DOMAINS = ("answers", "python-code", "python-docs")
DOMAIN_CHARS = 600_000  # enough text for 65,536+ tokens of either kind
DOMAIN_VERSION = 1  # bumped when the extraction changes (it is part of the fingerprint)
_SKIP = {"this.py", "antigravity.py", "__phello__.foo.py"}


def _stdlib_modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.glob("*.py")) if p.name not in _SKIP and not p.name.startswith("_")]


def python_code_text(limit: int = DOMAIN_CHARS) -> str:
    parts, n = [], 0
    for p in _stdlib_modules():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        n += len(text)
        if n >= limit:
            break
    return "\n\n".join(parts)[:limit]


def python_docs_text(limit: int = DOMAIN_CHARS, min_chars: int = 300) -> str:
    parts, n = [], 0
    for p in _stdlib_modules():
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in nodes:
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc) >= min_chars:
                doc = inspect.cleandoc(doc)
                parts.append(doc)
                n += len(doc)
        if n >= limit:
            break
    return "\n\n".join(parts)[:limit]


def builtin_text_spec(name: str) -> DataSpec:
    """A built-in text domain, extracted once per Python version into the cache (its fingerprint is
    its content's digest)."""
    version = ".".join(map(str, sys.version_info[:3]))
    path = cache_dir() / "domains" / f"{name}-py{version}-v{DOMAIN_VERSION}.txt"
    if not path.is_file():
        text = {"python-code": python_code_text, "python-docs": python_docs_text}[name]()
        if len(text) < 10_000:
            raise UserError(f"evaluation domain {name}: the Python standard library here yields too little text")
        atomic_write_text(path, text)
    kind = "source code" if name == "python-code" else "docstrings"
    fp = hash_parts("domain", name, cached_digest(path))
    return DataSpec("files", (path,), fp, f"{name}: Python {version} standard library {kind}", "eval")


def domain_name(path: str | Path) -> str:
    p = Path(path)
    return p.stem if p.suffix else p.name


def resolve_domains(names: tuple[str, ...], user_paths: list[str], answers: DataSpec) -> list[tuple[str, DataSpec]]:
    """``(name, spec)`` per domain: the user's evaluation data first (the primary domain), then the
    configured built-ins; ``answers`` is the held-out self-generated spec."""
    out: list[tuple[str, DataSpec]] = []
    for path in user_paths:
        name = domain_name(path)
        if any(name == n for n, _ in out) or name in BUILTIN_DOMAINS:
            name = f"{name}-{len(out) + 1}"
        out.append((name, user_data_spec(path, "eval")))
    for name in names:
        if name == "answers":
            out.append((name, answers))
        else:
            out.append((name, builtin_text_spec(name)))
    if not out:
        raise UserError("no evaluation domain: give --eval-data or keep evaluation.domains non-empty")
    return out
