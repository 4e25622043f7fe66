#!/bin/bash
# Issue 22 study queue, round 21: claim 1's remaining arms interleaved with claim 2's two probes
# (DiffusionNFT anchored, CRD under the same cosine schedule), seed 0 first. Resumable (--reuse).
cd /work/main
while pgrep -f benchmarks/convergence.py > /dev/null; do sleep 20; done
c1() {  # claim 1: ConsistentRFT ablation on the ShapesScore proxy
  echo "[queue] $(date) claim1 $1 seed $2"
  python benchmarks/convergence.py --presets $1 --seeds $2 --minutes 60 --eval-images 512 --base --reuse \
    --out runs/study_claims_rft --set reward=shapes_score --set 'reward_kwargs={}' --set ckpt_keep_every=10 \
    --no-compare >> runs/study_claims_rft.log 2>&1
}
c2() {  # claim 2: forward-process family on the verifier, cosine lr over the hour's ~420 epochs
  echo "[queue] $(date) claim2 $1 seed $2"
  python benchmarks/convergence.py --presets $1 --seeds $2 --minutes 60 --eval-images 512 --base --reuse \
    --out runs/study_claims_fwd --set epochs=420 --set lr_schedule=cosine --set ckpt_keep_every=20 \
    --no-compare >> runs/study_claims_fwd.log 2>&1
}
c1 consistent_rft_dgr_only 0
c1 consistent_rft 0
c2 diffusion_nft_anchored 0
c1 consistent_rft_cpgo_only 0
c2 crd 0
c1 consistent_rft_dgr_epoch 0
for seed in 1 2; do
  for p in flow_grpo consistent_rft_dgr_only consistent_rft consistent_rft_cpgo_only; do c1 $p $seed; done
done
echo "[queue] $(date) done"
