"""task_sampling=adaptive and lr_schedule=cosine: probabilities, the prompt draw, a logged run."""

import math

import numpy as np
import pytest
import torch
from tiny import tiny_unet

from diffalign.config import load_config
from diffalign.errors import ConfigError
from diffalign.models.checkpoint import save_unet
from diffalign.rewards import RewardError, build_reward, register_reward
from diffalign.training.rundir import read_metrics
from diffalign.training.trainer import (
    TaskCurriculum,
    TrainConfig,
    Trainer,
    sample_prompts,
    sample_prompts_with_tasks,
)
from diffalign.world.grammar import TASKS, prompt_splits


def test_curriculum_probabilities_by_hand():
    cur = TaskCurriculum(["a", "b", "c"], floor=0.3, decay=0.5)
    assert cur.probs() is None  # nothing measured yet: uniform
    # groups 0, 1 are task a (std 0.2 and 0.4), group 2 is task b (all equal: std 0); c not drawn
    rewards = torch.tensor([0.0, 0.4, 0.0, 0.4,    # std 0.2
                            0.0, 0.8, 0.0, 0.8,    # std 0.4
                            0.5, 0.5, 0.5, 0.5])   # std 0
    ids = torch.arange(3).repeat_interleave(4)
    cur.update(["a", "a", "b"], rewards, ids)
    assert cur.signal == pytest.approx({"a": 0.3, "b": 0.0})
    # c, never drawn, counts as the largest signal seen (0.3): shares 0.5, 0, 0.5
    p = cur.probs()
    assert p == pytest.approx({"a": 0.1 + 0.7 * 0.5, "b": 0.1, "c": 0.1 + 0.7 * 0.5})
    assert sum(p.values()) == pytest.approx(1.0)
    # running mean: a drawn again with std 0.1 → 0.5·0.3 + 0.5·0.1 = 0.2
    cur.update(["a"], torch.tensor([0.0, 0.2, 0.0, 0.2]), torch.zeros(4, dtype=torch.long))
    assert cur.signal["a"] == pytest.approx(0.2)
    state = cur.state_dict()
    other = TaskCurriculum(["a", "b", "c"], floor=0.3, decay=0.5)
    other.load_state_dict(state)
    assert other.probs() == cur.probs()


def _cfg(*extra):
    return load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", ["prompts_per_epoch=60", "group_size=2", *extra])


def test_prompt_draw_follows_task_probabilities():
    cfg = _cfg()
    split = prompt_splits()["train"]
    tasks = [t for t in TASKS if split[t]]
    prompts, ids = sample_prompts(cfg, 3)
    p2, ids2, kinds = sample_prompts_with_tasks(cfg, 3)
    assert prompts == p2 and torch.equal(ids, ids2)  # uniform draw unchanged
    assert all(prompts[2 * g] in split[k] for g, k in enumerate(kinds))
    only = {t: (1.0 if t == "position" else 0.0) for t in tasks}
    prompts, _, kinds = sample_prompts_with_tasks(cfg, 3, only)
    assert set(kinds) == {"position"} and all(p in split["position"] for p in prompts)
    skewed = {t: (0.5 if t == "counting" else 0.1) for t in tasks}
    _, _, kinds = sample_prompts_with_tasks(_cfg("prompts_per_epoch=3000"), 0, skewed)
    assert abs(np.mean([k == "counting" for k in kinds]) - 0.5) < 0.04


def test_task_weights_set_the_training_prompt_mix():
    split = prompt_splits()["train"]
    cfg = _cfg("prompts_per_epoch=3000", "task_weights={position: 3, color_attr: 1}")
    cfg.validate()
    prompts, _, kinds = sample_prompts_with_tasks(cfg, 0)
    assert set(kinds) == {"position", "color_attr"}
    assert all(prompts[2 * g] in split[k] for g, k in enumerate(kinds))
    assert abs(np.mean([k == "position" for k in kinds]) - 0.75) < 0.03
    # with a curriculum the weights scale its probabilities: a task the curriculum starves stays out
    probs = {t: (0.0 if t == "position" else 1.0) for t in TASKS if split[t]}
    _, _, kinds = sample_prompts_with_tasks(cfg, 0, probs)
    assert set(kinds) == {"color_attr"}
    # without task_weights the draw is the one it always was (older runs reproduce)
    assert sample_prompts_with_tasks(_cfg(), 5)[0] == sample_prompts_with_tasks(_cfg("task_weights=null"), 5)[0]


@pytest.mark.parametrize("weights, match", [
    ("{posit: 1}", "unknown task type"),
    ("{position: -1}", "finite and >= 0"),
    ("{position: 0, color_attr: 0}", "no weight to a task type"),
    ("{}", "must be a mapping"),
    ("{position: lots}", "must be numbers"),
])
def test_bad_task_weights_are_rejected(weights, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(f"task_weights={weights}").validate()
    with pytest.raises(ConfigError, match="cannot be combined with prompt_file"):
        _cfg("task_weights={position: 1}", "prompt_file=prompts.txt").validate()


def test_bad_curriculum_settings_are_rejected():
    with pytest.raises(ConfigError, match="task_sampling must be"):
        _cfg("task_sampling=hard").validate()
    with pytest.raises(ConfigError, match="lr_schedule must be"):
        _cfg("lr_schedule=linear").validate()
    with pytest.raises(ConfigError, match="task_sampling_floor"):
        _cfg("task_sampling=adaptive", "task_sampling_floor=1.5").validate()


def test_adaptive_run_logs_probabilities(tmp_path):
    model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
        f"model={model}", "lora_rank=0", "epochs=3", "prompts_per_epoch=4", "group_size=3", "rollout.steps=2",
        "rollout.sde_window=null", "eval.num_images=2", "eval.steps=1", "eval.every=0", "grpo.minibatch_size=12",
        "reward=jpeg_incompressibility", "reward_kwargs={}", "task_sampling=adaptive", "task_sampling_floor=0.0",
        "lr=1e-3", "lr_schedule=cosine", "lr_min_ratio=0.2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    # cosine over 3 epochs: factor 0.2 + 0.8·½(1 + cos(π·e/3)) for e = 0, 1, 2
    want = [1e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * e / 3))) for e in range(3)]
    assert [r["lr"] for r in rows] == pytest.approx(want)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(want[-1])
    assert not any(k.startswith("task_prob/") for k in rows[0])  # epoch 1: uniform, nothing measured
    for r in rows[1:]:
        probs = {k: v for k, v in r.items() if k.startswith("task_prob/")}
        assert len(probs) == len([t for t in TASKS if prompt_splits()["train"][t]])
        assert sum(probs.values()) == pytest.approx(1.0)
        assert max(probs.values()) > min(probs.values())  # JPEG sizes differ by task: not uniform


def test_focused_run_trains_and_evaluates_the_chosen_task_types(tmp_path):
    """task_weights + a per-task strict reward + eval.tasks: the run's prompts, rewards and
    periodic evaluations are of position / colour binding only."""
    model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
        f"model={model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=4", "group_size=2", "rollout.steps=2",
        "rollout.sde_window=null", "eval.num_images=4", "eval.steps=1", "eval.every=1", "grpo.minibatch_size=8",
        "task_weights={position: 1, color_attr: 1}", "eval.tasks=[position, color_attr]",
        "reward_kwargs={mode: partial, task_modes: {position: score}}"])
    trainer = Trainer(cfg, tmp_path / "run")
    for e in range(2):
        assert {k for k in trainer.epoch_prompts(e).kinds} <= {"position", "color_attr"}
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/score/") for k in r)]
    assert len(evals) >= 2
    for r in evals:
        assert {k for k in r if k.startswith("eval/score/")} == {"eval/score/position", "eval/score/color_attr"}
    assert trainer.reward.name == "shapes_verifier[partial,position=score]"


@register_reward("test_jpeg_then_crash")
class _JpegThenCrash:
    """JPEG incompressibility for the first two calls (epochs 1-2 with async_reward=false), then a crash."""

    name = "test_jpeg_then_crash"
    calls = 0

    def __init__(self):
        self.inner = build_reward("jpeg_incompressibility")

    def __call__(self, images, prompts, metadata):
        type(self).calls += 1
        if type(self).calls > 2:
            raise RuntimeError("scorer went away")
        return self.inner(images, prompts, metadata)


def test_cosine_schedule_resumes_exactly_after_a_crash(tmp_path):
    model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))

    def cfg(reward):
        return load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
            f"model={model}", "lora_rank=0", "epochs=4", "prompts_per_epoch=2", "group_size=3", "rollout.steps=2",
            "rollout.sde_window=null", "eval.num_images=2", "eval.steps=1", "eval.every=0", "ckpt_every=1",
            "grpo.minibatch_size=6", "grpo.clip_range=0.2", f"reward={reward}", "reward_kwargs={}",
            "async_reward=false", "lr=1e-3", "lr_schedule=cosine"])

    Trainer(cfg("jpeg_incompressibility"), tmp_path / "full").train()
    _JpegThenCrash.calls = 0
    with pytest.raises(RewardError, match="scorer went away"):
        Trainer(cfg("test_jpeg_then_crash"), tmp_path / "part").train()
    Trainer(cfg("jpeg_incompressibility"), tmp_path / "part", resume=True).train()

    def rows(run):
        return [(r["step"], r["lr"], r["policy_loss"]) for r in read_metrics(run / "metrics.jsonl") if "lr" in r]

    assert len(rows(tmp_path / "full")) == 4 and rows(tmp_path / "part") == rows(tmp_path / "full")
