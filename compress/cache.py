"""The user-level cache: converted GGUF models, self-generated data, file digests."""

from __future__ import annotations

import os
from pathlib import Path

from .artifact import atomic_write_json, file_sha256, read_json, remove_stale_temps

_swept: set[str] = set()


def cache_dir() -> Path:
    """``$COMPRESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/compress``, else ``~/.cache/compress``."""
    env = os.environ.get("COMPRESS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "compress"


def cached_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so reruns skip rehashing."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "digests.json"
    index = read_json(index_path, {})
    if key in index:
        return index[key]
    digest = file_sha256(path)
    index = {k: v for k, v in index.items() if not k.startswith(f"{path}|")}
    index[key] = digest
    try:
        atomic_write_json(index_path, index)
    except Exception:  # the digest cache is an optimisation only
        pass
    return digest


def sweep_debris() -> list[Path]:
    """Remove temp files and folders that killed processes left in the cache (a half-written GGUF
    conversion is hundreds of MB); once per process, two levels deep."""
    root = cache_dir()
    if str(root) in _swept:
        return []
    _swept.add(str(root))
    removed = remove_stale_temps(root)
    if root.is_dir():
        for sub in root.iterdir():
            if sub.is_dir() and not sub.name.startswith("."):
                removed += remove_stale_temps(sub)
    return removed
