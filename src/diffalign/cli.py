"""Command line: ``diffalign pretrain | sample | ...``.

User errors (:class:`~diffalign.errors.DiffalignError`) print one line ``error: ...`` and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from diffalign.errors import DiffalignError


def _cmd_pretrain(args) -> int:
    import torch

    from diffalign.config import load_config
    from diffalign.training.pretrain import PretrainConfig, pretrain

    saved = Path(args.out) / "config.json"
    if args.resume and not saved.exists():
        raise DiffalignError(f"--resume: {args.out} is not a pretraining run directory (no config.json)")
    # config.json is valid YAML: a resumed run starts from its saved settings
    cfg = load_config(PretrainConfig, saved if args.resume else None, args.overrides)
    print(f"pretraining into {args.out} (torch threads: {torch.get_num_threads()})")
    final = pretrain(cfg, args.out, resume=args.resume)
    print(f"done: {final}")
    return 0


def _cmd_sample(args) -> int:
    from diffalign.evaluation.grid import save_grid
    from diffalign.models.tiny import TinyFlowPolicy
    from diffalign.sampling.generate import generate
    from diffalign.world.grammar import parse_prompt
    from diffalign.world.verify import verify_batch

    if args.n <= 0:
        raise DiffalignError(f"-n must be at least 1, got {args.n}")
    if args.steps <= 0:
        raise DiffalignError(f"--steps must be at least 1, got {args.steps}")
    prompts = args.prompt or []
    for p in prompts:
        parse_prompt(p)  # fail early, with the grammar's message
    if not prompts:
        raise DiffalignError("give at least one --prompt, e.g. --prompt 'a red circle'")
    policy = TinyFlowPolicy.from_checkpoint(args.checkpoint)
    if args.size is not None and args.size != policy.image_size:
        raise DiffalignError(
            f"--size {args.size} is out of range for this checkpoint, which generates {policy.image_size}×"
            f"{policy.image_size} images"
        )
    all_prompts = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    t0 = time.perf_counter()
    images = generate(policy, all_prompts, seeds, steps=args.steps, cfg=args.cfg, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    verdicts = verify_batch(images, all_prompts)
    out = save_grid(images, args.out, ncol=min(8, len(images)), marks=[v.score == 1.0 for v in verdicts],
                    captions=[("ok " if v.score == 1 else "x ") + ", ".join(f"{d.color[:3]} {d.shape[:3]}"
                                                                          for d in v.detections) for v in verdicts])
    for i, (p, v) in enumerate(zip(all_prompts, verdicts, strict=True)):
        print(f"[{i:3d}] {p!r}: {v.summary()}")
    score = sum(v.score for v in verdicts) / len(verdicts)
    print(f"verifier score {score:.3f} over {len(verdicts)} images; {len(images) / dt:.2f} images/s "
          f"({args.steps} steps, CFG {args.cfg}); grid: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "images_per_s": len(images) / dt, "score": score,
            "verdicts": [{"prompt": p, "score": v.score, "partial": v.partial, "constraints": v.constraints}
                         for p, v in zip(all_prompts, verdicts, strict=True)],
        }, indent=2))
    return 0


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_preset(name: str) -> Path:
    """A preset path, or a name such as ``flow_grpo`` / ``shapes/flow_grpo`` looked up in configs/."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / "shapes" / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = sorted(str(q.relative_to(CONFIG_DIR)) for q in CONFIG_DIR.rglob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise DiffalignError(f"preset {name!r} not found; give a YAML path or one of: {', '.join(known)}")


def _cmd_train(args) -> int:
    from diffalign.config import load_config
    from diffalign.training.registry import train_classes
    from diffalign.training.rundir import RunDir

    presets = [i for i in args.items if "=" not in i]
    args.overrides = [i for i in args.items if "=" in i]
    if len(presets) > 1:
        raise DiffalignError(f"give one preset, got {presets}")
    args.preset = presets[0] if presets else None
    if args.resume and args.preset:
        raise DiffalignError("--resume continues a run with its saved config; do not also give a preset")
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").exists():
            raise DiffalignError(f"--resume {run}: not a run directory (no config.yaml)")
        RunDir(run).require_checkpoint()  # a run that never checkpointed: say how to restart it
        config_cls, trainer_cls = train_classes(run / "config.yaml", args.overrides)
        cfg = load_config(config_cls, run / "config.yaml", args.overrides)
        trainer = trainer_cls(cfg, run, resume=True)
    else:
        if not args.preset:
            raise DiffalignError("give a preset, e.g. 'diffalign train flow_grpo', or --resume RUN_DIR")
        preset = resolve_preset(args.preset)
        config_cls, trainer_cls = train_classes(preset, args.overrides)
        cfg = load_config(config_cls, preset, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / f"{preset.stem}-seed{cfg.seed}"
        trainer = trainer_cls(cfg, out)
    world = getattr(trainer, "world", None)
    main = world is None or world.is_main  # multi-process: rank 0 alone reports
    if main:
        print(f"run directory: {trainer.run.path}")
    summary = trainer.train()
    if main:
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from diffalign.evaluation.report import evaluate

    if args.num_images <= 0 or args.steps <= 0:
        raise DiffalignError("--num-images and --steps must be positive")
    target = None if args.target in (None, "base") else args.target
    if target is not None and not Path(target).exists():
        raise DiffalignError(f"{target}: no such checkpoint file or run directory")
    rep = evaluate(target, args.out, num_images=args.num_images, steps=args.steps, guidance_scale=args.cfg,
                   splits=tuple(args.splits.split(",")), images_per_prompt=args.images_per_prompt,
                   prompt_seed=args.prompt_seed, image_seed=args.image_seed, use_proxy=not args.no_proxy,
                   tasks=tuple(args.tasks.split(",")) if args.tasks else None)
    print((Path(args.out) / "eval.md").read_text())
    print(f"wrote {args.out}/eval.json, eval.md and grids ({rep['model']})")
    return 0


def _cmd_data_proxy_pairs(args) -> int:
    from diffalign.config import load_config
    from diffalign.training.proxy import ProxyPairsConfig, build_proxy_pairs, describe_pairs, save_pairs

    cfg = load_config(ProxyPairsConfig, None, args.overrides)
    data = build_proxy_pairs(cfg, progress=print)
    save_pairs(data, args.out)
    print(json.dumps(describe_pairs(data), indent=2))
    print(f"wrote {args.out}")
    return 0


def _cmd_proxy_train(args) -> int:
    from diffalign.config import load_config
    from diffalign.training.proxy import ProxyTrainConfig, load_pairs, save_trained, train_proxy

    cfg = load_config(ProxyTrainConfig, None, args.overrides)
    train = load_pairs(args.train)
    heldout = load_pairs(args.heldout) if args.heldout else None
    model, report = train_proxy(cfg, train, heldout, progress=print)
    out = save_trained(model, report, args.out, heldout)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    if "heldout" in report:
        print(json.dumps(report["heldout"], indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_proxy_eval(args) -> int:
    from diffalign.rewards.shapes_score import load_shapes_score
    from diffalign.training.proxy import load_pairs, pair_report

    if args.record:
        from diffalign.training.proxy import record_heldout

        if not (args.pairs and args.checkpoint):
            raise DiffalignError("--record needs a pair file and --checkpoint (the file whose metadata is updated)")
        print(json.dumps(record_heldout(args.checkpoint, load_pairs(args.pairs)), indent=2))
        print(f"recorded the held-out figures in {args.checkpoint}")
        return 0
    model, _ = load_shapes_score(args.checkpoint)
    report = {"pairs": pair_report(model, load_pairs(args.pairs)) if args.pairs else None}
    if args.probe:
        from diffalign.training.proxy import probe_blind_spots

        report["blind_spots"] = {split: probe_blind_spots(model, split=split) for split in ("test", "ood")}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _cmd_reward_server(args) -> int:
    from diffalign.rewards import available_rewards, build_reward
    from diffalign.rewards.server import ServerConfig, serve

    try:
        kwargs = json.loads(args.reward_kwargs)
    except ValueError as e:
        raise DiffalignError(f"--reward-kwargs must be a JSON object, e.g. '{{\"mode\": \"score\"}}' ({e})") from e
    if not isinstance(kwargs, dict):
        raise DiffalignError(f"--reward-kwargs must be a JSON object, got {args.reward_kwargs!r}")
    if args.reward == "remote":
        raise DiffalignError("a reward server cannot serve the remote client; choose one of: "
                             + ", ".join(r for r in available_rewards() if r != "remote"))
    cfg = ServerConfig(max_batch_images=args.max_batch_images, batch_wait_ms=args.batch_wait_ms,
                       max_request_mb=args.max_request_mb, max_images_per_request=args.max_images_per_request,
                       request_timeout_s=args.timeout_s)
    reward = build_reward(args.reward, **kwargs)  # load the model before accepting requests
    print(f"serving reward {getattr(reward, 'name', args.reward)!r} on http://{args.host}:{args.port} "
          f"(POST /score, GET /health)", flush=True)
    serve(reward, args.host, args.port, cfg, log_level=args.log_level)
    return 0


def _cmd_compare(args) -> int:
    import warnings

    from diffalign.evaluation.compare import MixedConfigWarning, compare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MixedConfigWarning)
        res = compare(args.runs, args.out, target=args.target, eval_images=args.eval_images,
                      eval_images_per_prompt=args.images_per_prompt)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print((Path(args.out) / "compare.md").read_text())
    print(f"wrote {args.out}/compare.html, compare.md, curves.png, bars.png ({len(res['runs'])} runs, "
          f"{len(res['groups'])} groups)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``diffalign`` parser: one subcommand per ``_add_*_parser`` below, in help order."""
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_pretrain_parser, _add_train_parser, _add_eval_parser, _add_compare_parser, _add_sample_parser,
                _add_proxy_parser, _add_reward_server_parser, _add_data_parser):
        add(sub)
    return parser


def _add_pretrain_parser(sub) -> None:
    """``diffalign pretrain``."""
    p = sub.add_parser("pretrain", help="pretrain the ShapesWorld base model from scratch")
    p.add_argument("--out", required=True, help="run directory (checkpoints, samples, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. steps=2000 batch_size=64")
    p.set_defaults(func=_cmd_pretrain)


def _add_train_parser(sub) -> None:
    """``diffalign train``."""
    p = sub.add_parser("train", help="RL fine-tuning from a preset (configs/shapes/*.yaml)")
    p.add_argument("items", nargs="*", metavar="PRESET [key=value ...]",
                   help="preset name or YAML path (e.g. flow_grpo), then key=value overrides "
                        "(e.g. epochs=10 grpo.clip_range=1e-3)")
    p.add_argument("--out", default=None, help="run directory (default runs/<preset>-seed<seed>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run exactly")
    p.set_defaults(func=_cmd_train)


def _add_eval_parser(sub) -> None:
    """``diffalign eval``."""
    p = sub.add_parser("eval", help="evaluate a checkpoint or run on test and out-of-domain prompts")
    p.add_argument("target", nargs="?", default="base", help="checkpoint file, run directory, a run's checkpoints/step_N directory, or 'base'")
    p.add_argument("--out", default="eval", help="output directory for eval.json, eval.md and grids")
    p.add_argument("--num-images", type=int, default=512, help="images per split")
    p.add_argument("--steps", type=int, default=20, help="Euler ODE steps")
    p.add_argument("--cfg", type=float, default=4.5, help="CFG scale")
    p.add_argument("--splits", default="test,ood", help="comma-separated prompt splits")
    p.add_argument("--images-per-prompt", type=int, default=1,
                   help="images per prompt (≥ 2 measures diversity within a prompt; must divide --num-images)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the task-balanced prompt draw")
    p.add_argument("--image-seed", type=int, default=0, help="image i uses seed image_seed + i")
    p.add_argument("--no-proxy", action="store_true", help="skip the ShapesScore proxy reward")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task types to evaluate (e.g. position,color_attr; default: all six)")
    p.set_defaults(func=_cmd_eval)


def _add_compare_parser(sub) -> None:
    """``diffalign compare``."""
    p = sub.add_parser("compare", help="one table and plots across training runs (HTML, PNG, markdown)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories")
    p.add_argument("--out", default="compare", help="output directory (compare.html, compare.md, *.png)")
    p.add_argument("--target", type=float, default=None, help="eval score target: report steps/minutes to reach it")
    p.add_argument("--eval-images", type=int, default=0,
                   help="evaluate runs lacking RUN/eval/eval.json first, with this many images per split")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt of that evaluation")
    p.set_defaults(func=_cmd_compare)


def _add_sample_parser(sub) -> None:
    """``diffalign sample``."""
    p = sub.add_parser("sample", help="generate images with the Euler ODE sampler and verify them")
    p.add_argument("--prompt", action="append", help="a ShapesWorld prompt (repeatable)")
    p.add_argument("-n", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="first seed (image i uses seed+i)")
    p.add_argument("--size", type=int, default=None, help="image size (must match the checkpoint)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    p.add_argument("--checkpoint", default=None, help="tiny-model checkpoint (default: the shipped base)")
    p.add_argument("--out", default="grid.png", help="where to write the image grid")
    p.add_argument("--json", default=None, help="also write verdicts and speed as JSON here")
    p.set_defaults(func=_cmd_sample)


def _add_proxy_parser(sub) -> None:
    """``diffalign proxy train | eval``."""
    p = sub.add_parser("proxy", help="the ShapesScore learned proxy reward: train or evaluate it")
    proxy_sub = p.add_subparsers(dest="proxy_command", required=True, metavar="ACTION")
    q = proxy_sub.add_parser("train", help="fit ShapesScore on a pair file")
    q.add_argument("--train", required=True, help="training pair file (diffalign data proxy-pairs)")
    q.add_argument("--heldout", default=None, help="held-out pair file (accuracy recorded in the checkpoint)")
    q.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    q.add_argument("--report", default=None, help="also write the training report as JSON here")
    q.add_argument("overrides", nargs="*", help="key=value settings, e.g. epochs=8 lr=2e-3")
    q.set_defaults(func=_cmd_proxy_train)
    q = proxy_sub.add_parser("eval", help="held-out pair accuracy of a ShapesScore checkpoint")
    q.add_argument("pairs", nargs="?", default=None, help="pair file (held-out pair accuracy)")
    q.add_argument("--checkpoint", default=None, help="ShapesScore checkpoint (default: the shipped one)")
    q.add_argument("--probe", action="store_true", help="also probe blind spots (perturbations, attack)")
    q.add_argument("--json", default=None, help="also write the report as JSON here")
    q.add_argument("--record", action="store_true",
                   help="write the held-out pair figures into the checkpoint's metadata")
    q.set_defaults(func=_cmd_proxy_eval)


def _add_reward_server_parser(sub) -> None:
    """``diffalign reward-server``."""
    p = sub.add_parser("reward-server", help="serve a registered reward over HTTP (for the remote reward)")
    p.add_argument("--reward", required=True, help="registered reward name, e.g. pickscore, ocr, shapes_verifier")
    p.add_argument("--reward-kwargs", default="{}", help="JSON object of reward arguments, e.g. "
                                                         "'{\"model_path\": \"/models/PickScore_v1\"}'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch-images", type=int, default=64, help="most images per reward call (batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (413 above)")
    p.add_argument("--max-images-per-request", type=int, default=512, help="most images per request (413 above)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request scoring timeout (504 after)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (info logs every request)")
    p.set_defaults(func=_cmd_reward_server)


def _add_data_parser(sub) -> None:
    """``diffalign data ...``: dataset builders. Each module adds its own subcommand in
    :func:`_add_data_commands` (preference pairs, proxy-reward training pairs, ...)."""
    p = sub.add_parser("data", help="build datasets (preference pairs, proxy-reward pairs)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="KIND")
    _add_data_commands(data_sub)


def _cmd_data_prefs(args) -> int:
    from diffalign.config import load_config
    from diffalign.data.preference import (
        PrefDataConfig,
        build_shapes_preferences,
        dataset_summary,
        load_preference_dataset,
    )

    cfg = load_config(PrefDataConfig, None, args.overrides)
    t0 = time.perf_counter()
    out = build_shapes_preferences(cfg, args.out, progress=lambda n, total: print(f"{n}/{total} pairs", flush=True))
    print(json.dumps(dataset_summary(load_preference_dataset(out)), indent=2))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")
    return 0


def _add_data_commands(data_sub) -> None:
    """Register ``diffalign data KIND`` subcommands (one block per dataset kind)."""
    p = data_sub.add_parser("prefs", help="preference pairs (prompt, winner, loser): renders or correct "
                                          "base samples vs rejected base samples")
    p.add_argument("--out", required=True, help="dataset directory (manifest.json, pairs.jsonl, shards)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. num_pairs=400 winners=mixed steps=8")
    p.set_defaults(func=_cmd_data_prefs)
    p = data_sub.add_parser("proxy-pairs", help="ShapesScore training pairs: correct images vs near-misses "
                                                "and base-model failures")
    p.add_argument("--out", required=True, help="pair file to write (.pt)")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. split=test seed=1 num_prompts=600")
    p.set_defaults(func=_cmd_data_proxy_pairs)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffalign.runtime import keep_freed_memory

    keep_freed_memory()  # large activations reuse heap memory instead of page-faulting (docs/benchmarks.md)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (argparse stops positionals at the first option)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad or (extra and not hasattr(args, "items") and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        if hasattr(args, "items"):
            args.items = list(args.items) + extra
        else:
            args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except DiffalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
