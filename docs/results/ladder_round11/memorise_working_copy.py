"""Rung 1.5 (exploratory): can Flow-GRPO teach the policy to pass from K fixed initial noises?"""
import argparse, dataclasses, json, sys, time
import torch
sys.path.insert(0, "/work/main/benchmarks")
from diffalign.cli import resolve_preset
from diffalign.config import load_config
from diffalign.runtime import keep_freed_memory
from diffalign.sampling.rollout import rollout
from diffalign.training.trainer import TrainConfig, Trainer
from diffalign.world.verify import verify_batch

ap = argparse.ArgumentParser()
ap.add_argument("--prompt", default="four blue circles")
ap.add_argument("--out", required=True)
ap.add_argument("--epochs", type=int, default=30)
ap.add_argument("--every", type=int, default=10)
ap.add_argument("--fresh", type=int, default=64)
ap.add_argument("--set", action="append", default=[])
ap.add_argument("--json", required=True)
a = ap.parse_args()
keep_freed_memory()
open(a.out + ".txt", "w").write(a.prompt + "\n")
cfg = load_config(TrainConfig, resolve_preset("flow_grpo"),
                  [f"prompt_file={a.out}.txt", "eval.every=0", *a.set])
tr = Trainer(cfg, a.out)
fresh_cfg = dataclasses.replace(cfg.rollout, init_seed=None)
K = cfg.prompts_per_epoch
def ev(e):
    tr.policy.eval()
    with torch.no_grad():
        seen = rollout(tr.policy, [a.prompt] * (K * 8), torch.arange(K).repeat_interleave(8), cfg.rollout,
                       generator=torch.Generator().manual_seed(777))
        fr = rollout(tr.policy, [a.prompt] * a.fresh, torch.arange(a.fresh), fresh_cfg,
                     generator=torch.Generator().manual_seed(999))
    s = sum(v.score for v in verify_batch(seen.images, [a.prompt] * len(seen))) / len(seen)
    f = sum(v.score for v in verify_batch(fr.images, [a.prompt] * len(fr))) / len(fr)
    return {"epoch": e, "seen_noise_score": s, "fresh_noise_score": f, "train_s": round(tr.train_time, 1)}
rows, evals = [], [ev(0)]
print(evals[-1], flush=True)
for e in range(a.epochs):
    r = tr.step_epoch(e)
    rows.append({"epoch": e, "pass": r.get("reward/score"), "partial": r["reward"], "row": r})
    print(e, round(r.get("reward/score", -1), 3), round(r["reward"], 3), flush=True)
    if (e + 1) % a.every == 0:
        evals.append(ev(e + 1)); print(evals[-1], flush=True)
json.dump({"prompt": a.prompt, "sets": a.set, "K": K, "train": rows, "evals": evals}, open(a.json, "w"), indent=1)
