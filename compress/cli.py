"""The ``compress`` command line. Thin: parse, resolve, call ``compress.api``.

Importing this module does not import torch (``compress --help`` is instant);
heavy modules are imported inside the commands. Exit codes: 0 ok, 2 bad input
(one line on stderr), 1 internal error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). ``--json`` prints only
the JSON result on stdout; progress and logs go to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any, Callable, List, Optional

import typer

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER, CompressError, one_line

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Compress causal language models for edge deployment: prune, distill, quantize, export, profile.",
)
profiles_app = typer.Typer(no_args_is_help=True, help="List and show deployment profiles.")
passes_app = typer.Typer(no_args_is_help=True, help="List the registered passes.")
app.add_typer(profiles_app, name="profiles")
subnets_app = typer.Typer(no_args_is_help=True, help="The subnet table of an AmoebaLLM supernet, and picking from it.")
app.add_typer(passes_app, name="passes")
app.add_typer(subnets_app, name="subnets")


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command("model")
def model_cmd(
    model: Optional[str] = typer.Argument(None, help="HF folder, .gguf file, artifact or run folder; default: embedded SmolLM2-135M-Instruct"),
    profile: str = typer.Option("quick-4bit", "--profile", "-p", help="profile name (see `compress profiles list`) or a .yaml path; default quick-4bit"),
    out: str = typer.Option("compress-out", "--out", "-o", help="output folder (reruns reuse finished stages)"),
    set_: List[str] = typer.Option([], "--set", help="override SECTION.KEY=VALUE (repeatable)"),
    data: Optional[str] = typer.Option(None, "--data", help="training/calibration text: .txt, .jsonl or folder"),
    eval_data: List[str] = typer.Option([], "--eval-data", help="held-out evaluation text (.txt, .jsonl or folder), repeatable: one domain each, besides evaluation.domains"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved pipeline and stop"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or log lines"),
) -> None:
    """Run a profile's pipeline on a model and write stages plus report.json/report.md."""
    from . import api

    p = api.plan(model, profile, set_, data=data, eval_data=list(eval_data))
    if dry_run:
        resolved = p.to_dict()
        if as_json:
            _emit_json(resolved)
        else:
            import yaml

            sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))
        return
    report = api.run(p, out, quiet=quiet)
    if report is None:  # not rank 0 of a multi-process run: rank 0 reports
        return
    if as_json:
        _emit_json(report)
    else:
        from .report import render_markdown

        sys.stdout.write(render_markdown(report))
        sys.stdout.write(f"\nreport: {os.path.join(out, 'report.md')}\n")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help="HF folder, .gguf, artifact or run folder; default: embedded model"),
    data: List[str] = typer.Option([], "--data", help="evaluation text (.txt, .jsonl or folder), repeatable: one domain each; default: the built-in held-out domains"),
    domains: Optional[str] = typer.Option(None, "--domains", help="built-in domains to add, comma-separated: answers, python-code, python-docs (default: all without --data, none with it)"),
    max_tokens: int = typer.Option(16384, "--max-tokens", help="first N tokens of each domain"),
    window: int = typer.Option(512, "--window", help="non-overlapping window length"),
    batch_size: int = typer.Option(1, "--batch-size", help="windows per forward pass"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher model for KL / agreement (default: the artifact's recorded teacher)"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Perplexity on each held-out domain; with a teacher also KL, top-1 agreement and the ratio to the
    teacher's perplexity, their geometric mean and the worst domain."""
    from . import api

    doms = None if domains is None else tuple(d.strip() for d in domains.split(",") if d.strip())
    result = api.evaluate(model, list(data), max_tokens=max_tokens, window=window, batch_size=batch_size,
                          teacher=teacher, domains=doms, quiet=quiet)
    if as_json:
        _emit_json(result)
        return
    from .report import domain_rows

    lines = [f"model    {result['model']}", f"teacher  {result['teacher'] or '— (give --teacher for KL and ratios)'}",
             f"windows  {window} tokens, first {max_tokens} tokens of each domain", ""]
    lines += domain_rows(result["domains"], result.get("summary") or {})
    sys.stdout.write("\n".join(lines) + "\n")


@app.command("export")
def export_cmd(
    model: Optional[str] = typer.Argument(None, help="artifact, run folder, HF folder or .gguf; default: embedded model"),
    out: str = typer.Option(..., "--out", "-o", help="output folder for model.onnx, genai_config.json, tokenizer"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16"),
    provider: str = typer.Option("cpu", "--provider", help="execution provider named in genai_config.json: cpu or cuda"),
    no_validate: bool = typer.Option(False, "--no-validate", help="skip the comparison with PyTorch (not recommended)"),
    rtol: float = typer.Option(0.0, "--rtol", help="relative logit tolerance (0 = 1e-3 fp32, 2e-2 fp16; quantized at level >= 2: mean KL <= 0.1 nats instead)"),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="MatMulNBits accuracy_level for quantized models (0-4; 4 = int8 activations)"),
    force: bool = typer.Option(False, "--force", help="replace an existing, different --out folder"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no log lines"),
) -> None:
    """Export to ONNX (KV cache, fused ONNX Runtime operators), validated against PyTorch."""
    from . import api

    result = api.export(model, out, precision=precision.lower(), provider=provider.lower(), validate=not no_validate,
                        rtol=rtol, accuracy_level=accuracy_level, force=force, quiet=quiet)
    if as_json:
        _emit_json(result)
        return
    v = result.get("validation")
    lines = [f"export      {result['out']} (id {result['id']}{', cached' if result['cached'] else ''})",
             f"precision   {result['precision']}, provider {result['provider']}, "
             f"{result['onnx_bytes'] / 1e6:.1f} MB on disk"]
    if v:
        from .artifact import validation_line

        lines.append(f"validation  passed: {validation_line(v)} ({v['provider']})")
    else:
        lines.append("validation  skipped")
    sys.stdout.write("\n".join(lines) + "\n")


@app.command("profile")
def profile_cmd(
    models: List[str] = typer.Argument(None, help="ONNX export folders and/or PyTorch models (artifact, HF folder, .gguf); default: embedded model"),
    target: str = typer.Option("cpu", "--target", "-t", help="cpu, cpu:THREADS, cuda, or a target .yaml"),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prompt length, tokens"),
    new_tokens: int = typer.Option(128, "--new-tokens", help="generated tokens per run"),
    runs: int = typer.Option(5, "--runs", help="timed runs (median and min–max reported)"),
    warmup: int = typer.Option(1, "--warmup", help="untimed warm-up runs"),
    csv: Optional[str] = typer.Option(None, "--csv", help="also write the table as CSV to this file"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no log lines"),
) -> None:
    """Latency as a device user feels it: load, time to first token, prefill/decode tokens/s, memory."""
    from . import api

    result = api.profile(list(models or []), target=target, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                         runs=runs, warmup=warmup, quiet=quiet)
    if csv:
        from .profiling.output import write_csv

        write_csv(csv, result["results"])
    if as_json:
        _emit_json(result)
        return
    from .profiling.output import render_table

    s = result["settings"]
    sys.stdout.write(f"target {target}: {s['prompt_tokens']} prompt + {s['new_tokens']} new tokens, "
                     f"median of {s['runs']} runs after {s['warmup']} warm-up (min–max)\n")
    sys.stdout.write(render_table(result["results"]) + "\n")


@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Profiles shipped with compress."""
    from .profiles import available_profiles, read_profile

    rows = []
    for name in available_profiles():
        _, raw = read_profile(name)
        rows.append({"name": name, "description": raw.get("description", ""),
                     "passes": [(x["name"] if isinstance(x, dict) else x) for x in raw.get("passes") or []]})
    if as_json:
        _emit_json(rows)
        return
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        sys.stdout.write(f"{r['name']:<{width}}  {r['description']}\n")


@profiles_app.command("show")
def profiles_show(
    name: str = typer.Argument(..., help="profile name or .yaml path"),
    set_: List[str] = typer.Option([], "--set", help="override SECTION.KEY=VALUE"),
    as_json: bool = typer.Option(False, "--json", help="print the resolved profile as JSON"),
) -> None:
    """A profile, resolved: every pass with every config field."""
    import yaml

    from .profiles import load_pipeline

    resolved = load_pipeline(name, set_).to_dict()
    if as_json:
        _emit_json(resolved)
    else:
        sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False))


@passes_app.command("list")
def passes_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered passes with their config fields and defaults."""
    from .registry import list_passes

    rows = []
    for spec in list_passes():
        defaults = spec.config().to_dict()
        def default(key: str):
            head, _, rest = key.partition(".")
            return defaults[head][rest] if rest else defaults[head]

        rows.append({
            "name": spec.name, "version": spec.version, "summary": spec.summary,
            "accepts": list(spec.accepts), "produces": spec.produces, "uses": list(spec.uses),
            "config": {k: {"default": default(k), "help": h} for k, h in spec.config.field_help().items()},
        })
    if as_json:
        _emit_json(rows)
        return
    for r in rows:
        sys.stdout.write(f"{r['name']} (v{r['version']}, {'|'.join(r['accepts'])} -> {r['produces'] or 'same'}): "
                         f"{r['summary']}\n")
        for k, v in r["config"].items():
            sys.stdout.write(f"    {k:<18} {v['default']!s:<10} {v['help']}\n")


@subnets_app.command("list")
def subnets_list_cmd(
    run: str = typer.Argument(..., help="run folder (or the supernet stage itself) of a profile with the amoeba pass"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result"),
) -> None:
    """The depth x width table: parameters, size, perplexity, KL, top-1, ms/token, TTFT, peak memory."""
    from . import api

    result = api.subnets_list(run)
    if as_json:
        _emit_json(result)
        return
    from .frontier import table_markdown

    bits = result["latency_bits"]
    target = result.get("target") or {}
    sys.stdout.write(f"supernet {result['stage']}: latency and size at {bits}{'-bit' if bits != 'fp32' else ''} on "
                     f"{target.get('device', 'cpu')}:{target.get('threads') or 'all cores'}, {result['prompt_tokens']} "
                     f"prompt tokens; * = predicted from the measured points\n")
    sys.stdout.write("\n".join(table_markdown(result["subnets"])) + "\n")
    for key, name in (("ms_per_token", "ms/token"), ("ttft_ms", "TTFT")):
        err = (result.get("prediction_error") or {}).get(key)
        if err and any(not r.get("latency_measured") for r in result["subnets"]):
            sys.stdout.write(f"predicted {name}: each measured point predicted from the other {err['points'] - 1} is off by "
                             f"{100 * err['median_abs_error']:.0f} % (median), {100 * err['max_abs_error']:.0f} % "
                             f"(worst, {_worst_point(err)}); the pick measures before it takes a predicted point\n")


def _worst_point(err: dict) -> str:
    w = max(err["per_point"], key=lambda e: abs(e["error"]))
    return f"d{w['depth']}-w{w['width']}: {w['predicted']:.2f} for {w['measured']:.2f}"


@subnets_app.command("pick")
def subnets_pick_cmd(
    run: str = typer.Argument(..., help="run folder (or the supernet stage itself)"),
    max_size_mb: float = typer.Option(0.0, "--max-size-mb", help="bytes on disk at the table's precision, MB"),
    max_ms_per_token: float = typer.Option(0.0, "--max-ms-per-token", help="median decode step, ms"),
    max_ttft_ms: float = typer.Option(0.0, "--max-ttft-ms", help="time to first token for the table's prompt, ms"),
    max_ppl: float = typer.Option(0.0, "--max-ppl", help="perplexity on the run's primary evaluation domain"),
    depth: int = typer.Option(0, "--depth", help="take this depth (with --width) instead of a budget"),
    width: float = typer.Option(0.0, "--width", help="take this width fraction (with --depth)"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="cpu, cpu:THREADS, cuda or a .yaml (default: the table's)"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder (default RUN/subnet)"),
    force: bool = typer.Option(False, "--force", help="replace an existing, different --out folder"),
    as_json: bool = typer.Option(False, "--json", help="print only the JSON result"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no log lines"),
) -> None:
    """Extract the most accurate subnet within every budget given (measured); exit 2 naming the closest when none is."""
    from . import api

    result = api.subnets_pick(run, out, max_size_mb=max_size_mb, max_ms_per_token=max_ms_per_token,
                              max_ttft_ms=max_ttft_ms, max_ppl=max_ppl, depth=depth, width=width, target=target,
                              force=force, quiet=quiet)
    if as_json:
        _emit_json(result)
        return
    r = result["row"]
    sys.stdout.write(f"subnet      {result['out']} (id {result['id']}{', cached' if result['cached'] else ''})\n"
                     f"shape       depth {r['depth']}, width {r['width']} ({r['num_heads']} heads, MLP "
                     f"{r['intermediate_size']}), {r['parameters'] / 1e6:.1f} M parameters\n"
                     f"measured    {r['ms_per_token']:.2f} ms/token, TTFT {r['ttft_ms']:.1f} ms, "
                     f"{r['size_mb']:.1f} MB\n"
                     + (f"accuracy    perplexity {r['perplexity']:.3f}, KL {r['kl']:.4f}\n"
                        if r.get("perplexity") is not None else ""))


_interrupted = False


def _interrupt(signum, frame):
    """Ctrl-C / SIGTERM: remember it, then raise KeyboardInterrupt where the code is.

    Remembering matters: raised inside some torch internals, the KeyboardInterrupt can be
    replaced by an error from torch's own cleanup (e.g. a functorch ``DynamicLayer`` assert);
    such a run still ends as interrupted (130), not as an internal error.
    """
    global _interrupted
    _interrupted = signum or True
    raise KeyboardInterrupt


def _interrupted_exit() -> int:
    """Exit code of a run stopped by a signal: 128 + its number (Ctrl-C 130, SIGTERM 143)."""
    signum = _interrupted if isinstance(_interrupted, int) and not isinstance(_interrupted, bool) else signal.SIGINT
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    return _fail(128 + int(signum), _INTERRUPTED_MSG.replace("interrupted", what, 1))


def _fail(code: int, message: str) -> int:
    sys.stderr.write(f"error: {one_line(message)}\n")
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and maps every failure to one line and an exit code."""
    run: Callable = app
    # Ctrl-C and SIGTERM become KeyboardInterrupt, even where the parent started us with
    # SIGINT ignored (background jobs): temp folders are removed, finished stages and
    # checkpoints stay, and a rerun resumes.
    global _interrupted
    _interrupted = False
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rv = run(args=argv, standalone_mode=False, prog_name="compress")
        if rv == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
            raise KeyboardInterrupt
        return rv if isinstance(rv, int) else 0
    except CompressError as exc:
        if _interrupted:
            return _interrupted_exit()
        return _fail(exc.exit_code, str(exc))
    except typer.Exit as exc:
        return _interrupted_exit() if _interrupted else exc.exit_code
    except typer.Abort:
        return _interrupted_exit()
    except KeyboardInterrupt:
        return _interrupted_exit()
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into an exit code
        if _interrupted:  # an error raised while unwinding from Ctrl-C: still an interruption
            return _interrupted_exit()
        return _error_exit(exc)


_INTERRUPTED_MSG = "interrupted; rerun the same command to resume from the last finished stage/checkpoint"


def _error_exit(exc: Exception) -> int:
    if isinstance(exc, MemoryError):
        return _fail(EXIT_INTERNAL, "out of memory")
    if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
        # a command-line usage error from typer's (vendored) click: bad option, missing argument
        return _fail(EXIT_USER, exc.format_message())
    if isinstance(exc, OSError):
        import errno

        if exc.errno == errno.ENOSPC:
            return _fail(EXIT_USER, f"no space left on device ({exc.filename or ''})")
    if os.environ.get("COMPRESS_DEBUG"):
        traceback.print_exception(exc)
    what = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return _fail(EXIT_INTERNAL, f"internal error: {what} (set COMPRESS_DEBUG=1 for a traceback)")


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
