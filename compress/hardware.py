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


def fast_bf16() -> tuple[bool, str]:
    """(use bf16 autocast?, why). CUDA with bf16 support, or a CPU with bf16 dot products."""
    import torch

    if torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"CUDA bf16 {'supported' if ok else 'unsupported'}"
    flags = cpu_flags()
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"CPU has {', '.join(have)}"
    return False, "CPU has no avx512_bf16/amx_bf16 (bf16 would be emulated, slower than fp32)"


def resolve_bf16(setting: str) -> tuple[bool, str]:
    if setting == "on":
        return True, "bf16 forced on"
    if setting == "off":
        return False, "bf16 off"
    return fast_bf16()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
