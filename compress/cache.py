"""The user-level cache: converted GGUF models, self-generated data, file digests."""

from __future__ import annotations

import os
from pathlib import Path

from .artifact import atomic_write_json, file_sha256, read_json


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
