#!/bin/bash
# Issue 22 study queue (next session): everything of claims22_queue2.sh that is not finished, with
# claim 3 (preference family, 2,048 pairs, 160 updates, 512-image evaluation) after claim 2's probes.
# Resumable: finished runs are kept (--reuse), a cut run resumes from its checkpoint.
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
c3() {  # claim 3: preference family, 4x the data and updates of the first comparison
  echo "[queue] $(date) claim3 $1 seed $2"
  python benchmarks/convergence.py --presets $1 --seeds $2 --minutes 60 --eval-images 512 --base --reuse \
    --out runs/study_claims_pref --set data=runs/prefs_2048 --set max_updates=160 --set ckpt_every=20 \
    --set ckpt_keep_every=40 --set eval.every=20 --set 'eval.final_splits=[]' \
    --no-compare >> runs/study_claims_pref.log 2>&1
}
c1 consistent_rft 0
c2 diffusion_nft_anchored 0
c1 consistent_rft_cpgo_only 0
c2 crd 0
echo "[queue] $(date) claim3 data"
diffalign data prefs --out runs/prefs_2048 num_pairs=2048 >> runs/study_claims_pref.log 2>&1
for seed in 0 1 2; do
  for p in diffusion_dpo sft seppo seppo_ref_first seppo_ref_latest; do c3 $p $seed; done
done
c1 consistent_rft_dgr_epoch 0
for seed in 1 2; do
  for p in flow_grpo consistent_rft_dgr_only consistent_rft consistent_rft_cpgo_only; do c1 $p $seed; done
done
echo "[queue] $(date) done"
