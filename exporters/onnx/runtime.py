"""Running an exported decoder with plain ONNX Runtime (torch-free).

``Decoder`` owns one ``InferenceSession`` and drives incremental decoding the way
ONNX Runtime GenAI does on CPU: the KV cache is one preallocated buffer per layer that
``GroupQueryAttention`` appends to in place (past and present bound to the same
``OrtValue``), so a decoding step copies nothing but the new token's logits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.formats import ONNX_CONFIG
from compress.errors import UserError, one_line

MODEL_FILE = "model.onnx"

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: execution provider, threads and extra session/provider options."""

    provider: str = "cpu"  # cpu | cuda
    threads: int = 0  # intra-op threads; 0 = ONNX Runtime's default (one per physical core)
    session_options: dict[str, Any] = field(default_factory=dict)  # config entries, e.g. accuracy_level
    provider_options: dict[str, Any] = field(default_factory=dict)
    graph_optimization: str = "all"  # all | extended | basic | disabled


_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def check_provider(provider: str) -> None:
    """One-line UserError when the provider cannot run here."""
    import onnxruntime as ort

    if provider not in _PROVIDERS:
        raise UserError(f"unknown execution provider {provider!r} (known: {', '.join(_PROVIDERS)})")
    if _PROVIDERS[provider] not in ort.get_available_providers():
        raise UserError(
            f"target {provider} unavailable: onnxruntime {ort.__version__} has no {_PROVIDERS[provider]} "
            f"(available: {', '.join(ort.get_available_providers())}; install onnxruntime-gpu on a CUDA machine)"
        )


def make_session(model_path: Path, opts: RuntimeOptions):
    import onnxruntime as ort

    check_provider(opts.provider)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so.graph_optimization_level = levels[opts.graph_optimization]
    for key, value in opts.session_options.items():
        so.add_session_config_entry(key, str(value))
    providers = [(_PROVIDERS[opts.provider], dict(opts.provider_options))]
    if opts.provider != "cpu":
        providers.append(("CPUExecutionProvider", {}))
    try:
        return ort.InferenceSession(str(model_path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UserError(f"onnxruntime cannot load {model_path}: {one_line(exc)}") from None



@dataclass
class DecoderInfo:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    dtype: Any
    eos_token_id: list[int]


def read_info(folder: Path) -> DecoderInfo:
    try:
        cfg = json.loads((Path(folder) / ONNX_CONFIG).read_text())["model"]
        dec = cfg["decoder"]
        eos = cfg.get("eos_token_id")
        return DecoderInfo(
            num_layers=int(dec["num_hidden_layers"]), num_kv_heads=int(dec["num_key_value_heads"]),
            head_dim=int(dec["head_size"]), vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("context_length", 2048)), dtype=None,
            eos_token_id=list(eos) if isinstance(eos, list) else ([] if eos is None else [int(eos)]),
        )
    except FileNotFoundError:
        raise UserError(f"{folder} is not an ONNX export (no {ONNX_CONFIG})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"corrupt {Path(folder) / ONNX_CONFIG}: {one_line(exc)}") from None


@dataclass
class StepTimes:
    prefill_seconds: float = 0.0  # prompt forward + first token choice (time to first token)
    decode_seconds: list[float] = field(default_factory=list)  # one per further token


class Decoder:
    """An exported decoder in one ONNX Runtime session."""

    def __init__(self, folder: Path, opts: RuntimeOptions = RuntimeOptions(), model_file: str = MODEL_FILE):
        self.folder = Path(folder)
        self.opts = opts
        self.info = read_info(self.folder)
        path = self.folder / model_file
        if not path.is_file():
            raise UserError(f"{path} not found")
        self.session = make_session(path, opts)
        kinds = {i.name: i.type for i in self.session.get_inputs()}
        self.info.dtype = _ORT_TYPES.get(kinds.get("past_key_values.0.key"), np.float32)
        self.has_position_ids = "position_ids" in kinds  # exports before compress 0.1 (pass version 1) had none
        self.device = "cuda" if opts.provider == "cuda" else "cpu"

    # ----------------------------------------------------------------- full-sequence logits

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits for every position of ``ids`` (batch, seq), no cache: (batch, seq, vocab) float32."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        b = ids.shape[0]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self.has_position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        empty = np.zeros((b, self.info.num_kv_heads, 0, self.info.head_dim), self.info.dtype)
        for i in range(self.info.num_layers):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        return self.session.run(["logits"], feeds)[0].astype(np.float32, copy=False)

    # ------------------------------------------------------------------ greedy generation

    def generate(self, prompt: list[int] | np.ndarray, new_tokens: int, *, stop_at_eos: bool = False,
                 times: StepTimes | None = None, on_logits: Callable[[np.ndarray], None] | None = None) -> list[int]:
        """Greedy decoding of one prompt with a shared in-place KV cache.

        Args:
            prompt: token ids of the prompt.
            new_tokens: how many tokens to generate (fewer only with ``stop_at_eos``).
            times: filled with the prefill and per-step wall times.
            on_logits: called with each step's last-position logits (vocab,), for validation.
        """
        import onnxruntime as ort

        prompt = np.asarray(prompt, dtype=np.int64).reshape(1, -1)
        n = prompt.shape[1]
        max_len = n + new_tokens
        if max_len > self.info.context_length:
            raise UserError(f"prompt + new tokens = {max_len} exceed the model's context length {self.info.context_length}")
        info = self.info
        kv_shape = (1, info.num_kv_heads, max_len, info.head_dim)
        binding = self.session.io_binding()
        caches = []
        for i in range(info.num_layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(kv_shape, info.dtype, self.device, 0)
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
                binding.bind_ortvalue_output(f"present.{i}.{kind}", buf)
                caches.append(buf)
        # logits land in buffers we own: on CPU the numpy arrays are read with no copy
        logit_bufs = {}
        for length in {n, 1}:
            if self.device == "cpu":
                host = np.empty((1, length, info.vocab_size), dtype=info.dtype)
                logit_bufs[length] = (host, ort.OrtValue.ortvalue_from_numpy(host))
            else:
                logit_bufs[length] = (None, ort.OrtValue.ortvalue_from_shape_and_type(
                    (1, length, info.vocab_size), info.dtype, self.device, 0))
        mask = np.ones((1, max_len), dtype=np.int64)
        positions = np.arange(max_len, dtype=np.int64).reshape(1, -1)
        out: list[int] = []
        eos = set(info.eos_token_id)
        ids = prompt
        total = n
        for step in range(new_tokens):
            t0 = time.perf_counter()
            host, value = logit_bufs[ids.shape[1]]
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask[:, :total])
            if self.has_position_ids:
                binding.bind_cpu_input("position_ids", positions[:, total - ids.shape[1]:total])
            binding.bind_ortvalue_output("logits", value)
            self.session.run_with_iobinding(binding)
            logits = (host if host is not None else value.numpy())[0, -1]
            token = int(np.argmax(logits))
            dt = time.perf_counter() - t0
            if times is not None:
                if step == 0:
                    times.prefill_seconds = dt
                else:
                    times.decode_seconds.append(dt)
            if on_logits is not None:
                on_logits(logits.astype(np.float32))
            out.append(token)
            if stop_at_eos and token in eos:
                break
            ids = np.array([[token]], dtype=np.int64)
            total += 1
        del caches
        return out


class OnnxCausalLM:
    """Just enough of a Hugging Face causal LM for ``compress.evaluation``: ``model(input_ids=...).logits``."""

    def __init__(self, folder: Path, opts: RuntimeOptions = RuntimeOptions()):
        self.decoder = Decoder(folder, opts)

    def eval(self) -> "OnnxCausalLM":
        return self

    def __call__(self, input_ids, **_: Any):
        import torch
        from types import SimpleNamespace

        logits = self.decoder.logits(input_ids.detach().cpu().numpy())
        return SimpleNamespace(logits=torch.from_numpy(logits))
