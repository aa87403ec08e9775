"""One description of what a measurement ran on: the dict the bench stores beside every number,
and the one line a chapter prints under a timing."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from torch import nn


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool | None:
    """Whether the CPU has bfloat16 matrix instructions (x86: AVX512-BF16 or AMX; Arm: BF16),
    without which bfloat16 matrix products run on a slow path. None where it cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) if flags else None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment_info(device: str = "cpu") -> dict:
    """Everything a reader needs to compare our numbers with theirs."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__, "python": platform.python_version(), "kvlib": __version__,
        "transformers": hf_version, "platform": platform.platform(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "gpu": gpu, "device": device,
        "load_avg": load_average(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
    }


def environment(model: nn.Module | None = None) -> str:
    """One line naming what a measurement ran on: device, dtype, threads, torch, CPU count."""
    p = next(model.parameters()) if model is not None else torch.empty(0)
    return (f"device={p.device.type} ({device_name(p.device)}), "
            f"dtype={str(p.dtype).removeprefix('torch.')}, threads={torch.get_num_threads()}, "
            f"torch={torch.__version__}, cpus={os.cpu_count()}")
