"""Readers for files nobody vouched for: every one bounded to what its job needs.

A model folder, a GGUF, a profile or a data file may come from anywhere. Nothing here ever
runs code from a file (no pickles, no ``auto_map``, no YAML tags), and every reader has a
bound that fits its job, checked *before* it allocates or loops:

- JSON: a size cap per kind of file, deep nesting refused (one line, not a ``RecursionError``),
  the top-level type checked;
- YAML: safe loader without aliases (no "billion laughs"), size-capped;
- GGUF: every declared length and count checked against the bytes left in the file before
  anything is read (a 45-byte file cannot declare a 2^63-element array), tensor data checked
  to fit the file;
- chat templates: rendered in Jinja's immutable sandbox with a time limit, an output limit
  and bounded ``range``/string repetition;
- data paths: regular files and folders only (a FIFO or ``/dev/zero`` is refused).

Every refusal is a :class:`~compress.errors.UserError`: one line naming the file, exit 2.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError, one_line

MiB = 1 << 20
JSON_MAX_BYTES = 64 * MiB  # config.json, manifests, tokenizer_config.json (tokenizer.json is ~2-20 MB)
YAML_MAX_BYTES = 1 * MiB  # a profile is a few hundred bytes


# ---------------------------------------------------------------------------------- JSON


def loads_json(text: str | bytes, where: str, *, expect: type | tuple[type, ...] | None = dict) -> Any:
    """Parse untrusted JSON text: nesting capped, top-level type checked; ``UserError`` otherwise."""
    try:
        value = json.loads(text)  # the C decoder stops deep nesting with a RecursionError, not a crash
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply; refused") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: invalid JSON ({one_line(exc)})") from None
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        kind = {"dict": "an object", "list": "an array"}.get(names, names)
        raise UserError(f"{where}: expected {kind} at the top level, found {type(value).__name__}")
    return value


def read_json(path: Path, *, expect: type | tuple[type, ...] | None = dict, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """An untrusted JSON file, size-capped and parsed with :func:`loads_json`."""
    path = Path(path)
    try:
        size = regular_file(path).st_size
        if size > max_bytes:
            raise UserError(f"{path}: {size / MiB:.0f} MiB of JSON, more than the {max_bytes // MiB} MiB this file may hold")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({one_line(exc.strerror or exc)})") from None
    return loads_json(data, str(path), expect=expect)


# ---------------------------------------------------------------------------------- YAML


_YAML_LOADER = None


def yaml_loader():
    """PyYAML's SafeLoader without YAML 1.1's base-60 numbers: ``2:4`` (a sparsity pattern) stays the
    string it is in YAML 1.2, instead of the integer 124; ``1:30`` is not 90."""
    global _YAML_LOADER
    if _YAML_LOADER is None:
        import re

        import yaml

        int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"

        class Loader(yaml.SafeLoader):
            pass

        Loader.yaml_implicit_resolvers = {
            first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        Loader.add_implicit_resolver(int_tag, re.compile(
            r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
        Loader.add_implicit_resolver(float_tag, re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
        _YAML_LOADER = Loader
    return _YAML_LOADER


def yaml_scalar(text: str) -> Any:
    """One ``--set`` value, read as YAML (with :func:`yaml_loader`)."""
    import yaml

    return yaml.load(text, Loader=yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_yaml(text: str, where: str) -> Any:
    """Safe YAML without aliases or anchors (no expansion bombs), size-capped."""
    import yaml

    if len(text) > YAML_MAX_BYTES:
        raise UserError(f"{where}: {len(text)} bytes of YAML, more than the {YAML_MAX_BYTES // MiB} MiB a profile may hold")

    class _NoAliases(yaml_loader()):
        def compose_node(self, parent, index):  # noqa: D401 - yaml API
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a profile",
                                                  event.start_mark)
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=_NoAliases)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply; refused") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: unreadable ({one_line(exc)})") from None


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file (a profile, a target): regular file, size-capped, :func:`load_yaml`."""
    path = Path(path)
    try:
        size = regular_file(path).st_size
        if size > YAML_MAX_BYTES:
            raise UserError(f"{what} {path}: {size} bytes, more than the {YAML_MAX_BYTES} a {what} may hold")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path}: unreadable ({one_line(getattr(exc, 'strerror', None) or exc)})") from None
    return load_yaml(text, f"{what} {path}")


# --------------------------------------------------------------------------------- paths


def regular_file(path: Path) -> os.stat_result:
    """stat of a regular file; a FIFO, device, socket or folder is refused (one line)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file ({_kind(st.st_mode)})")
    return st


def file_or_folder(path: Path, what: str) -> Path:
    """A path that must be a regular file or a folder (data, models): FIFOs, devices and sockets
    are refused before anything opens them (opening a FIFO blocks; ``/dev/zero`` never ends)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: {one_line(exc.strerror or exc)}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UserError(f"{what} {path}: not a file or folder ({_kind(st.st_mode)})")
    return path


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


# ---------------------------------------------------------------------------------- GGUF

# value types of GGUF metadata: fixed sizes; 8 = string, 9 = array
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_MAX_KV = 1 << 16
_GGUF_DIMS = ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
              "attention.key_length", "block_count")
GGUF_MAX_TENSORS = 1 << 20
GGUF_MAX_DIMS = 4


class _GGUFLayoutError(Exception):
    pass


def check_gguf_layout(path: Path) -> dict[str, Any]:
    """Walk a GGUF header with every declared length checked against the bytes left.

    Returns ``{"version", "tensors", "kv", "alignment", "data_offset", "architecture", "context_length",
    "chat_template", "dims"}`` (``dims``: the model sizes among ``_GGUF_DIMS`` it declares). Raises ``UserError``
    naming what is wrong, without allocating more than the file holds (the library reader
    trusts declared counts: a 45-byte file declaring a 2^63-element array makes it loop).
    """
    path = Path(path)
    st = regular_file(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic)")
    if st.st_size < 24:
        raise UserError(f"{path}: corrupt GGUF (only {st.st_size} bytes)")
    return _gguf_layout(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_layout(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """The walk, once per file version (a plan asks for a GGUF's context several times)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _walk_gguf(m, size)
    except _GGUFLayoutError as exc:
        raise UserError(f"{path}: corrupt GGUF ({exc})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable GGUF ({one_line(exc)})") from None


def _walk_gguf(m, size: int) -> dict[str, Any]:
    pos = 0

    def take(n: int) -> int:
        nonlocal pos
        if n < 0 or n > size - pos:
            raise _GGUFLayoutError(f"declares {n} bytes at offset {pos}, only {size - pos} left")
        start = pos
        pos += n
        return start

    def u32() -> int:
        return struct.unpack_from("<I", m, take(4))[0]

    def u64() -> int:
        return struct.unpack_from("<Q", m, take(8))[0]

    def string() -> bytes:
        n = u64()
        s = take(n)
        return m[s:s + n]

    def value(vtype: int, depth: int = 0):
        if vtype in _GGUF_SCALAR:
            s = take(_GGUF_SCALAR[vtype])
            return m[s:s + _GGUF_SCALAR[vtype]]
        if vtype == _GGUF_STRING:
            return string()
        if vtype == _GGUF_ARRAY:
            if depth >= 2:
                raise _GGUFLayoutError("arrays nested deeper than 2 levels")
            etype, count = u32(), u64()
            if etype in _GGUF_SCALAR:
                take(count * _GGUF_SCALAR[etype])  # checked against the bytes left, not read
                return None
            least = 8 if etype == _GGUF_STRING else 12  # a string's length / a nested array's header
            if etype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise _GGUFLayoutError(f"unknown array element type {etype}")
            if count * least > size - pos:
                raise _GGUFLayoutError(f"declares an array of {count} elements, more than the {size - pos} bytes left hold")
            for _ in range(count):
                value(etype, depth + 1)
            return None
        raise _GGUFLayoutError(f"unknown metadata value type {vtype}")

    pos = 4  # the magic is checked by check_gguf_layout
    version = u32()
    if version not in (2, 3):
        raise _GGUFLayoutError(f"version {version} (2 and 3 are read)")
    n_tensors, n_kv = u64(), u64()
    if n_kv > GGUF_MAX_KV or n_kv * 13 > size - pos:
        raise _GGUFLayoutError(f"declares {n_kv} metadata entries, more than the file can hold")
    if n_tensors > GGUF_MAX_TENSORS or n_tensors * 24 > size - pos:
        raise _GGUFLayoutError(f"declares {n_tensors} tensors, more than the file can hold")
    alignment, architecture, context, chat_template = 32, None, None, None
    model_dims: dict[str, int] = {}
    for _ in range(n_kv):
        key = string()
        vtype = u32()
        v = value(vtype)
        if key == b"general.alignment" and vtype == 4 and v is not None:
            alignment = struct.unpack("<I", v)[0]
        elif key == b"general.architecture" and vtype == _GGUF_STRING:
            architecture = v.decode("utf-8", "replace")
        elif key == b"tokenizer.chat_template" and vtype == _GGUF_STRING:
            chat_template = v.decode("utf-8", "replace")
        elif key.endswith(b".context_length") and vtype in (4, 10) and v is not None:
            context = struct.unpack("<I" if vtype == 4 else "<Q", v)[0]
        elif vtype in (4, 5, 10) and v is not None:
            for suffix in _GGUF_DIMS:
                if key.endswith(b"." + suffix.encode()):
                    model_dims[suffix] = struct.unpack({4: "<I", 5: "<i", 10: "<Q"}[vtype], v)[0]
    if alignment == 0 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise _GGUFLayoutError(f"alignment {alignment} is not a power of two up to 65536")
    tensors = []
    for _ in range(n_tensors):
        name = string()
        n_dims = u32()
        if not 1 <= n_dims <= GGUF_MAX_DIMS:
            raise _GGUFLayoutError(f"tensor {name[:64]!r} has {n_dims} dimensions")
        dims = [u64() for _ in range(n_dims)]
        ttype, offset = u32(), u64()
        tensors.append((name, dims, ttype, offset))
    data_offset = -(-pos // alignment) * alignment
    room = size - data_offset
    sizes = _ggml_sizes()
    for name, dims, ttype, offset in tensors:
        numel = 1
        for d in dims:
            if d == 0 or d > 1 << 40:
                raise _GGUFLayoutError(f"tensor {name[:64]!r} has dimension {d}")
            numel *= d
        if ttype not in sizes:
            raise _GGUFLayoutError(f"tensor {name[:64]!r} has unknown type {ttype}")
        block, nbytes = sizes[ttype]
        if numel % block:
            raise _GGUFLayoutError(f"tensor {name[:64]!r}: {numel} elements are no whole number of {block}-blocks")
        need = numel // block * nbytes
        if offset > room or need > room - offset:
            raise _GGUFLayoutError(f"tensor {name[:64]!r} ends past the end of the file (truncated?)")
    return {"version": version, "tensors": n_tensors, "kv": n_kv, "alignment": alignment, "data_offset": data_offset,
            "architecture": architecture, "context_length": context, "chat_template": chat_template,
            "dims": model_dims}


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (elements per block, bytes per block), from gguf-py's table."""
    import gguf

    return {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}


# ---------------------------------------------------------------------------- templates

TEMPLATE_MAX_SECONDS = 1.0
TEMPLATE_MAX_CHARS = 4 * MiB  # a rendered chat prompt; ours are a few KB
TEMPLATE_MAX_SOURCE = 256 * 1024


class TemplateRefused(UserError):
    pass


def render_chat_template(template: str, *, where: str = "chat template", **context: Any) -> str:
    """Render a chat template in Jinja's immutable sandbox, bounded in time and output.

    transformers renders the same templates in the same sandbox but without limits: a template
    with nested loops runs for hours, and ``"x" * 10**10`` fills memory. Here a template is
    stopped after ``TEMPLATE_MAX_SECONDS`` or ``TEMPLATE_MAX_CHARS`` of output, and string
    repetition and ``range`` are bounded; a refusal is a one-line ``UserError``.
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    if len(template) > TEMPLATE_MAX_SOURCE:
        raise TemplateRefused(f"{where}: {len(template)} characters, more than a chat template may hold")
    _LIMITS.deadline, _LIMITS.where = time.monotonic() + TEMPLATE_MAX_SECONDS, where
    # a loop that yields nothing calls nothing either: the tracer sees every line of template code
    tracer = _TemplateTracer()
    try:
        compiled = _compile(template)
        out: list[str] = []
        total = 0
        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            for chunk in compiled.generate(**context):
                total += len(chunk)
                if total > TEMPLATE_MAX_CHARS:
                    raise TemplateRefused(f"{where}: renders more than {TEMPLATE_MAX_CHARS} characters; refused")
                _check_time()
                out.append(chunk)
        finally:
            sys.settrace(old)
        return "".join(out)
    except TemplateRefused as exc:
        raise TemplateRefused(str(exc).replace("chat template:", f"{where}:", 1)) from None
    except SecurityError as exc:
        raise TemplateRefused(f"{where}: refused by the sandbox ({one_line(exc)})") from None
    except RecursionError:
        raise TemplateRefused(f"{where}: recursion too deep; refused") from None
    except jinja2.TemplateError as exc:
        raise TemplateRefused(f"{where}: {one_line(exc)}") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise TemplateRefused(f"{where}: the template failed ({type(exc).__name__}: {one_line(exc)})") from None


class _Limits:
    deadline = 0.0
    where = "chat template"


_LIMITS = _Limits()


def _check_time() -> None:
    if time.monotonic() > _LIMITS.deadline:
        raise TemplateRefused(f"{_LIMITS.where}: rendering took longer than {TEMPLATE_MAX_SECONDS:g} s; refused")


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    seqs = (str, list, tuple)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            _check_time()
            if operator == "*" and (isinstance(left, seqs) or isinstance(right, seqs)):
                seq, n = (left, right) if isinstance(left, seqs) else (right, left)
                if isinstance(n, int) and max(len(seq), 1) * max(n, 0) > TEMPLATE_MAX_CHARS:
                    raise TemplateRefused(f"chat template: repeats a sequence beyond {TEMPLATE_MAX_CHARS} items; refused")
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise TemplateRefused(f"chat template: an exponent of {right}; refused")
            if operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)) \
                    and len(left) + len(right) > TEMPLATE_MAX_CHARS:
                raise TemplateRefused(f"chat template: builds a value beyond {TEMPLATE_MAX_CHARS} items; refused")
            return super().call_binop(context, operator, left, right)

        def call(self, __context, __obj, *args, **kwargs):
            _check_time()
            return super().call(__context, __obj, *args, **kwargs)

    def raise_exception(message):
        raise TemplateRefused(f"chat template: the template raised: {one_line(message)}")

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _bounded_range
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template)


def _bounded_range(*args):
    r = range(*args)
    if len(r) > 100_000:
        raise TemplateRefused(f"chat template: range of {len(r)} items; refused")
    return r


class _TemplateTracer:
    """A trace function that checks the deadline on every line of template code (and only there)."""

    def __init__(self):
        self.n = 0

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        return self.local

    def local(self, frame, event, arg):
        self.n += 1
        if self.n & 255 == 0:
            _check_time()
        return self.local


#: The conversation every chat template is tried on before any work (alternating, user first).
PROBE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Bye"}]


def select_template(template: Any) -> str | None:
    """The template a tokenizer renders by default: named templates (a dict, or tokenizer_config's
    list of ``{"name", "template"}``) give "default", else the first."""
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else None


def probe_chat_template(template: Any, where: str, special: dict[str, Any] | None = None) -> None:
    """Render a model's chat template once on :data:`PROBE_CHAT`, bounded (torch-free): a template
    that hangs, explodes or is refused fails at plan time, in one line."""
    template = select_template(template)
    if template is None:
        return
    tokens = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in (special or {}).items()
              if k.endswith("_token")}
    render_chat_template(template, where=where, messages=PROBE_CHAT, add_generation_prompt=True, tools=None,
                         documents=None, **{k: v for k, v in tokens.items() if isinstance(v, str)})


def probe_folder_chat_template(folder: Path) -> None:
    """:func:`probe_chat_template` on a model folder's template (chat_template.jinja, else
    tokenizer_config.json's ``chat_template``)."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        if regular_file(jinja).st_size > TEMPLATE_MAX_SOURCE:
            raise TemplateRefused(f"chat template {jinja}: larger than a chat template may be")
        template = jinja.read_text(encoding="utf-8", errors="replace")
    else:
        template = config.get("chat_template")
    probe_chat_template(template, f"chat template of {folder}", config)
