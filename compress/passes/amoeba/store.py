"""The supernet artifact (format ``supernet``): the frozen base model as a Hugging Face folder
(``config.json`` + safetensors, hard links of the parent's), and beside it ``supernet.json`` (the
width choices, the DP table, the adapters' settings, how the table's latency is measured) and
``supernet/adapters.safetensors`` (the experts, the router, every layer's FLAP ranking and means).

Loaded (:func:`load_supernet`) it is a PyTorch model that runs as its full subnet, with the
:class:`~.subnet.Supernet` that runs and extracts any other as ``model.supernet``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

SMOL_MODULE = "amoeba_smol"  #: the mixture of LoRAs, as a submodule of the supernet's base model

SUPERNET_CONFIG = "supernet.json"
SUPERNET_DIR = "supernet"
ADAPTERS = "adapters.safetensors"
FORMAT = "compress-supernet"
FORMAT_VERSION = 1


def is_supernet(path: Path) -> bool:
    """The format's marker (torch-free: the format registry detects with it)."""
    return (Path(path) / SUPERNET_CONFIG).is_file() and (Path(path) / "config.json").is_file()


def supernet_bytes(path: Path) -> int:
    """Weight bytes: the base model's safetensors and the adapters'."""
    from ...formats import _safetensors_bytes

    extra = Path(path) / SUPERNET_DIR / ADAPTERS
    return _safetensors_bytes(path) + (extra.stat().st_size if extra.is_file() else 0)


def read_meta(path: Path) -> dict[str, Any]:
    from ...errors import UserError
    from ...untrusted import read_json

    meta = read_json(Path(path) / SUPERNET_CONFIG)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path}: {SUPERNET_CONFIG} is not a {FORMAT} v{FORMAT_VERSION} file")
    return meta


def save_supernet(net, folder: Path, *, extra: dict | None = None) -> None:
    """``supernet.json`` and the adapters beside the base model files already in ``folder``. The
    subnet table is a measurement: it lives in the stage's manifest (``metrics.subnets``), and the
    files stay a pure function of the inputs."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    smol = None
    if net.smol is not None:
        for k, v in net.smol.state_dict().items():
            tensors[f"smol.{k}"] = v.detach().float().contiguous()
        s = net.smol
        smol = {"names": s.names, "experts": int(s.experts[0].A.shape[0]), "rank": int(s.experts[0].A.shape[1]),
                "scaling": float(s.experts[0].scaling), "router_hidden": s.router.hidden.out_features,
                "top_k": s.router.top_k}
    for i, p in enumerate(net.plan):
        for key in ("head_order", "channel_order", "o_mean", "down_mean", "head_scores", "channel_scores"):
            t = getattr(p, key)
            tensors[f"plan.{i}.{key}"] = (t.to(torch.int64) if key.endswith("order") else t.float()).contiguous()
    (folder / SUPERNET_DIR).mkdir(exist_ok=True)
    save_file(tensors, str(folder / SUPERNET_DIR / ADAPTERS), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "widths": [asdict(w) for w in net.widths],
            "dp": net.dp.to_json(), "smol": smol, "compensate": net.compensate, **(extra or {})}
    (folder / SUPERNET_CONFIG).write_text(json.dumps(meta, indent=2))


def load_supernet(path: Path, *, dtype=None, **_: Any):
    """The base model with its adapters hooked in, running as the full subnet; ``model.supernet``
    (``dtype``: the base model's, float32 by default)."""
    import torch
    from safetensors.torch import load_file

    dtype = dtype or torch.float32

    from ...formats import read_safetensors_header
    from ...models import load_hf_model
    from .dp import DPResult
    from .flap import LayerWidth, WidthShape
    from .smol import SMoL
    from .subnet import Supernet

    path = Path(path)
    meta = read_meta(path)
    adapters = path / SUPERNET_DIR / ADAPTERS
    read_safetensors_header(adapters)  # a corrupt file is refused before it is read
    tensors = load_file(str(adapters))
    model = load_hf_model(path, dtype=dtype)
    n = model.config.num_hidden_layers
    plan = [LayerWidth(**{k: tensors[f"plan.{i}.{k}"] for k in ("head_order", "channel_order", "o_mean",
                                                                  "down_mean", "head_scores", "channel_scores")})
            for i in range(n)]
    widths = [WidthShape(**w) for w in meta["widths"]]
    smol = None
    if meta.get("smol"):
        s = meta["smol"]
        from ...formats import MASKS_FILE
        from ...masks import read_masks

        masks = read_masks(path) if (path / MASKS_FILE).is_file() else None  # a sparse base: deltas masked
        smol = SMoL(model, s["names"], num_layers=n, num_widths=len(widths), experts=s["experts"], rank=s["rank"],
                    alpha=s["scaling"] * s["rank"], router_hidden=s["router_hidden"], top_k=s["top_k"], masks=masks)
        smol.load_state_dict({k[len("smol."):]: v for k, v in tensors.items() if k.startswith("smol.")})
        smol.to(dtype)
        smol.attach(model)
        model.add_module(SMOL_MODULE, smol)
        for p in smol.parameters():
            p.requires_grad_(False)
    net = Supernet(model, DPResult.from_json(meta["dp"]), widths, plan, smol, compensate=meta["compensate"])
    net.rest()
    model.supernet = net
    model.supernet_meta = meta
    return model.eval()
