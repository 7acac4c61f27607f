"""Where a transfer runs and how: the device, the network's number format and the memory free there.

Read from the machine (torch, /proc, the container's cgroup); the engine asks, the web job spreads runs over
the GPUs with `gpu_names`.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .settings import SettingsError


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        device = torch.device(name)
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
            "mps": torch.backends.mps.is_available(),
        }
        if not available[device.type]:
            raise SettingsError(f"Device {name!r} is not available on this machine; use 'auto' or 'cpu'.")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    _configure(device.type)
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """The network's number format: `name`, or for "auto" the fastest that keeps quality on `device`:
    bfloat16 where the hardware runs it faster, float16 on other GPUs, float32 elsewhere (bench/README.md)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_bf16() == "amx":
        return "bf16"
    return "fp32"  # MPS, and CPUs without AMX: there float32 is faster (bench/README.md)


@functools.cache
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> str:
    """How this CPU runs bfloat16, from Linux's list of its features: "amx" (AMX-BF16's tile units: VGG19 3.4x
    faster than in float32), "avx512" (AVX512-BF16 alone: 1.4 to 1.6x slower than float32, measured), or
    "emulated" (slower still)."""
    try:
        with open(cpuinfo) as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return "emulated"
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512_bf16" in flags else "emulated"


def gpu_names() -> list[str]:
    """This machine's CUDA devices as device names ("cuda:0", "cuda:1", ...), for spreading runs over them."""
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


@functools.cache
def _configure(device_type: str) -> None:
    if device_type == "cuda":
        # TF32 convolutions and matmuls: several times faster, far below visible precision.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device_type == "cpu":
        torch.set_num_threads(cpu_budget())


def cpu_budget() -> int:
    """CPUs this process may really use: affinity, and a container's CPU quota (cgroup v2)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def free_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    try:
        meminfo = dict(line.split(":") for line in open("/proc/meminfo"))
        limits.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    # The container's limit: cgroup v2, or v1 (which reports no limit as a number near 2**63).
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            maximum = open(f"/sys/fs/cgroup/{limit_file}").read().strip()
            if maximum != "max" and int(maximum) < 2**60:
                limits.append(int(maximum) - int(open(f"/sys/fs/cgroup/{usage_file}").read()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None
