#!/usr/bin/env bash
# The main job: installs what it needs, then samples from the shipped ShapesWorld base model
# and verifies every image (becomes a short training run with a report once training lands).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p out
diffalign sample --prompt "a red circle" --prompt "three green triangles" \
  --prompt "a blue square to the left of a yellow triangle" -n 8 --steps 20 --cfg 4.5 \
  --out out/demo_grid.png --json out/demo.json
