"""How much memory the engine may still use on a CPU: the machine's, or its container's limit where lower."""

import builtins
import io

import torch

import stylize.device


def files(contents: dict[str, str]):
    """`open` as stylize.device sees it, with these files (the rest as they are, or missing under /sys/fs/cgroup)."""

    def fake(path, *args, **kwargs):
        if path in contents:
            return io.StringIO(contents[path])
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return builtins.open(path, *args, **kwargs)

    return fake


MEMINFO = "MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n"  # 32 GiB available on the machine


def test_a_cgroup_v1_limit_is_read(monkeypatch):
    monkeypatch.setattr(
        stylize.device,
        "open",
        files(
            {
                "/proc/meminfo": MEMINFO,
                "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(2**30),
                "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(2**28),
            }
        ),
        raising=False,
    )
    assert stylize.device.free_memory(torch.device("cpu")) == 2**30 - 2**28


def test_a_cgroup_v2_limit_is_read(monkeypatch):
    monkeypatch.setattr(
        stylize.device,
        "open",
        files(
            {
                "/proc/meminfo": MEMINFO,
                "/sys/fs/cgroup/memory.max": str(2**31),
                "/sys/fs/cgroup/memory.current": str(2**30),
            }
        ),
        raising=False,
    )
    assert stylize.device.free_memory(torch.device("cpu")) == 2**30


def test_no_container_limit_leaves_the_machines_memory(monkeypatch):
    monkeypatch.setattr(
        stylize.device,
        "open",
        files(
            {
                "/proc/meminfo": MEMINFO,
                "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
                "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(2**30),
                "/sys/fs/cgroup/memory.max": "max",
            }
        ),
        raising=False,
    )
    assert stylize.device.free_memory(torch.device("cpu")) == 32 * 2**30
