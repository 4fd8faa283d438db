"""Artifacts: a Hugging Face model folder plus ``manifest.json``.

``id = sha256(parent id, pass name, canonical config, pass version, inputs)[:16]``,
so a rerun finds finished stages by id and a killed run resumes. Every write
goes to a temporary sibling folder (or file) that is renamed into place, so an
artifact folder either is complete or does not exist.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import UserError

from .formats import MANIFEST, weight_files
METRICS = "metrics.json"  # a stage's evaluation results, beside its manifest
SCHEMA = 1
WEIGHT_SUFFIXES = (".safetensors",)


def hash_parts(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def compute_id(parent: str | None, pass_name: str, config_json: str, pass_version: int, inputs: str = "") -> str:
    return hash_parts(parent or "", pass_name, config_json, str(pass_version), inputs)


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def teacher(self) -> dict[str, Any] | None:
        return self.manifest.get("teacher")


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_artifact(path: Path) -> Artifact:
    path = Path(path)
    from .untrusted import read_json as read_untrusted

    if not (path / MANIFEST).exists():
        raise UserError(f"{path} is not a compress artifact (no {MANIFEST})")
    manifest = read_untrusted(path / MANIFEST)
    if "id" not in manifest or not isinstance(manifest["id"], str):
        raise UserError(f"corrupt manifest {path / MANIFEST}: no id")
    return Artifact(path, manifest)


def read_json(path: Path, default: Any) -> Any:
    """A JSON file's content, or ``default`` where it is missing or unreadable (caches, indexes)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return default


def make_manifest(
    *, id: str, parent: str | None, pass_name: str, pass_version: int, config: dict, path: Path,
    teacher: dict | None, extra: dict | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "id": id,
        "parent": parent,
        "pass": pass_name,
        "pass_version": pass_version,
        "config": config,
        "teacher": teacher,
        "files": list_files(path),
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }


def list_files(path: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"name": str(p.relative_to(path)), "bytes": p.stat().st_size})
    return out


# ---------------------------------------------------------------------------- atomic I/O


def _translate_os_error(exc: OSError, what: Path) -> UserError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"no space left on device while writing {what}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {what}: {exc.strerror}")
    if exc.errno == errno.ENOTDIR:
        return UserError(f"cannot write {what}: a part of the path is a file, not a folder")
    if exc.errno == errno.EEXIST or exc.errno == errno.ELOOP:
        return UserError(f"cannot write {what}: {exc.filename or what} exists and is not a folder "
                         "(a file or a dangling link)")
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EIO):
        return UserError(f"cannot write {what}: {exc.strerror}")
    return None


def disk_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether an error is a full disk, however the library that wrote reports it: an OSError
    ENOSPC, safetensors' ``IoError(Os { code: 28 ...})``, torch's "unexpected pos" (with the disk
    in fact nearly full)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "StorageFull" in text or "code: 28," in text:
        return True
    if where is not None and ("unexpected pos" in text or "failed writing" in text):
        probe = Path(where)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free < (64 << 20)
        except OSError:
            return False
    return False


@contextlib.contextmanager
def os_errors(what: Path) -> Iterator[None]:
    """Turn disk-full and permission errors into one-line user errors."""
    try:
        yield
    except OSError as exc:
        err = _translate_os_error(exc, what)
        if err is None:
            raise
        raise err from None
    except Exception as exc:  # libraries that wrap the OS error in their own (safetensors, torch)
        if not isinstance(exc, UserError) and disk_full(exc, what):
            raise UserError(f"no space left on device while writing {what}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; what is written there replaces ``path`` on success
    (fsynced first), and is removed on any error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os_errors(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``final``; on success it replaces ``final``.

    On any error (or Ctrl-C) the temp folder is removed and ``final`` is untouched.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with os_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)  # the data is on disk before the rename publishes it
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: fsync the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders holding them."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def link_model_files(src: Path, dst: Path, *, weights: bool = True) -> None:
    """Hard-link a model folder's files into ``dst``, leaving out its manifest and metrics. With
    ``weights=False`` ``dst`` already holds its own model: the weight files and their index are left
    out too, and so is every file ``dst`` already has (its config)."""
    src, dst = Path(src), Path(dst)
    skip = {MANIFEST, METRICS}
    if not weights:
        skip |= {p.name for p in weight_files(src)} | {p.name for p in src.glob("*.safetensors.index.json")}
        skip |= {p.name for p in dst.iterdir()}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip:
            link_or_copy(f, dst / f.name)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a (never modified) file, copying where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def remove_stale_temps(folder: Path, prefix: str = ".") -> list[Path]:
    """Delete temp files and folders left by killed processes (``.name.tmp-PID`` / ``.name.old-PID``
    of dead PIDs; only names starting with ``prefix``); returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        if p.name.startswith(prefix) and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                try:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def validation_line(v: dict) -> str:
    """One sentence on an export validation (shared by the CLI and the report)."""
    ties = v.get("near_ties") or []
    greedy = (f"{v['greedy_tokens']} greedy tokens identical on {v['prompts']} prompts" if not ties else
              f"greedy tokens identical on {v['prompts']} prompts up to {len(ties)} near-tie(s) "
              f"(PyTorch top-2 within tolerance; first at step {ties[0]['step']} of prompt {ties[0]['prompt']})")
    acc = f", accuracy_level {v['accuracy_level']}" if v.get("accuracy_level") is not None else ""
    exact = v.get("exact_codes")
    codes = (f"; codes exact: at accuracy_level 0 max relative error {exact['max_rel_error']:.1e}, greedy tokens "
             f"identical" if exact else "")
    if v.get("kl_tol") is not None:
        logits = (f"next-token distributions mean KL {v['mean_kl']:.2e} nats (tolerance {v['kl_tol']:.2g}{acc}; "
                  f"logits max relative error {v['max_rel_error']:.1e}, max abs {v['max_abs_error']:.2e})")
    else:
        logits = (f"logits max relative error {v['max_rel_error']:.1e} (max abs {v['max_abs_error']:.2e}, tolerance "
                  f"{v['rtol']:.2g}{acc})")
    return f"{logits}; {greedy}{codes}"
