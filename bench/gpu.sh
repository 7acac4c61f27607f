#!/usr/bin/env bash
# The GPU bench in one command (bench/gpu.py says what it prints); --quick runs it small enough for a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/gpu.py "$@"
