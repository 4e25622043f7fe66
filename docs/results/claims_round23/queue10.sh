#!/bin/bash
# Issue 22 study queue (from round 24 on; holds every step of the earlier queue3/7/9; CLAIM3_ONLY=1 stops after
# claim 3; round 23 added claim 3's loser-source x flipper x reference diagnostics before its gather;
# each claim's analysis steps run as soon as their runs exist): claim 3 first (short runs,
# the first claim that can reach a verdict), then claims 1 and 2 interleaved: each claim's seed-0
# arms, then seeds 1 and 2, then CRD's ablations (seed 0).
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
c2g() {  # claim 2's Flow-GRPO on the verifier: its own preset and schedule, keeping checkpoints
  echo "[queue] $(date) claim2 $1 seed $2"
  python benchmarks/convergence.py --presets $1 --seeds $2 --minutes 60 --eval-images 512 --base --reuse \
    --out runs/study_claims_fwd --set ckpt_keep_every=10 --no-compare >> runs/study_claims_fwd.log 2>&1
}
echo "[queue] $(date) claim3 data"  # resumes an unfinished build
diffalign data prefs --out runs/prefs_2048 num_pairs=2048 >> runs/study_claims_pref.log 2>&1
PREF=diffusion_dpo,sft,seppo,seppo_ref_first,seppo_ref_latest,seppo_dataset_losers
for seed in 0 1 2; do
  for p in ${PREF//,/ }; do c3 $p $seed; done
done
for p in seppo_dataset_losers_no_flipper seppo_no_flipper seppo_dataset_losers_ref_first; do c3 $p 0; done
for seed in 1 2; do c3 seppo_no_flipper $seed; done  # round 23: seed 0 matched Diffusion-DPO
echo "[queue] $(date) claim3 gather"
python benchmarks/convergence.py --presets $PREF,seppo_dataset_losers_no_flipper,seppo_no_flipper,seppo_dataset_losers_ref_first --seeds 0,1,2 --minutes 60 --eval-images 512 --base --gather \
  --out runs/study_claims_pref > runs/study_claims_pref/gather.log 2>&1
python benchmarks/claims.py runs/study_claims_pref/*-seed? --base runs/study_claims_pref/base-cfg4.5 --key seppo \
  --summary docs/results/claims.json > runs/study_claims_pref/claims.log 2>&1
# the anchor criterion on Diffusion-DPO's trained policy: does a policy that learns the preference fit the winners better than the base?
[ -f docs/results/claims_round23/seppo_criterion_diffusion_dpo_seed0.json ] || python benchmarks/seppo_criterion.py \
  runs/study_claims_pref/diffusion_dpo-seed0 --pairs 256 --draws 16 \
  --out docs/results/claims_round23/seppo_criterion_diffusion_dpo_seed0.json > runs/study_claims_pref/criterion_dpo.log 2>&1
# CLAIM3_ONLY=1 stops here (a session that must run the tests after claim 3 without a timed run beside them)
if [ "${CLAIM3_ONLY:-0}" = 1 ]; then echo "[queue] $(date) claim 3 done (CLAIM3_ONLY=1)"; exit 0; fi
c1 consistent_rft_cpgo_only 0
c2 crd 0
c2g flow_grpo 0
c1 consistent_rft_dgr_epoch 0
echo "[queue] $(date) seed-0 analysis"
python benchmarks/matched_reward.py runs/study_claims_rft/{flow_grpo,consistent_rft_dgr_only,consistent_rft,consistent_rft_cpgo_only}-seed0 \
  --eval-images 512 > runs/study_claims_rft/matched_seed0.log 2>&1
python benchmarks/time_to_score.py runs/study_claims_fwd/{flow_grpo,diffusion_nft_anchored,crd}-seed0 --target 0.631 \
  --gain 0.043 --base-from runs/study_claims_fwd > runs/study_claims_fwd/time_to_score_seed0.log 2>&1
for seed in 1 2; do
  c2 diffusion_nft_anchored $seed
  c2 crd $seed
  for p in flow_grpo consistent_rft_dgr_only consistent_rft consistent_rft_cpgo_only; do c1 $p $seed; done
done
for p in crd_batch_centering crd_tied_snapshots crd_constant_kl crd_kl_cfg_free; do c2 $p 0; done
echo "[queue] $(date) done"
