"""Signal-to-noise of the policy-gradient estimate: how much of one epoch's gradient is signal.

For a preset (default ``flow_grpo``) at its starting policy, draws ``--batches`` independent
epochs through the trainer's own first three phases (``Trainer.epoch_prompts`` →
``rollout_and_score`` → ``epoch_advantages``; batch ``k`` draws its prompts as epoch
``1000 + k``, its rollout from seed ``10000 + k``) and computes the gradient of the preset's
update loss on each with the algorithm's update and a zero-learning-rate optimizer, so nothing
steps (one minibatch holding the whole epoch). With ``g_k = μ + n_k`` (``μ`` the true gradient, ``n_k``
zero-mean noise, independent across batches):

- ``E[g_i·g_j] = |μ|²`` for ``i ≠ j`` and ``E[|g_i|²] = |μ|² + E|n|²``, so the **signal
  fraction** ``ρ = mean_{i≠j} g_i·g_j / mean_i |g_i|²`` is the share of one epoch's squared
  gradient norm that points along the true gradient (1 = noise-free, 0 = pure noise);
- the noise falls as 1 / batch size, so about ``(1 − ρ)/ρ`` times the epoch's images would be
  needed per step for signal and noise to be equal;
- the same per coordinate of the trainable parameters (Adam normalises each coordinate):
  the median over coordinates of ``mean(g)² / var(g)`` across the batches.

    python benchmarks/grad_snr.py --preset flow_grpo --batches 4 --threads 2

Prints JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time

import torch


def gradients(preset: str, batches: int, overrides: list[str], threads: int) -> dict:
    """One flattened update gradient per independent epoch at the starting policy, and their statistics."""
    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(threads)
    path = resolve_preset(preset)
    probe = load_config(TrainConfig, path, overrides)
    images = probe.prompts_per_epoch * probe.group_size
    cfg = load_config(TrainConfig, path, [*overrides, f"grpo.minibatch_size={images}", "grpo.micro_batch_size=0",
                                          "grpo.inner_epochs=1", "grpo.max_grad_norm=1e30", "eval.every=0",
                                          f"threads={threads}"])
    grads, rewards, zero_signal = [], [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, f"{tmp}/run")
        policy = trainer.policy
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        for k in range(batches):
            gen = torch.Generator().manual_seed(10_000 + k)
            ep = trainer.epoch_prompts(1000 + k)  # the curriculum (if any) never updates here: uniform tasks
            batch = trainer.rollout_and_score(k, ep.prompts, ep.group_ids, gen)  # DGR granularity of epoch k
            adv, metrics = trainer.epoch_advantages(batch, ep.prompts, ep.group_ids)
            reward = batch.rewards
            policy.train()
            frozen = torch.optim.SGD(params, lr=0.0)  # the update's gradient, no step (not Trainer.update_policy)
            trainer.algo.update(policy, frozen, batch.traj, adv, gen)
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                                    for p in params]))
            rewards.append(float(reward.mean()))
            zero_signal.append(float(metrics["zero_signal_groups"]))
            print(f"batch {k + 1}/{batches}: reward {rewards[-1]:.3f}, |g| {float(grads[-1].norm()):.3e} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return {"preset": preset, "batches": batches, "images_per_batch": images, "overrides": overrides,
            **signal_stats(torch.stack(grads), images), "mean_reward": rewards, "zero_signal_groups": zero_signal,
            "seconds": time.perf_counter() - t0}


def signal_stats(g: torch.Tensor, images: int) -> dict:
    """The statistics of the module docstring from ``g``: one flattened gradient per row."""
    k = g.shape[0]
    pairs = list(itertools.combinations(range(k), 2))
    cross = [float(g[i] @ g[j]) for i, j in pairs]
    sq = [float(x @ x) for x in g]
    rho = (sum(cross) / len(cross)) / (sum(sq) / len(sq))
    # a batch whose every group has equal rewards has no gradient: no cosine for its pairs
    cos = [c / (sq[i] * sq[j]) ** 0.5 for c, (i, j) in zip(cross, pairs, strict=True) if sq[i] > 0 and sq[j] > 0]
    live = g.abs().sum(0) > 0  # coordinates with a gradient (LoRA's A factors start with none)
    mean, var = g[:, live].mean(0), g[:, live].var(0)
    coord = (mean**2 / var.clamp_min(1e-300)).median()
    return {"signal_fraction": rho, "batch_for_equal_signal_and_noise": images * (1 - rho) / rho if rho > 0 else None,
            "pairwise_cosine": cos, "grad_norms": [x**0.5 for x in sq], "median_coordinate_snr": float(coord),
            "live_coordinates": int(live.sum()), "coordinates": int(g.shape[1])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flow_grpo")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = ap.parse_args(argv)
    if args.batches < 2:
        ap.error("--batches must be at least 2 (the signal is estimated from pairs of batches)")
    out = gradients(args.preset, args.batches, args.set, args.threads)
    print(json.dumps(out, indent=1))
    ratio = out["batch_for_equal_signal_and_noise"]
    print(f"\n{out['preset']}: {out['batches']} independent epochs of {out['images_per_batch']} images at the "
          "starting policy\n", file=sys.stderr)
    print("| signal fraction ρ | pairwise cosine (mean) | images/step for signal = noise | median coordinate SNR |",
          file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    cos = out["pairwise_cosine"]
    print(f"| {out['signal_fraction']:.3f} | {sum(cos) / len(cos) if cos else float('nan'):.3f} | "
          f"{'∞' if ratio is None else f'{ratio:,.0f}'} | {out['median_coordinate_snr']:.3f} |", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
