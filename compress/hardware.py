"""What the machine offers (torch-free where possible)."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), for benchmark records."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: bf16 autocast is used on a CPU only where it measured at least this much faster than fp32
BF16_MIN_SPEEDUP = 1.15


def measure_bf16_speedup(rounds: int = 5) -> float:
    """fp32 time / bf16-autocast time of a training-shaped Linear (forward + backward, 512 tokens x
    576 -> 1536, SmolLM2's MLP), median of ``rounds`` after a warm-up, at torch's current threads."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 576, generator=g)
    w = torch.randn(1536, 576, generator=g, requires_grad=True)

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.linear(x, w)
            y.float().square().mean().backward()
        return time.perf_counter() - t

    for mode in (False, True):
        step(mode)  # warm-up (kernel selection, allocations)
    fp32, bf16 = [], []
    for _ in range(rounds):  # interleaved: drift on a shared machine hits both alike
        fp32.append(step(False))
        bf16.append(step(True))
    return statistics.median(fp32) / statistics.median(bf16)


def _cached_bf16_speedup() -> float:
    """The measurement, once per (CPU, torch version, thread count), remembered in the user cache."""
    import torch

    from .artifact import atomic_write_json, read_json
    from .cache import cache_dir

    key = f"{cpu_name()}|{' '.join(sorted(cpu_flags() & {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16'}))}|" \
          f"torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = cache_dir() / "hardware.json"
    known = read_json(path, {})
    if key not in known:
        known[key] = {"bf16_speedup": measure_bf16_speedup()}
        try:
            atomic_write_json(path, known)
        except Exception:  # the cache is an optimisation only
            pass
    return float(known[key]["bf16_speedup"])


def fast_bf16() -> tuple[bool, str]:
    """(use bf16 autocast?, why). CUDA with bf16 support; on a CPU, by measurement: bf16 can be 2x
    faster (AMX, AVX-512 BF16) or many times slower (emulated on AVX2), so flags are not enough."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA bf16 {'supported' if ok else 'unsupported'}"
    speedup = _cached_bf16_speedup()
    if speedup >= BF16_MIN_SPEEDUP:
        return True, f"measured on this CPU: bf16 training matmuls {speedup:.2f}x as fast as fp32"
    return False, (f"measured on this CPU: bf16 training matmuls {speedup:.2f}x as fast as fp32 "
                   f"(below {BF16_MIN_SPEEDUP}x: fp32)")


def resolve_bf16(setting: str) -> tuple[bool, str]:
    if setting == "on":
        return True, "bf16 forced on"
    if setting == "off":
        return False, "bf16 off"
    return fast_bf16()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
