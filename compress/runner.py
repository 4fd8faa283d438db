"""Running passes: the pipeline runner and the one function every command runs a pass through.

``run`` executes a plan into an output folder, reusing every stage whose id is already there.
``execute_stage`` runs one pass on one parent artifact into a staging folder and writes the
manifest from the pass's :class:`compress.context.PassResult` — metrics, report lines,
latency rows and invariants, which it carries (the mask file) and checks (the output's format,
its shape, its sparsity) before the folder is renamed into place. ``compress export`` and
``compress profile`` call it too, so they share the pipeline's code and stage ids.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .artifact import (
    MANIFEST, METRICS, Artifact, atomic_write_json, atomic_write_text, hash_parts, is_artifact, link_model_files,
    link_or_copy, list_files, make_manifest, os_errors, read_artifact, read_json, remove_stale_temps, staging_dir,
)
from .config import EvalConfig
from .context import INVARIANTS, PassContext, PassResult
from .cache import sweep_debris
from .data import DataSpec, TrainingData, self_data_spec
from .distributed import Ranks
from .domains import resolve_domains
from .errors import UserError
from .formats import MASKS_FILE, count_parameters, detect_format, format_of, graph_config
from .plan import Plan, stage_id
from .records import build_report, stage_record
from .registry import PassSpec
from .report import write_report
from .resources import Resources
from .sources import SourceRef, source_id
from .ui import UI

STAGES = "stages"
WORK = ".work"


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "pipeline.yaml").is_file() and not (out / STAGES).is_dir():
        raise UserError(f"--out {out} is a non-empty folder that is not a compress output; choose another")


def stage_is(path: Path, artifact_id: str) -> bool:
    if not is_artifact(path):
        return False
    try:
        return read_artifact(path).id == artifact_id
    except UserError:
        return False


def run(p: Plan, out: str | Path, *, quiet: bool = False) -> dict[str, Any] | None:
    """Run the plan into ``out``; finished stages (same id) are reused, not redone.

    Under ``accelerate launch``/``torchrun`` every rank calls this; rank 0 writes everything
    and returns the report, the other ranks join the training passes and return None.
    """
    out = Path(out)
    ranks = Ranks.from_env()
    single = [st.spec.name for st in p.pipeline.stages if st.spec.single_process]
    if ranks.world > 1 and single:  # every rank refuses alike, before any joins the process group
        raise UserError(f"pass {single[0]} runs in one process; run this profile without accelerate launch / "
                        f"torchrun (it has {ranks.world} processes)")
    ranks.init()
    ui = UI(quiet or not ranks.is_main)
    started = time.perf_counter()
    if ranks.is_main:  # the other ranks could see rank 0's half-made folder
        _check_out_dir(out)
    pipe = p.pipeline
    src_id = source_id(p.source)
    domains = resolve_domains(pipe.evaluation.domains, p.eval_data, self_data_spec(src_id, pipe.data, "eval"))
    data_stages = [s for s in pipe.stages if s.spec.needs_data]
    sequences = max((s.config.training_sequences() or 0 for s in data_stages), default=0)
    train_data = TrainingData.of(p.data, src_id, pipe.data, sequences) if data_stages else None
    data_key = f"{train_data.key};seq_len={pipe.data.seq_len}" if train_data else None

    eval_key = hash_parts(*(f"{n}={s.fingerprint}" for n, s in domains), pipe.evaluation.canonical_json(), src_id)
    ids, dirs = [src_id], [out / STAGES / "00-source"]
    for i, st in enumerate(pipe.stages, 1):
        ids.append(stage_id(ids[-1], st.spec, st.config, teacher_id=src_id, data_key=data_key, target=pipe.target,
                            eval_key=eval_key))
        dirs.append(out / STAGES / f"{i:02d}-{st.spec.name}")

    res = Resources(p.source, pipe.data, ui)
    if ranks.is_main and not stage_is(dirs[0], src_id):
        # converts, validates and loads the source before anything is written to `out`: a stage is
        # only ever published holding a model that loads
        res.folder()
        res.tokenizer()
        res.teacher()
    created = not out.exists()
    committed = False
    lock = None
    try:
        if ranks.is_main:
            with os_errors(out):
                out.mkdir(parents=True, exist_ok=True)
            with os_errors(out):
                lock = _lock(out)
            remove_stale_temps(out / STAGES)
            remove_stale_temps(out / WORK)
            sweep_debris()
            atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(p.to_dict(), sort_keys=False))
        records: list[dict] = []
        teacher_ref = {"id": src_id, "path": str(dirs[0].resolve())}

        def blocks():
            from .data import mix_blocks, pack_blocks

            specs = [s for s in (train_data.user, train_data.own) if s is not None]
            if ranks.is_main:  # rank 0 writes self-generated data; the others read it after
                streams = [res.stream(s) for s in specs]
            ranks.barrier()
            if not ranks.is_main:
                streams = [res.stream(s) for s in specs]
            packed = [pack_blocks(st, res.data_cfg.seq_len) for st in streams]
            return mix_blocks(packed[0], packed[1], train_data.mix) if len(packed) == 2 else packed[0]

        for i, d in enumerate(dirs):
            cached = stage_is(d, ids[i])
            if not cached:
                if i == 0:
                    if ranks.is_main:
                        write_source_stage(d, src_id, p.source, res)
                else:
                    st = pipe.stages[i - 1]
                    work = out / WORK / ids[i]
                    work.mkdir(parents=True, exist_ok=True)
                    ui.log(f"[{d.name}] running pass {st.spec.name} (id {ids[i]})")
                    # rank 0 commits the stage; other ranks train along and what they write is thrown away
                    target = staging_dir(d) if ranks.is_main else tempfile.TemporaryDirectory()
                    with target as tmp:
                        ctx = PassContext(
                            artifact_id=ids[i], out_dir=Path(tmp), work_dir=work, teacher_path=dirs[0].resolve(),
                            load_teacher=res.teacher, training_blocks=blocks, progress=ui.progress, log=ui.log,
                            target=pipe.target,
                            evaluate=_evaluator(domains, pipe.evaluation, res, ui, src_id) if "eval" in st.spec.uses
                            else None)
                        execute_stage(st.spec, st.config, read_artifact(dirs[i - 1]), ctx, teacher=teacher_ref,
                                      data_label=train_data.label if (st.spec.needs_data and train_data) else None,
                                      write=ranks.is_main)
                    shutil.rmtree(work, ignore_errors=True)
            ranks.barrier()  # the stage is committed before any rank reads it
            committed = True
            if ranks.is_main:
                if i and not pipe.stages[i - 1].spec.changes_model:
                    # the same model as the stage before: its evaluation stands, nothing is re-run
                    metrics = {**records[-1]["metrics"], "eval_seconds": None}
                else:
                    with pipe.target.torch_threads():
                        metrics = _stage_metrics(d, i, eval_key, domains, pipe.evaluation, res, ui, teacher_key=src_id)
                records.append(stage_record(out, d, i, metrics, cached))
        if not ranks.is_main:
            return None
        _remove_other_stages(out, dirs)
        report = build_report(
            profile=pipe.name, model=p.source.label, source_id=src_id,
            evaluation={"data": domains[0][1].label, "primary": domains[0][0], **pipe.evaluation.to_dict(),
                        "domain_labels": {n: s.label for n, s in domains}},
            training_data=train_data.label if train_data else None, target=pipe.target.to_dict(),
            processes=ranks.world, records=records, seconds=time.perf_counter() - started)
        write_report(out, report)
        return report
    except BaseException:
        if ranks.is_main and created and not committed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.close()


def _lock(out: Path):
    """An exclusive lock on ``out`` for the duration of the run (two runs must not interleave)."""
    import fcntl

    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(f"another compress run is writing to {out}") from None
    return handle


def source_invariants(folder: Path) -> dict[str, Any]:
    """The invariants a model folder enters a pipeline with: its shape, and whatever an artifact
    already guarantees (a sparse or quantized artifact given as the source)."""
    inv: dict[str, Any] = {}
    if is_artifact(folder):
        inv.update(read_artifact(folder).manifest.get("invariants") or {})
    shape = _shape_of(folder)
    if shape is not None:
        inv["shape"] = shape
    return inv


def write_source_stage(d: Path, src_id: str, source: SourceRef, res: Resources) -> None:
    folder = res.folder()
    with staging_dir(d) as tmp:
        link_model_files(folder, tmp)
        if is_artifact(folder):
            manifest = read_artifact(folder).manifest
            if source.kind != "artifact":
                manifest["config"]["label"] = source.label
        else:
            manifest = make_manifest(
                id=src_id, parent=None, pass_name="source", pass_version=1,
                config={"origin": str(source.path), "format": source.kind, "label": source.label},
                path=tmp, teacher=None,
            )
        manifest.update(_source_fields(folder, manifest), files=list_files(tmp))
        atomic_write_json(tmp / MANIFEST, manifest)


def source_artifact(ref: SourceRef, folder: Path) -> Artifact:
    """A source as a parent artifact (an HF folder or a converted GGUF has no manifest of its own
    beyond the conversion's): the id the pipeline gives its source stage, its invariants."""
    manifest = read_artifact(folder).manifest if is_artifact(folder) else {}
    return Artifact(Path(folder), {**manifest, "id": source_id(ref), **_source_fields(folder, manifest)})


def _source_fields(folder: Path, manifest: dict) -> dict[str, Any]:
    """What a source stage's manifest states about the model it holds: format, invariants, parameters."""
    return {"format": detect_format(folder), "invariants": source_invariants(folder),
            "parameters": count_parameters(folder) or manifest.get("parameters")}


def parent_masks_of(parent: Artifact) -> Callable[[], dict]:
    def load() -> dict:
        if "sparsity" not in (parent.manifest.get("invariants") or {}):
            return {}
        from .masks import read_masks

        masks = read_masks(parent.path)
        if not masks:
            raise UserError(f"{parent.path}: the manifest records sparsity masks but {MASKS_FILE} is missing")
        return masks
    return load


def execute_stage(spec: PassSpec, cfg, parent: Artifact, ctx: PassContext, *, teacher: dict | None,
                  data_label: str | None = None, write: bool = True, extra: dict | None = None) -> PassResult:
    """Run ``spec`` on ``parent`` into ``ctx.out_dir`` and write its manifest there (``write``)."""
    ctx.parent_masks = parent_masks_of(parent)
    parent_format = parent.manifest.get("format") or detect_format(parent.path)
    t0 = time.perf_counter()
    target = ctx.target
    with (target.torch_threads() if target is not None else contextlib.nullcontext()):
        result = spec.load()(parent, cfg, ctx)
    if not isinstance(result, PassResult):
        raise TypeError(f"pass {spec.name} returned {type(result).__name__}, not a PassResult")
    if not write or ctx.out_dir is None:
        return result
    tmp = Path(ctx.out_dir)
    if not spec.changes_model:
        link_model_files(parent.path, tmp)  # the same model, passed on by hard links
    invariants = _invariants(spec, parent, result, tmp)
    expected = spec.output_format(parent_format)
    got = detect_format(tmp)
    if got != expected:
        raise RuntimeError(f"pass {spec.name} wrote a {got} folder; it registered {expected}")
    _verify(spec, tmp, invariants)
    params = count_parameters(tmp) or parent.manifest.get("parameters")
    manifest = make_manifest(
        id=ctx.artifact_id, parent=parent.id, pass_name=spec.name, pass_version=spec.version,
        config=cfg.to_dict(), path=tmp, teacher=teacher,
        extra={
            "format": got,
            "changes_model": spec.changes_model,
            "parameters": params,
            "invariants": invariants,
            "metrics": {**result.metrics, "pass_seconds": time.perf_counter() - t0},
            "report": list(result.report),
            "latency": list(result.latency) or None,
            "notes": list(result.notes),
            "data": data_label,
            **(extra or {}),
        },
    )
    atomic_write_json(tmp / MANIFEST, manifest)
    return result


def _invariants(spec: PassSpec, parent: Artifact, result: PassResult, tmp: Path) -> dict[str, Any]:
    """The parent's invariants, minus what the pass drops, updated by what it states."""
    inv = {k: v for k, v in (parent.manifest.get("invariants") or {}).items() if k not in result.drop}
    unknown = set(result.drop) - set(INVARIANTS)
    if unknown:
        raise ValueError(f"pass {spec.name} drops unknown invariants {sorted(unknown)}")
    if result.sparsity is not None:
        from .masks import write_masks

        inv["sparsity"] = write_masks(tmp, result.sparsity.masks, result.sparsity.pattern)
    elif "sparsity" in inv:
        if not (tmp / MASKS_FILE).is_file():
            link_or_copy(parent.path / MASKS_FILE, tmp / MASKS_FILE)  # the masks travel with the model
    else:
        (tmp / MASKS_FILE).unlink(missing_ok=True)  # dropped: no stale mask file
    if result.quantization is not None:
        inv["quantization"] = result.quantization
    if result.shape is not None:
        inv["shape"] = result.shape
    return inv


def _shape_of(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    from .arch import arch_for
    from .untrusted import read_json

    config = graph_config(read_json(path))  # an ONNX export's config.json is written for its consumers
    return arch_for(config.get("model_type"), folder).shape(config)


def _verify(spec: PassSpec, tmp: Path, inv: dict[str, Any]) -> None:
    """The output obeys the invariants its manifest will state (a pass bug, never the user's), and
    its weights are whole: every safetensors file verified, an HF folder's tensors match its config."""
    from .sources import check_weights, hf_weight_problems
    from .untrusted import read_json

    check_weights(tmp)
    if detect_format(tmp) == "hf":
        problems = hf_weight_problems(tmp, read_json(tmp / "config.json"))
        if problems:
            raise RuntimeError(f"pass {spec.name} wrote weights that do not match their config: {'; '.join(problems)}")
    shape = _shape_of(tmp)
    if shape is not None and "shape" in inv and shape != inv["shape"]:
        changed = sorted(k for k in shape if shape[k] != inv["shape"].get(k))
        raise RuntimeError(f"pass {spec.name} changed the model's {', '.join(changed)} without stating it "
                           "(PassResult.shape)")
    if "sparsity" in inv and format_of(tmp).evaluated_with == "pytorch":
        from .masks import read_masks, violations
        from .models import load_model

        bad = violations(load_model(tmp), read_masks(tmp))
        if bad:
            raise RuntimeError(f"pass {spec.name} keeps the sparsity invariant but {sum(bad.values())} pruned "
                               f"weights are nonzero (first: {next(iter(bad))})")


def _stage_metrics(d: Path, index: int, key: str, domains: list[tuple[str, DataSpec]], ecfg: EvalConfig,
                   res: Resources, ui: UI, teacher_key: str | None = None) -> dict:
    """The stage's evaluation on every domain (cached in its metrics.json under ``key``): the first
    domain's figures at the top level, all of them under ``domains``, ratios under ``summary``."""
    path = d / METRICS
    stored = read_json(path, {})
    if key in stored:
        return stored[key]
    from .evaluation import evaluate_domains

    streams = []
    for name, spec in domains:
        streams.append((name, res.stream(spec, ecfg.max_tokens)))
        ui.log(f"[{d.name}] evaluating on {min(streams[-1][1].numel(), ecfg.max_tokens)} tokens of {name}")
    model = res.teacher() if index == 0 else load_for_eval(d)
    result = evaluate_domains(model, streams, window=ecfg.window, max_tokens=ecfg.max_tokens,
                              batch_size=ecfg.batch_size, teacher=None if index == 0 else res.teacher,
                              teacher_key=teacher_key, is_teacher=index == 0, progress=ui.progress)
    del model
    stored = {key: result}  # only the current evaluation settings are kept
    atomic_write_json(path, stored)
    return result


def _evaluator(domains: list[tuple[str, DataSpec]], ecfg: EvalConfig, res: Resources, ui: UI,
               teacher_key: str) -> Callable[[Any], dict]:
    """``ctx.evaluate``: a PyTorch model scored as the runner scores a stage (every domain)."""
    def evaluate(model) -> dict:
        from .evaluation import evaluate_domains

        streams = [(name, res.stream(spec, ecfg.max_tokens)) for name, spec in domains]
        return evaluate_domains(model, streams, window=ecfg.window, max_tokens=ecfg.max_tokens,
                                batch_size=ecfg.batch_size, teacher=res.teacher, teacher_key=teacher_key)
    return evaluate


def load_for_eval(folder: Path):
    """A model ``evaluate_stream`` can score, as its format runs it (PyTorch, or ONNX Runtime)."""
    fmt = format_of(folder)
    if fmt.evaluated_with == "pytorch":
        from .models import load_model

        return load_model(folder)
    return fmt.load(folder)


def _remove_other_stages(out: Path, keep: list[Path]) -> None:
    """Drop stages and checkpoints that belong to no stage of the pipeline just run."""
    names = {d.name for d in keep}
    for p in (out / STAGES).iterdir():
        if p.is_dir() and not p.name.startswith(".") and p.name not in names:
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out / WORK, ignore_errors=True)  # every stage is committed: no checkpoint is needed
