#!/bin/bash
# Issue 22, claim 1: the ConsistentRFT ablation on the ShapesScore proxy, seed 0 of every arm first.
# Resumable: every call keeps finished runs (--reuse) and resumes a cut run from its checkpoint.
cd /work/main
for seed in 0 1 2; do
  for p in flow_grpo consistent_rft_dgr_only consistent_rft consistent_rft_cpgo_only consistent_rft_dgr_epoch; do
    if [ "$p" = consistent_rft_dgr_epoch ] && [ "$seed" != 0 ]; then continue; fi
    echo "[queue] $(date) $p seed $seed"
    python benchmarks/convergence.py --presets $p --seeds $seed --minutes 60 --eval-images 512 --base --reuse \
      --out runs/study_claims_rft --set reward=shapes_score --set 'reward_kwargs={}' --set ckpt_keep_every=10 \
      --no-compare >> runs/study_claims_rft.log 2>&1
  done
done
echo "[queue] $(date) done"
