"""Sparsity masks: the one module that reads and writes them.

Format (``masks.safetensors`` in an artifact folder): one ``uint8`` tensor per masked Linear,
keyed by its full module name (``model.layers.3.mlp.up_proj``), holding the mask bit-packed
row-major (``numpy.packbits``, little bit order; bit 1 = weight kept), and in the file's
metadata one key, ``compress-masks``: JSON (sorted keys) of ``format = compress-masks``,
``version = 2``, ``pattern`` (``unstructured`` or ``N:M``) and ``shapes`` (name ->
``[out_features, in_features]``). One key because safetensors writes its metadata map in a
per-process random order: several keys made the same masks different bytes in every run.
Version 1 (the four fields as separate metadata keys) is still read.

The manifest's ``invariants.sparsity`` summarizes it: ``{"file", "pattern", "modules",
"fraction"}`` (``fraction``: zeros / weights over the masked Linears) and ``per_module``
(name -> zero fraction). The runner carries the file from stage to stage while a pass keeps
the invariant, checks the output obeys it, and drops it from the manifest of a pass that
cannot keep it. The training loop re-applies the masks after every optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .formats import MASKS_FILE

FORMAT = "compress-masks"
VERSION = 2


def _pack(mask) -> np.ndarray:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="little")


def _unpack(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(packed, count=n, bitorder="little").astype(bool).reshape(shape)


def summarize(masks: dict[str, Any], pattern: str) -> dict[str, Any]:
    """The manifest's ``sparsity`` invariant for ``masks`` (name -> bool array, True = kept)."""
    per = {}
    zeros = total = 0
    for name in sorted(masks):
        m = np.asarray(masks[name], dtype=bool)
        z = int(m.size - m.sum())
        per[name] = z / m.size
        zeros += z
        total += m.size
    return {"file": MASKS_FILE, "pattern": pattern, "modules": len(per), "fraction": zeros / max(total, 1),
            "per_module": per}


def write_masks(folder: Path, masks: dict[str, Any], pattern: str = "unstructured") -> dict[str, Any]:
    """Write ``masks`` (name -> bool tensor/array) to ``folder``; returns the invariant summary."""
    from safetensors.numpy import save_file

    check_pattern(pattern)
    arrays = {n: np.asarray(m.cpu().numpy() if hasattr(m, "cpu") else m, dtype=bool) for n, m in masks.items()}
    for name, m in arrays.items():
        if m.ndim != 2:
            raise ValueError(f"mask {name}: expected a 2-D (out, in) mask, got shape {m.shape}")
        if pattern != "unstructured":
            check_n_m(m, pattern, name)
    meta = {FORMAT: json.dumps({"format": FORMAT, "version": VERSION, "pattern": pattern,
                                "shapes": {n: list(m.shape) for n, m in arrays.items()}}, sort_keys=True)}
    save_file({n: _pack(m) for n, m in arrays.items()}, str(Path(folder) / MASKS_FILE), metadata=meta)
    return summarize(arrays, pattern)


def read_masks(folder: Path) -> dict[str, "Any"]:
    """The masks stored in ``folder`` as bool torch tensors (empty when there is no mask file)."""
    import torch
    from safetensors import safe_open

    path = Path(folder) / MASKS_FILE
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if FORMAT in meta:  # version 2: one JSON key
                meta = json.loads(meta[FORMAT])
                if not isinstance(meta, dict):
                    raise ValueError("metadata is not an object")
            if meta.get("format") != FORMAT or int(meta.get("version", 0)) > VERSION:
                raise ValueError(f"not a {FORMAT} file of version <= {VERSION}")
            shapes = meta["shapes"]
            shapes = json.loads(shapes) if isinstance(shapes, str) else shapes  # version 1: a JSON string
            return {n: torch.from_numpy(_unpack(f.get_tensor(n), tuple(shapes[n]))) for n in f.keys()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"corrupt sparsity masks {path}: {exc}") from None


def check_pattern(pattern: str) -> None:
    if pattern == "unstructured":
        return
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern {pattern!r}: expected 'unstructured' or 'N:M'") from None
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r}: need 0 < N < M")


def check_n_m(mask: np.ndarray, pattern: str, name: str) -> None:
    """At most N of every M consecutive input weights kept (N:M along the input dimension)."""
    n, m = (int(x) for x in pattern.split(":"))
    if mask.shape[1] % m:
        raise ValueError(f"mask {name}: in_features {mask.shape[1]} is not a multiple of {m}")
    kept = mask.reshape(mask.shape[0], -1, m).sum(-1)
    if (kept > n).any():
        raise ValueError(f"mask {name}: more than {n} of {m} weights kept in some group ({pattern})")


def apply_masks_(model, masks: dict[str, Any]) -> None:
    """Zero the pruned weights of ``model`` in place (masks from :func:`read_masks`)."""
    import torch

    with torch.no_grad():
        for name, mask in masks.items():
            mod = _module(model, name)
            if getattr(mod, "mask", None) is not None:
                continue  # the module applies its own mask in every forward (a QuantLinear)
            mod.weight.mul_(mask.to(device=mod.weight.device, dtype=mod.weight.dtype))


def violations(model, masks: dict[str, Any]) -> dict[str, int]:
    """Pruned weights that are not exactly zero, per module (empty: the masks hold)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, mask in masks.items():
            w = _module(model, name).weight
            n = int((w.detach()[~mask.to(w.device)] != 0).sum())
            if n:
                out[name] = n
    return out


def _module(model, name: str):
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise UserError(f"sparsity mask names {name!r}, which the model does not have") from None
    if getattr(mod, "weight", None) is None:
        raise UserError(f"sparsity mask names {name!r}, which has no weight")
    return mod
