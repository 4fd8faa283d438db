"""The Python API: everything the CLI does is one call here.

``plan`` resolves a profile, overrides and inputs without touching torch (so ``--dry-run`` and
bad input are instant, and an impossible order of passes fails before any work); ``run``
executes a plan into an output folder, reusing every stage whose id is already there;
``evaluate`` scores one model; ``export`` and ``profile`` run the ``export_onnx`` and
``profile_latency`` passes through the same code and stage ids as the pipeline.

The pieces: :mod:`compress.plan` (plans, format checks, stage ids), :mod:`compress.runner`
(running passes, manifests, invariants), :mod:`compress.resources` (model, teacher, data),
:mod:`compress.records` (report rows).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .artifact import Artifact, read_artifact, remove_stale_temps, staging_dir
from .config import DataConfig, EvalConfig
from .context import PassContext
from .data import self_data_spec, user_data_spec
from .errors import UserError
from .formats import detect_format
from .plan import Plan, check_accepts, plan, source_format, stage_id
from .report import now
from .resources import Resources
from .runner import execute_stage, load_for_eval, run, source_artifact, stage_is
from .sources import SourceRef, check_fits_context, resolve_source_ref, source_id
from .ui import UI

__all__ = ["Plan", "evaluate", "export", "plan", "profile", "run", "subnets_list", "subnets_pick"]


def _parent(ref: SourceRef, res: Resources) -> Artifact:
    """The model a command works on, as the parent artifact the pipeline would give a pass."""
    folder = res.folder()
    return read_artifact(folder) if ref.kind == "artifact" else source_artifact(ref, folder)


# ------------------------------------------------------------------------------- evaluate


def evaluate(
    model: str | None = None, data: str | list[str] | tuple[str, ...] | None = None, *, max_tokens: int = 16384,
    window: int = 512, batch_size: int = 1, teacher: str | None = None, domains: tuple[str, ...] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Perplexity (and, with a teacher, KL, top-1 agreement and the ratio to the teacher's perplexity)
    of one model on one or more held-out domains.

    ``data``: one path or several (each a domain); ``domains``: built-in domains to add (default:
    all of them when no ``data`` is given, none otherwise). ``teacher``: a model reference, or None
    to use the teacher recorded in an artifact's manifest (if any); the ``answers`` domain is the
    held-out set the teacher (or the model itself) writes. The first domain's figures are at the
    top level, every domain's under ``domains``, ratios under ``summary``.
    """
    from .domains import resolve_domains
    from .evaluation import evaluate_domains
    from .models import teacher_folder

    paths = [data] if isinstance(data, str) else list(data or [])
    if domains is None:
        domains = () if paths else EvalConfig().domains
    ecfg = EvalConfig(max_tokens=max_tokens, window=window, batch_size=batch_size, domains=tuple(domains))
    ui = UI(quiet)
    ref = resolve_source_ref(model)
    check_fits_context(ref, window, "--window")
    for p in paths:
        user_data_spec(p, "eval")  # a missing or bad path fails before any model loads
    teacher_ref = resolve_source_ref(teacher) if teacher else None
    res = Resources(ref, DataConfig(), ui)
    student = load_for_eval(res.folder())
    t_res = None
    if teacher_ref is not None:
        t_res = Resources(teacher_ref, DataConfig(), ui)
    elif ref.kind == "artifact":
        tf = teacher_folder(ref.path)
        if tf is not None:
            t_res = Resources(resolve_source_ref(tf), DataConfig(), ui)
    gen = t_res or res  # who writes self-generated evaluation text
    if "answers" in ecfg.domains and detect_format(gen.folder()) == "onnx":
        raise UserError(f"{ref.label} is an ONNX export without a recorded teacher: give --data (or --teacher)")
    specs = resolve_domains(ecfg.domains, paths, self_data_spec(source_id(gen.source), DataConfig(), "eval"))
    result = evaluate_domains(student, [(name, gen.stream(spec, max_tokens)) for name, spec in specs], window=window,
                              max_tokens=max_tokens, batch_size=batch_size,
                              teacher=t_res.teacher if t_res else None,
                              teacher_key=source_id(t_res.source) if t_res else None, progress=ui.progress)
    for name, spec in specs:
        result["domains"][name]["data"] = spec.label
    result["data"] = specs[0][1].label
    return {"model": ref.label, "teacher": t_res.source.label if t_res else None, **result, "config": ecfg.to_dict()}


# --------------------------------------------------------------------------------- export


def export(
    model: str | None, out: str | Path, *, precision: str = "fp32", provider: str = "cpu", validate: bool = True,
    rtol: float = 0.0, greedy_tokens: int = 32, accuracy_level: int = 4, force: bool = False, quiet: bool = False,
) -> dict[str, Any]:
    """Export a model (artifact, HF folder, GGUF, run folder; default: embedded) to ONNX in ``out``:
    the ``export_onnx`` pass, run as the pipeline runs it, under the same stage id.

    The result is an artifact (``format: onnx``); an ``out`` already holding this very
    export is reused, any other non-empty ``out`` needs ``force``.
    """
    from .passes.export_onnx.config import ExportOnnxConfig
    from .registry import get_pass

    spec = get_pass("export_onnx")
    cfg = ExportOnnxConfig.from_dict(dict(precision=precision, provider=provider, validation=validate, rtol=rtol,
                                          greedy_tokens=greedy_tokens, accuracy_level=accuracy_level))
    ui = UI(quiet)
    ref = resolve_source_ref(model)
    check_accepts(spec, source_format(ref), "compress export", ref.label)
    out = Path(out)
    parent_id = source_id(ref)
    export_id = stage_id(parent_id, spec, cfg)
    if stage_is(out, export_id):
        ui.log(f"{out} already holds this export (id {export_id}); nothing to do")
        return _export_result(read_artifact(out), cached=True)
    remove_stale_temps(out.parent, prefix=f".{out.name}.")  # an export killed half-way left its temp folder
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} exists and holds something else; use --force to replace it")
    res = Resources(ref, DataConfig(), ui)
    parent = _parent(ref, res)
    # the export is evaluated against the model's own teacher, or against the model itself
    teacher = parent.teacher or {"id": parent.id, "path": str(parent.path)}
    with staging_dir(out) as tmp, tempfile.TemporaryDirectory() as work:
        ctx = PassContext(artifact_id=export_id, out_dir=Path(tmp), work_dir=Path(work),
                          teacher_path=Path(teacher["path"]), load_teacher=res.teacher, training_blocks=_no_data,
                          progress=ui.progress, log=ui.log)
        execute_stage(spec, cfg, parent, ctx, teacher=teacher, extra={"source": ref.label})
    return _export_result(read_artifact(out), cached=False)


def _no_data():
    raise UserError("this command has no training data")


def _export_result(art: Artifact, cached: bool) -> dict[str, Any]:
    export = (art.manifest.get("metrics") or {}).get("export") or {}
    return {"out": str(art.path), "id": art.id, "source": art.manifest.get("source"), "cached": cached, **export}


# -------------------------------------------------------------------------------- profile


def profile(
    models: list[str], *, target: str = "cpu", prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 5,
    warmup: int = 1, quiet: bool = False,
) -> dict[str, Any]:
    """Latency of each model (ONNX export or PyTorch folder/artifact/GGUF) on one target: the
    ``profile_latency`` pass, run as the pipeline runs it, under the same stage id."""
    from .passes.profile_latency.config import ProfileLatencyConfig
    from .registry import get_pass
    from .target import load_target

    spec = get_pass("profile_latency")
    tgt = load_target(target)
    cfg = ProfileLatencyConfig.from_dict(dict(target=target, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                              runs=runs, warmup=warmup, eager_baseline=False))
    cfg.preflight()
    ui = UI(quiet)
    parents = []
    for m in models or [None]:
        ref = resolve_source_ref(m)
        check_accepts(spec, source_format(ref), "compress profile", ref.label)
        res = Resources(ref, DataConfig(), ui)
        parents.append((ref, res, res.folder()))
    results = []
    for ref, res, folder in parents:
        parent = _parent(ref, res) if ref.kind != "onnx" else Artifact(folder, {"id": source_id(ref)})
        parent = Artifact(parent.path, {**parent.manifest, "label": ref.label})  # the name the user gave
        sid = stage_id(parent.id, spec, cfg, target=tgt)
        with tempfile.TemporaryDirectory() as work:
            ctx = PassContext(artifact_id=sid, out_dir=None, work_dir=Path(work), teacher_path=Path(folder),
                              load_teacher=res.teacher, training_blocks=_no_data, progress=ui.progress, log=ui.log,
                              target=tgt)
            result = execute_stage(spec, cfg, parent, ctx, teacher=None, write=False)
        results += [{**row, "stage_id": sid} for row in result.latency]
    return {"target": tgt.to_dict(), "settings": dict(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
                                                      warmup=warmup), "created": now(), "results": results}


# -------------------------------------------------------------------------------- subnets


def supernet_stage(run: str | Path) -> Artifact:
    """The supernet of ``run``: a supernet artifact itself, or the last supernet stage of a run folder."""
    from .formats import detect_format

    path = Path(run)
    if not path.exists():
        raise UserError(f"{run}: no such run folder or supernet artifact")
    if detect_format(path) == "supernet":
        return read_artifact(path)
    stages = path / "stages"
    found = [d for d in sorted(stages.iterdir()) if d.is_dir() and not d.name.startswith(".")
             and detect_format(d) == "supernet"] if stages.is_dir() else []
    if not found:
        raise UserError(f"{run}: holds no supernet (run a profile with the amoeba pass, e.g. edge, first)")
    return read_artifact(found[-1])


def subnets_list(run: str | Path) -> dict[str, Any]:
    """The subnet table of a run's supernet (torch-free: read from its manifest and ``supernet.json``)."""
    return _subnet_table(run, supernet_stage(run))


def _subnet_table(run: str | Path, art: Artifact) -> dict[str, Any]:
    from .passes.amoeba.measure import prediction_error
    from .passes.amoeba.store import read_meta

    meta = read_meta(art.path)
    metrics = art.manifest.get("metrics") or {}
    keep = ("latency_bits", "latency_group", "prompt_tokens", "new_tokens", "runs", "rounds", "min_layers")
    rows = metrics.get("subnets") or []
    return {"run": str(run), "stage": str(art.path), "id": art.id, **{k: meta.get(k) for k in keep},
            "target": metrics.get("subnets_target"), "subnets": rows,
            "prediction_error": {k: prediction_error(rows, k) for k in ("ms_per_token", "ttft_ms")}}


def subnets_pick(
    run: str | Path, out: str | Path | None = None, *, max_size_mb: float = 0.0, max_ms_per_token: float = 0.0,
    max_ttft_ms: float = 0.0, max_ppl: float = 0.0, depth: int = 0, width: float = 0.0, margin: float = 0.0,
    target: str | None = None, force: bool = False, quiet: bool = False,
) -> dict[str, Any]:
    """Extract the most accurate subnet of ``run``'s table within every given budget (the ``pick``
    pass, under the same stage id as in a pipeline) into ``out`` (default ``RUN/subnet``). No
    subnet within budget: a UserError naming the closest point (exit 2)."""
    from .passes.amoeba.config import PickConfig
    from .registry import get_pass
    from .target import TargetConfig, load_target

    spec = get_pass("pick")
    cfg = PickConfig.from_dict(dict(max_size_mb=max_size_mb, max_ms_per_token=max_ms_per_token,
                                    max_ttft_ms=max_ttft_ms, max_ppl=max_ppl, depth=depth, width=width,
                                    margin=margin))
    parent = supernet_stage(run)
    table = _subnet_table(run, parent)
    tgt = load_target(target) if target else TargetConfig.from_dict(table["target"] or {})
    tgt.preflight()
    ui = UI(quiet)
    out = Path(out) if out is not None else _run_folder(parent.path) / "subnet"
    sid = stage_id(parent.id, spec, cfg, target=tgt)
    if stage_is(out, sid):
        ui.log(f"{out} already holds this pick (id {sid}); nothing to do")
        return _pick_result(read_artifact(out), cached=True)
    remove_stale_temps(out.parent, prefix=f".{out.name}.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"--out {out} exists and holds something else; use --force to replace it")
    teacher = parent.teacher or {"id": parent.id, "path": str(parent.path)}
    res = Resources(resolve_source_ref(str(parent.path)), DataConfig(), ui)
    with staging_dir(out) as tmp, tempfile.TemporaryDirectory() as work:
        ctx = PassContext(artifact_id=sid, out_dir=Path(tmp), work_dir=Path(work), teacher_path=Path(teacher["path"]),
                          load_teacher=res.teacher, training_blocks=_no_data, progress=ui.progress, log=ui.log,
                          target=tgt)
        execute_stage(spec, cfg, parent, ctx, teacher=teacher, extra={"source": str(parent.path)})
    return _pick_result(read_artifact(out), cached=False)


def _run_folder(stage: Path) -> Path:
    """The run folder a stage belongs to (``RUN/stages/NN-name`` -> ``RUN``), else the stage's parent:
    never the artifact folder itself."""
    return stage.parent.parent if stage.parent.name == "stages" else stage.parent


def _pick_result(art: Artifact, cached: bool) -> dict[str, Any]:
    pick = (art.manifest.get("metrics") or {}).get("pick") or {}
    return {"out": str(art.path), "id": art.id, "cached": cached, "parameters": art.manifest.get("parameters"),
            **pick}
