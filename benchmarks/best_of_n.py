"""Can the model represent the improvement? Online best-of-N fine-tuning on a few fixed prompts.

Rung 2 of the RL-learning diagnosis (docs/results.md). Each iteration samples ``--group``
images per prompt with the current policy (the preset's rollout sampler, fresh noise), keeps
those the verifier passes (strict score 1), and takes ``--steps-per-iter`` flow-matching
steps on them (the online form of ``sft``): ``σ ~ U(--sigma-min, 1)``, ``ε ~ N(0, I)``,
``L = mean ‖v_θ(x_σ) − (ε − x0)‖²``. ``--sigma-min 0`` is plain online SFT; a higher value
leaves out the low noise levels, where the model's own samples differ most from its
training data (their residual pixel noise and edge artifacts, ../shared/FINDINGS.md).
``--snap`` trains on the passing samples with every pixel set to its nearest palette colour
(the layout the verifier passed, without the pixel noise). ``--renders`` is the ceiling
control: the same loop on fresh renderer images of the prompts (the pretraining data, all
kept), i.e. how fast the model learns these prompts from perfect samples; ``--renders-for-kept``
keeps the best-of-N batches (same count, same prompts) but trains on a fresh render of each
passing sample's prompt, separating what the samples contain from how many there are.
``--dpo-beta B`` replaces the fit by a Diffusion-DPO step (β = B) on pairs of a passing and a
failing sample of the same prompt, against the reference: an anchor on the same samples.
``--replay N`` adds N renders of *other* training prompts to every step (data replay: the
pretraining loss beside the fit, an anchor to the training distribution that tells nothing
about the run's own prompts); ``--replay-only`` is its control, the replay alone.
Every ``--every`` iterations it judges ``--images`` fresh images per prompt with the standard
evaluation sampler (Euler ODE, 20 steps, CFG ``--eval-cfg``; the same seeds each time).

``--train-prompts N`` replaces the fixed file by the whole training split: every iteration
draws N prompts task-balanced, as training does (``--group`` images each). With
``--eval-split test`` the evaluation is ``--images`` task-balanced images of that split (the
test-score target's prompts) instead of images per fixed prompt. ``--renders --train-prompts
16 --eval-split test`` is then the test target's ceiling: how far perfect samples of the
training prompts move the test score at the preset's LoRA, in ``--minutes`` of training.

    python benchmarks/best_of_n.py --prompts fixed4.txt --iters 30 --sigma-min 0.5
    python benchmarks/best_of_n.py --prompts fixed4.txt --iters 40 --lr 1e-3 --renders --eval-cfg 1 \
        --set rollout.guidance_scale=1
    python benchmarks/best_of_n.py --train-prompts 16 --group 4 --renders --eval-split test --images 512 \
        --iters 100000 --minutes 60 --every 100 --lr 1e-3

Prints a line per evaluation and JSON (``--json`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import time

import torch
from _json_out import emit_json, merge_summary, score_curve_summary


def evaluate_fixed(policy, prompts: list[str], images: int, *, steps: int = 20, cfg: float = 4.5,
                   seed: int = 10_000) -> dict:
    """Strict / partial score of ``images`` ODE samples per prompt (seeds ``seed…``), and per prompt."""
    from diffalign.sampling.generate import generate
    from diffalign.world.verify import verify_batch

    batch = [p for p in prompts for _ in range(images)]
    verdicts = verify_batch(generate(policy, batch, [seed + i % images for i in range(len(batch))],
                                     steps=steps, cfg=cfg), batch)
    per = [sum(v.score for v in verdicts[i * images:(i + 1) * images]) / images for i in range(len(prompts))]
    return {"score": sum(per) / len(per), "partial": sum(v.partial for v in verdicts) / len(verdicts),
            "per_prompt_score": per}


def evaluate_split(policy, split: str, images: int, *, cfg: float = 4.5) -> dict:
    """Strict / partial score (overall and per task) of ``images`` task-balanced images of ``split``,
    fixed prompts and seeds (:func:`~diffalign.evaluation.quick.evaluate_policy`)."""
    from diffalign.evaluation.quick import evaluate_policy

    res = evaluate_policy(policy, split, images, steps=20, guidance_scale=cfg)[0]
    return {k: v for k, v in res.items() if not k.startswith("lowlevel/")}


def iteration_prompts(args, cfg, prompts: list[str] | None, it: int) -> list[str]:
    """Iteration ``it``'s batch: each fixed prompt ``--group`` times, or ``--train-prompts`` fresh
    task-balanced training prompts ``--group`` times each (seeded by ``--seed`` and ``it``)."""
    if prompts is not None:
        return [p for p in prompts for _ in range(args.group)]
    from dataclasses import replace

    from diffalign.training.trainer import sample_prompts_with_tasks

    draw = replace(cfg, prompts_per_epoch=args.train_prompts, group_size=args.group, seed=args.seed)
    return sample_prompts_with_tasks(draw, it)[0]


def training_data(args) -> str:
    """What the run trains on, in words (for the summary)."""
    if args.renders:
        return "renders"
    if args.renders_for_kept:
        return "renders in place of the passing samples"
    if args.dpo_beta > 0:
        return f"Diffusion-DPO on own (passing, failing) pairs, beta {args.dpo_beta:g}"
    own = "own passing samples, snapped" if args.snap else "own passing samples"
    if args.replay:
        return f"{args.replay} replay renders per step" + ("" if args.replay_only else f" + {own}")
    return own


def dpo_pairs(prompts: list[str], passed: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(winners, losers)``: each passing sample paired with a random failing sample of
    the same prompt (prompts with no failing sample give no pair)."""
    wins, losses = [], []
    for p in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
        w, lo = idx[passed[idx]], idx[~passed[idx]]
        if len(w) and len(lo):
            wins.append(w)
            losses.append(lo[torch.randint(len(lo), (len(w),), generator=generator)])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(wins), torch.cat(losses)) if wins else (empty, empty)


def _draw_noise(x0: torch.Tensor, sigma_min: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``σ ~ U(sigma_min, 1)`` per sample and ``ε ~ N(0, I)`` shaped like ``x0``."""
    sigma = sigma_min + (1 - sigma_min) * torch.rand(len(x0), generator=generator)
    return sigma, torch.randn(x0.shape, generator=generator)


def _optimizer_step(optimizer, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1, step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return float(loss.detach())


def dpo_step(policy, optimizer, x_w: torch.Tensor, x_l: torch.Tensor, prompts: list[str], *, beta: float,
             sigma_min: float, generator: torch.Generator) -> float:
    """One Diffusion-DPO step on own samples: winner and loser re-noised with the same ``(σ, ε)``,
    flow-matching errors of the policy and of the reference (adapters off); the loss is
    :func:`~diffalign.algorithms.diffusion_dpo_loss`. Relative to the reference on the same
    sample, so what winners and losers share (the sampler's own artifacts) cancels."""
    from diffalign.algorithms import diffusion_dpo_loss, flow_matching_error, forward_noising

    n = len(x_w)
    sigma, eps = _draw_noise(x_w, sigma_min, generator)
    x_t, target = forward_noising(torch.cat([x_w, x_l]), sigma.repeat(2), torch.cat([eps, eps]))
    sig2, cond = sigma.repeat(2), policy.encode(prompts + prompts)
    err = flow_matching_error(policy.predict(x_t, sig2, cond), target)
    with torch.no_grad(), policy.reference():
        ref = flow_matching_error(policy.predict(x_t, sig2, cond), target)
    loss, _ = diffusion_dpo_loss(err[:n], ref[:n], err[n:], ref[n:], beta)
    return _optimizer_step(optimizer, loss)


def best_of_n_step(policy, optimizer, x0: torch.Tensor, prompts: list[str], *, sigma_min: float,
                   generator: torch.Generator) -> float:
    """One flow-matching step on clean samples ``x0`` with ``σ ~ U(sigma_min, 1)``; returns the loss."""
    from diffalign.algorithms import forward_noising

    sigma, eps = _draw_noise(x0, sigma_min, generator)
    x_t, target = forward_noising(x0, sigma, eps)
    return _optimizer_step(optimizer, (policy.predict(x_t, sigma, policy.encode(prompts)) - target).pow(2).mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flow_grpo", help="the policy (LoRA rank) and rollout sampler come from it")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompts", help="text file, one prompt per line")
    which.add_argument("--train-prompts", type=int, default=0, metavar="N",
                       help="instead of a file: N training-split prompts per iteration, task-balanced as training "
                            "draws them")
    ap.add_argument("--eval-split", choices=["train", "test", "ood"], default=None,
                    help="evaluate on --images task-balanced images of this split (default: --images per fixed "
                         "prompt)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="> 0: stop (and evaluate) once training has taken this many minutes")
    ap.add_argument("--group", type=int, default=16, help="rollout images per prompt per iteration")
    ap.add_argument("--steps-per-iter", type=int, default=2)
    ap.add_argument("--sigma-min", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--images", type=int, default=32,
                    help="evaluation images per prompt (with --eval-split: in all)")
    ap.add_argument("--eval-cfg", type=float, default=4.5, help="CFG weight of the evaluation sampler")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    data = ap.add_mutually_exclusive_group()  # what the kept images are replaced by (default: nothing)
    data.add_argument("--snap", action="store_true",
                      help="train on the passing samples snapped to the nearest palette colour (no pixel noise)")
    data.add_argument("--renders-for-kept", action="store_true",
                      help="control: sample and judge as usual, but train on a fresh render of each passing "
                           "sample's prompt instead of the sample (same batch size and prompt mix as best-of-N)")
    data.add_argument("--renders", action="store_true",
                      help="control: train on fresh renderer images of the prompts instead of own passing samples")
    ap.add_argument("--dpo-beta", type=float, default=0.0,
                    help="> 0: instead of fitting the passing samples, a Diffusion-DPO step with this beta on "
                         "pairs (a passing sample, a failing one of the same prompt) against the reference")
    ap.add_argument("--replay", type=int, default=0,
                    help="data replay: add this many renders of other training prompts (not the run's) to every "
                         "step's batch, the pretraining loss beside the fit")
    ap.add_argument("--replay-only", action="store_true",
                    help="control for --replay: train on the replay renders alone (no own samples)")
    ap.add_argument("--grid", default=None, help="save a grid of the final evaluation's first 8 images per prompt")
    ap.add_argument("--json", default=None)
    ap.add_argument("--summary", default=None, help="summary JSON to update (e.g. docs/results/learning.json)")
    ap.add_argument("--summary-key", default="best_of_n", help="key (a/b nests) of this run in --summary")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    if args.replay_only and not args.replay:
        ap.error("--replay-only needs --replay N (the number of replay renders per step)")
    if args.train_prompts < 0 or (args.train_prompts == 0 and not args.prompts):
        ap.error("--train-prompts must be >= 1 (prompts per iteration)")
    if args.train_prompts and args.eval_split is None:
        ap.error("--train-prompts draws new prompts every iteration; name the evaluation's prompts with "
                 "--eval-split test (or train, ood)")
    if args.train_prompts and args.replay:
        ap.error("--replay adds renders of the training prompts the run does not use; with --train-prompts "
                 "it uses them all")
    if args.dpo_beta > 0 and (args.snap or args.renders or args.renders_for_kept or args.replay):
        ap.error("--dpo-beta pairs own passing and failing samples; it does not combine with --snap, --renders* "
                 "or --replay")

    from diffalign.cli import resolve_preset
    from diffalign.config import load_config
    from diffalign.models.factory import build_policy
    from diffalign.runtime import keep_freed_memory
    from diffalign.sampling.clean import sample_clean
    from diffalign.training.prompts import read_prompt_file
    from diffalign.training.trainer import TrainConfig
    from diffalign.world.grammar import prompt_splits
    from diffalign.world.render import render_batch
    from diffalign.world.verify import snap_to_palette, verify_batch

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(TrainConfig, resolve_preset(args.preset), args.set)
    policy = build_policy(cfg.model_family, cfg.model, image_size=cfg.image_size, lora_rank=cfg.lora_rank,
                          lora_alpha=cfg.lora_alpha, options=cfg.model_options)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    others = [p for task in prompt_splits()["train"].values() for p in task if p not in prompts] if args.replay else []
    gen = torch.Generator().manual_seed(args.seed)
    rows, images, kept_total, t_train, steps_taken = [], 0, 0, 0.0, 0

    def evaluate(it: int, pass_rate: float | None) -> None:
        policy.eval()
        row = {"iter": it, "rollout_images": images, "kept_images": kept_total, "optimizer_steps": steps_taken,
               "train_s": round(t_train, 1),
               "rollout_pass_rate": pass_rate}
        if args.eval_split:
            row |= evaluate_split(policy, args.eval_split, args.images, cfg=args.eval_cfg)
            detail = "  per task " + " ".join(f"{k[6:]} {v:.2f}" for k, v in row.items() if k.startswith("score/"))
        else:
            row |= evaluate_fixed(policy, prompts, args.images, cfg=args.eval_cfg)
            detail = "  per prompt " + " ".join(f"{x:.2f}" for x in row["per_prompt_score"])
        rows.append(row)
        print(f"iter {it:3d}  images {images:5d}  kept {kept_total:5d}  min {t_train / 60:5.1f}  score "
              f"{row['score']:.3f}  partial {row['partial']:.3f}" + detail, flush=True)

    evaluate(0, None)
    for it in range(1, args.iters + 1):
        t0 = time.perf_counter()
        batch = iteration_prompts(args, cfg, prompts, it)
        gids = torch.arange(len(batch) // args.group).repeat_interleave(args.group)
        policy.eval()
        if args.renders:
            seeds = [it * len(batch) + i for i in range(len(batch))]
            latents = policy.encode_images(render_batch(batch, seeds, policy.image_size))
            passed = torch.ones(len(batch), dtype=torch.bool)
        else:
            samples = sample_clean(policy, batch, gids, cfg.rollout, generator=gen)
            latents = samples.latents
            passed = torch.tensor([v.score == 1.0 for v in verify_batch(samples.images, batch)])
        if args.replay_only:  # nothing of the rollout is trained on
            passed = torch.zeros_like(passed)
        images += len(batch)
        kept_total += int(passed.sum())
        if passed.any() or args.replay:
            policy.train()
            x0, kept = latents[passed], [p for p, ok in zip(batch, passed.tolist(), strict=True) if ok]
            if args.snap:
                x0 = policy.encode_images(snap_to_palette(policy.decode(x0)))
            if args.renders_for_kept:
                seeds = [it * len(batch) + i for i in range(len(kept))]
                x0 = policy.encode_images(render_batch(kept, seeds, policy.image_size))
            if args.replay:
                pick = torch.randint(len(others), (args.replay,), generator=gen).tolist()
                extra = [others[i] for i in pick]
                seeds = [10**6 + it * args.replay + i for i in range(args.replay)]
                x0 = torch.cat([x0, policy.encode_images(render_batch(extra, seeds, policy.image_size))])
                kept = kept + extra
            for _ in range(args.steps_per_iter):
                if args.dpo_beta > 0:
                    w, lo = dpo_pairs(batch, passed, gen)
                    if len(w):
                        dpo_step(policy, optimizer, latents[w], latents[lo], [batch[i] for i in w.tolist()],
                                 beta=args.dpo_beta, sigma_min=args.sigma_min, generator=gen)
                        steps_taken += 1
                else:
                    best_of_n_step(policy, optimizer, x0, kept, sigma_min=args.sigma_min, generator=gen)
                    steps_taken += 1
        t_train += time.perf_counter() - t0
        out_of_time = args.minutes > 0 and t_train >= args.minutes * 60
        if it % args.every == 0 or it == args.iters or out_of_time:
            evaluate(it, float(passed.float().mean()))
        if out_of_time:
            break
    if args.grid and prompts:
        from diffalign.evaluation.grid import save_grid
        from diffalign.sampling.generate import generate

        policy.eval()
        shown = [p for p in prompts for _ in range(8)]
        save_grid(generate(policy, shown, [10_000 + i % 8 for i in range(len(shown))], cfg=args.eval_cfg), args.grid)
    out = {"preset": args.preset, "overrides": args.set,
           "prompts": prompts if prompts else f"{args.train_prompts} training prompts per iteration",
           "eval_split": args.eval_split, "minutes": args.minutes, "sigma_min": args.sigma_min,
           "lr": args.lr, "eval_cfg": args.eval_cfg, "renders": args.renders, "snap": args.snap,
           "renders_for_kept": args.renders_for_kept, "dpo_beta": args.dpo_beta, "replay": args.replay,
           "replay_only": args.replay_only, "group": args.group,
           "steps_per_iter": args.steps_per_iter, "eval_images": args.images,
           "evaluations": rows}
    if args.summary:
        merge_summary(args.summary, args.summary_key, {
            "data": training_data(args),
            "sigma_min": args.sigma_min, "lr": args.lr, "eval_cfg": args.eval_cfg, "overrides": args.set,
            **score_curve_summary(rows), "kept_images": rows[-1]["kept_images"],
            **({"eval_split": args.eval_split, "eval_images": args.images} if args.eval_split
               else {"eval_images_per_prompt": args.images})})
    return emit_json(out, args.json)


if __name__ == "__main__":
    main()
