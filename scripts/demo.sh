#!/usr/bin/env bash
# The main job: installs what it needs, then a short Flow-GRPO run on ShapesWorld from the
# shipped base model (about 5 minutes of training on 2 CPU cores), then a report:
#   runs/demo/curves.png, runs/demo/samples/*.png, runs/demo/eval/eval.md (+ eval.json, grids)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${1:-runs/demo}"
if [ -e "$out/config.yaml" ]; then
  echo "$out already holds a run; pass another directory: bash scripts/demo.sh runs/demo2" >&2
  exit 2
fi
diffalign train flow_grpo --out "$out" max_train_minutes=5 eval.every=5 eval.num_images=64
diffalign eval "$out" --num-images 128 --out "$out/eval"
echo "report: $out/eval/eval.md, curves: $out/curves.png, samples: $out/samples/"
