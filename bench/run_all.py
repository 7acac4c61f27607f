"""Every bench in one process, on the same inputs, device and untrained weights.

Full run: about 20 minutes on a 2-core CPU; --quick: a few minutes at smaller sizes.
Memory measurements run in fresh subprocesses (see bench/memory.py).
"""

from __future__ import annotations

import argparse
import time

import memory
import presets
import quality
import step_time
from common import machine_header, start

SECTIONS = ("steps", "quality", "presets", "memory")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer steps: checks the bench works")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args, device = start(p)
    print("quick" if args.quick else "full", flush=True)
    q = args.quick
    runs = {
        "steps": lambda: step_time.report(
            device,
            [256, 512] if q else [256, 512, 1024],
            [128, 256] if q else [128, 256, 512],
            4 if q else 8,
            2 if q else 3,
        ),
        "quality": lambda: quality.report(
            *quality.measure(device, 256 if q else 512, 100 if q else 300, ["default"]),
            256 if q else 512,
            100 if q else 300,
        ),
        "presets": lambda: presets.report(device, ["draft", "standard"] if q else ["draft", "standard", "fine"], 3),
        "memory": lambda: memory.report(device, [256, 512] if q else [512, 1024, 2048], 250, 4, 8.0),
    }
    total = time.perf_counter()
    for name in args.only:
        started = time.perf_counter()
        print(runs[name](), flush=True)
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\n{machine_header(device)}\nbench total {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
