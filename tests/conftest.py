from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "wikitext-2"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cache unless COMPRESS_CACHE_DIR is set."""
    if "COMPRESS_CACHE_DIR" not in os.environ:
        os.environ["COMPRESS_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(autouse=True)
def _no_files_in_cwd():
    """Fail a test that writes into the working directory."""
    before = set(os.listdir("."))
    yield
    created = set(os.listdir(".")) - before
    assert not created, f"test wrote into the working directory: {sorted(created)}"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    from tiny import CORPUS

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``compress ARGS`` in a subprocess (the real entry point, exit codes and streams)."""
    return subprocess.run(
        [sys.executable, "-m", "compress", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli


def genai_generate(folder: Path, prompt: "str | list[int]", n: int) -> tuple[list[int], str]:
    """onnxruntime-genai's own loop: ``n`` greedy tokens after ``prompt`` (text goes through its own
    tokenizer), EOS ignored; returns the tokens and their text. Skips when genai is absent."""
    pytest.importorskip("onnxruntime_genai")
    from exporters.onnx.genai import genai_greedy

    _, new, text = genai_greedy(folder, prompt, n)
    return new, text


def optimum_generate(folder: Path, text: str, n: int) -> tuple[list[int], list[str]]:
    """optimum's ORTModelForCausalLM from text; returns the new tokens and every warning it emitted."""
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    records: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Catch()
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = ORTModelForCausalLM.from_pretrained(folder)
            tok = AutoTokenizer.from_pretrained(folder)
            enc = tok(text, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    records += [str(w.message) for w in caught]
    return out[0, enc["input_ids"].shape[1]:].tolist(), records


class TrainingKilled(Exception):
    """Raised by :func:`killed_during_training` in place of a kill."""


def killed_during_training(run, step: int):
    """Call ``run()`` with the shared training loop dying after optimizer step ``step`` (its
    checkpoints up to then written, as a killed process leaves them); returns when it has died."""
    import compress.training.loop as loop
    from compress.training.loop import Hooks

    real = loop.train

    def train_then_die(*args, hooks=None, **kw):
        hooks = hooks or Hooks()
        inner = hooks.after_step

        def after(model, s):
            if inner:
                inner(model, s)
            if s == step:
                raise TrainingKilled
        hooks.after_step = after
        return real(*args, hooks=hooks, **kw)

    loop.train = train_then_die
    try:
        with pytest.raises(TrainingKilled):
            run()
    finally:
        loop.train = real
