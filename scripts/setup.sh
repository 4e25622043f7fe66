#!/usr/bin/env bash
# Install diffalign and what its tests need. On a CPU machine torch is pinned to the local
# CPU build (constraints-cpu.txt) so pip never pulls the multi-GB CUDA wheels; on a GPU
# machine run with DIFFALIGN_CONSTRAINTS= (empty) to let pip pick torch itself.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints="${DIFFALIGN_CONSTRAINTS-constraints-cpu.txt}"
args=(-q -e ".[dev]")
[ -n "$constraints" ] && args=(-c "$constraints" "${args[@]}")
if ! python3 -c "import diffalign, torch, pytest, diffusers, accelerate, rapidocr, onnxruntime, starlette, uvicorn, hypothesis" 2>/dev/null || [ "${DIFFALIGN_REINSTALL:-0}" = 1 ]; then
  python3 -m pip install "${args[@]}"
else
  python3 -m pip install --no-deps -q -e . >/dev/null
fi
