"""How much of SePPO's anchor decision is signal: the one-draw sign against the many-draw mean.

    python benchmarks/seppo_criterion.py runs/study_claims_pref/seppo-seed0 --pairs 256 --draws 32 \
        --out docs/results/claims_round22/seppo_criterion.json

SePPO's anchor-based flipper (ALGORITHMS.md §4) decides each pair's role from
``s = sign(err_ref(x_w) − err_θ(x_w))``, the flow-matching errors of the reference and the policy on
the winner at **one** draw of the timestep and noise ``(σ, ε)`` (shared by both models). The
question the flipper asks is which model explains the winner better, an expectation over
``(σ, ε)``. This loads a finished SePPO (or any preference) run's final policy and one entry of its
reference pool (``--ref``: 0 is the base model), draws ``--draws`` ``(σ, ε)`` per winner from the
run's own timestep distribution, and reports, over ``--pairs`` winners of the run's dataset:

- ``flip_single``: the fraction of single draws with the reference better (what the trainer flips),
- ``flip_mean``: the fraction of winners whose mean over the draws says the reference is better,
- ``agreement``: how often one draw's sign equals the sign of its winner's mean,
- ``snr``: the median over winners of |mean Δ| / std Δ, Δ = err_θ − err_ref per draw
  (one draw decides correctly with probability about Φ(snr) when Δ is near normal).

An ``agreement`` near ½ means the flipper's decisions are mostly the draw's noise, not which model
is better. Prints JSON (also to ``--out``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np


def criterion_stats(delta: np.ndarray) -> dict:
    """``delta``: (winners, draws) of err_θ − err_ref. The flipper's single-draw and mean decisions."""
    if delta.ndim != 2 or delta.shape[1] < 1:
        raise ValueError(f"delta must be (winners, draws), got shape {delta.shape}")
    mean = delta.mean(axis=1)
    std = delta.std(axis=1)
    single_ref_better = delta > 0  # err_θ > err_ref: the reference explains the winner better, s = −1
    mean_ref_better = mean > 0
    agree = single_ref_better == mean_ref_better[:, None]
    snr = np.where(std > 0, np.abs(mean) / np.where(std > 0, std, 1.0), np.inf)
    return {"flip_single": float(single_ref_better.mean()), "flip_mean": float(mean_ref_better.mean()),
            "agreement": float(agree.mean()), "snr_median": float(np.median(snr)),
            "mean_delta": float(mean.mean()), "std_delta_median": float(np.median(std)),
            "winners": int(delta.shape[0]), "draws": int(delta.shape[1])}


def measure(run: Path, pairs: int, draws: int, ref: int, batch: int, seed: int) -> np.ndarray:
    """(pairs, draws) of err_θ − err_ref on the run's winners at its final checkpoint."""
    import torch

    from diffalign.config import load_config
    from diffalign.training.preference import PreferenceConfig, PreferenceTrainer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        work.mkdir()
        shutil.copy(run / "config.yaml", work / "config.yaml")
        shutil.copytree(run / "checkpoints", work / "checkpoints", symlinks=True)
        cfg = load_config(PreferenceConfig, str(work / "config.yaml"), [])
        trainer = PreferenceTrainer(cfg, work, resume=True)
        try:
            if not 0 <= ref < len(trainer.pool):
                raise SystemExit(f"error: --ref {ref} is not in the run's pool {trainer.pool.entries}")
            policy = trainer.policy
            policy.eval()
            n = min(pairs, len(trainer.data))
            gen = torch.Generator().manual_seed(seed)
            out = np.zeros((n, draws))
            with torch.no_grad():
                for start in range(0, n, batch):
                    idx = torch.arange(start, min(start + batch, n))
                    data = trainer.data.batch(idx)
                    b = len(idx)
                    x_w = policy.encode_images(data.winners)
                    cond = policy.encode(data.prompts)
                    for d in range(draws):
                        sigma = (torch.sigmoid(torch.randn(b, generator=gen)) if cfg.timesteps == "logit_normal"
                                 else torch.rand(b, generator=gen))
                        eps = torch.randn((b, *policy.latent_shape(*data.winners.shape[-2:])), generator=gen)
                        (err,), (ref_err,) = trainer._errors([x_w], cond, sigma, eps, trainer.pool.context(policy, ref))
                        out[start : start + b, d] = (err - ref_err).float().cpu().numpy()
        finally:
            trainer.run.unlock()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a finished preference run directory (config.yaml, checkpoints/)")
    ap.add_argument("--pairs", type=int, default=256, help="winners of the run's dataset (the first N)")
    ap.add_argument("--draws", type=int, default=32, help="(σ, ε) draws per winner")
    ap.add_argument("--ref", type=int, default=0, help="reference pool entry (0: the base model)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.draws < 1 or args.batch < 1:
        ap.error("--pairs, --draws and --batch must be >= 1")
    if not (args.run / "config.yaml").is_file() or not (args.run / "checkpoints").is_dir():
        raise SystemExit(f"error: {args.run} is not a preference run directory with config.yaml and checkpoints/")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    from _json_out import emit_json

    delta = measure(args.run, args.pairs, args.draws, args.ref, args.batch, args.seed)
    result = {"run": str(args.run), "ref": args.ref, **criterion_stats(delta)}
    return emit_json(result, args.out)


if __name__ == "__main__":
    main()
