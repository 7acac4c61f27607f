"""The benches a GPU run depends on still run: bench/gpu.sh --quick, end to end, on this CPU."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import artwork, photo

ROOT = Path(__file__).resolve().parent.parent


# slow: minutes on a shared 2-core machine (bfloat16 is emulated on CPUs without it; a step at 128 px took 7 s
# under a load of 20)
@pytest.mark.slow
def test_gpu_bench_runs_quick_on_a_cpu(tmp_path):
    # The bench's photo and painting, made here: tests never read the shared images or use trained weights.
    photo(512, 384).save(tmp_path / "tubingen.jpg")
    artwork(400, 320).save(tmp_path / "starry_night.jpg")
    env = {**os.environ, "STYLIZE_BENCH_IMAGES": str(tmp_path), "STYLIZE_BENCH_WEIGHTS": "untrained"}
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "# weights: untrained" in out
    for heading in ("1. Per step", "2. tr(M^½)", "3. Presets end to end", "4. A 192 px picture", "5. Bar"):
        assert heading in out, f"{heading!r} missing from:\n{out}"
    assert "losses.TRACE_SQRT picks _TraceSqrt on cpu" in out
    assert "failed" not in out  # the fresh-process memory run
    bar = re.search(r"standard preset .* = ([\d.]+) bare steps", out)
    assert bar and float(bar.group(1)) > 0, out
