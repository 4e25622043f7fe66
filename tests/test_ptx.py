"""Pretraining-data replay (PPO-ptx) in the GRPO update: its batch, its loss and how it enters the step."""

import pytest
import torch
from tiny import tiny_policy

from diffalign.algorithms.flow_grpo import GRPO, GRPOConfig
from diffalign.algorithms.ptx import PTXConfig, RenderReplay, flow_matching_loss, render_replay_batch
from diffalign.config import load_config
from diffalign.errors import ConfigError
from diffalign.sampling.rollout import RolloutConfig, rollout
from diffalign.training.trainer import TrainConfig
from diffalign.world.grammar import prompt_splits
from diffalign.world.render import render_batch


def test_replay_batch_is_renders_of_split_prompts_drawn_from_the_generator():
    prompts, seeds, images = render_replay_batch("train", 12, 32, torch.Generator().manual_seed(3))
    again, seeds2, images2 = render_replay_batch("train", 12, 32, torch.Generator().manual_seed(3))
    assert prompts == again and seeds == seeds2 and torch.equal(images, images2)
    train = {p for ps in prompt_splits()["train"].values() for p in ps}
    assert set(prompts) <= train and len(set(prompts)) > 1
    assert images.shape == (12, 3, 32, 32)
    assert torch.equal(images, render_batch(prompts, seeds, 32))  # the renderer's images of those captions
    assert render_replay_batch("train", 12, 32, torch.Generator().manual_seed(4))[0] != prompts


def test_flow_matching_loss_of_the_exact_velocity_is_zero_and_full_dropout_is_unconditional():
    """Known answers: a model that outputs ε − x0 has loss 0, and with cond_dropout 1 the loss is
    the one on empty captions."""
    pol = tiny_policy(0)
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    sigma = torch.sigmoid(torch.randn(4, generator=g))
    noise = torch.randn(x0.shape, generator=g)

    class Exact:  # the velocity field of these samples: x_σ = (1−σ)x0 + σε ⇒ v = ε − x0
        def encode(self, prompts):
            return prompts

        def predict(self, x_t, s, cond):
            assert torch.allclose(x_t, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
            return noise - x0

    assert flow_matching_loss(Exact(), x0, ["a"] * 4, torch.Generator().manual_seed(0)) == pytest.approx(0, abs=1e-12)
    pre = torch.sigmoid(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(pre, sigma)
    dropped = flow_matching_loss(pol, x0, ["a red circle"] * 4, torch.Generator().manual_seed(1), cond_dropout=1.0)
    empty = flow_matching_loss(pol, x0, [""] * 4, torch.Generator().manual_seed(1), cond_dropout=0.0)
    kept = flow_matching_loss(pol, x0, ["a red circle"] * 4, torch.Generator().manual_seed(1), cond_dropout=0.0)
    assert dropped.item() == pytest.approx(empty.item(), rel=1e-6) and kept.item() != pytest.approx(empty.item())


def test_training_on_the_replay_loss_lowers_it_on_held_out_renders():
    """The term is a working flow-matching objective: 40 Adam steps on renders lower the real
    tiny model's loss on renders it never saw (same σ and noise before and after)."""
    torch.manual_seed(0)
    pol = tiny_policy(0)
    replay = RenderReplay(PTXConfig(weight=1.0, batch_size=16))
    opt = torch.optim.Adam(list(pol.trainable_parameters()), lr=2e-3)

    def held_out() -> float:
        prompts, _, images = render_replay_batch("test", 32, 32, torch.Generator().manual_seed(99))
        with torch.no_grad():
            return flow_matching_loss(pol, pol.encode_images(images), prompts, torch.Generator().manual_seed(7)).item()

    before = held_out()
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        loss, m = replay(pol, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert m["ptx/loss"] == pytest.approx(loss.item())
    assert held_out() < 0.7 * before


def _traj(pol):
    prompts = ["a red circle"] * 4 + ["a square"] * 4
    return rollout(pol, prompts, torch.tensor([0] * 4 + [1] * 4), RolloutConfig(sampler="flow_sde", steps=3),
                   generator=torch.Generator().manual_seed(0))


def _sgd_delta(weight: float, adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter change of one GRPO update (one minibatch, plain SGD at lr 1, no clipping): −gradient."""
    pol = tiny_policy(2)
    traj = _traj(pol)
    aux = RenderReplay(PTXConfig(weight=weight, batch_size=4)) if weight else None
    algo = GRPO(GRPOConfig(clip_range=0.2, minibatch_size=8, max_grad_norm=1e9), auxiliary=aux)
    before = {k: v.detach().clone() for k, v in pol.trainable_state().items()}
    opt = torch.optim.SGD(list(pol.trainable_parameters()), lr=1.0)
    algo.update(pol, opt, traj, adv, torch.Generator().manual_seed(5))
    return {k: v.detach() - before[k] for k, v in pol.trainable_state().items()}


def test_replay_gradient_adds_to_the_policy_gradient_in_proportion_to_its_weight():
    adv = torch.linspace(-1, 1, 8)
    zero = torch.zeros(8)
    pg = _sgd_delta(0.0, adv)
    rep1, rep2 = _sgd_delta(1.0, zero), _sgd_delta(2.0, zero)
    both = _sgd_delta(1.0, adv)
    norm = sum(float(v.abs().sum()) for v in rep1.values())
    assert norm > 0 and sum(float(v.abs().sum()) for v in pg.values()) > 0
    for k in pg:
        assert torch.allclose(rep2[k], 2 * rep1[k], atol=1e-6, rtol=1e-4), k
        assert torch.allclose(both[k], pg[k] + rep1[k], atol=1e-6, rtol=1e-4), k


def test_extra_steps_are_plain_replay_gradient_steps():
    """Known answer: one replay-only step under plain SGD at lr 1 (no clipping) moves every weight
    by minus the gradient of weight · L_FM on the batch the same generator draws."""
    pol, ref = tiny_policy(2), tiny_policy(2)
    replay = RenderReplay(PTXConfig(weight=0.5, batch_size=4, extra_steps=1))
    before = {k: v.detach().clone() for k, v in pol.trainable_state().items()}
    m = replay.extra_steps(pol, torch.optim.SGD(list(pol.trainable_parameters()), lr=1.0),
                           torch.Generator().manual_seed(3), 1e9)
    loss, _ = replay(ref, torch.Generator().manual_seed(3))
    loss.backward()
    grads = {k: p.grad for k, p in ref.trainable_state().items()}
    moved = 0
    for k, v in pol.trainable_state().items():
        g = grads.get(k)
        expected = torch.zeros_like(v) if g is None else -g
        assert torch.allclose(v - before[k], expected, atol=1e-6, rtol=1e-4), k
        moved += int(bool((v - before[k]).abs().sum()))
    assert moved > 0 and m["ptx/extra_loss"] == pytest.approx(loss.item() / 0.5, rel=1e-5)
    assert RenderReplay(PTXConfig(weight=0.5)).extra_steps(pol, None, torch.Generator(), 1.0) == {}


def test_ptx_settings_are_checked_with_the_fix():
    with pytest.raises(ConfigError, match="ptx.timesteps"):
        PTXConfig(timesteps="cosine")
    with pytest.raises(ConfigError, match="ptx.split"):
        PTXConfig(split="validation")
    with pytest.raises(ConfigError, match="ptx.weight: 0"):
        load_config(TrainConfig, None, ["algorithm=crd", "ptx.weight=0.1"]).validate()
    with pytest.raises(ConfigError, match="ptx.weight > 0"):
        load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", ["ptx.extra_steps=3"]).validate()
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", ["ptx.weight=0.1", "ptx.batch_size=8"])
    assert cfg.ptx.weight == 0.1 and cfg.ptx.batch_size == 8
