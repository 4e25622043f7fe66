"""The ``shuffled`` control reward: same scores per group, no information about which image earned them."""

import numpy as np
import pytest
import torch

from diffalign.errors import ConfigError
from diffalign.rewards import build_reward, checked_call
from diffalign.rewards.shuffled import pixel_key, shuffle_within_prompts
from diffalign.world.render import render_batch


def _batch():
    prompts = ["four blue circles"] * 8 + ["a red square"] * 8
    return render_batch(prompts, list(range(16))), prompts


def test_shuffled_verifier_keeps_each_prompt_s_scores_and_the_real_details():
    images, prompts = _batch()
    images[::3] = images[::3].flip(-1).roll(9, dims=-1)  # break some images so the scores differ
    real = checked_call(build_reward("shapes_verifier", mode="partial"), images, prompts, [{}] * 16)
    out = checked_call(build_reward("shuffled", reward="shapes_verifier", kwargs={"mode": "partial"}),
                       images, prompts, [{}] * 16)
    assert torch.equal(out.details["unshuffled"], real.scores)
    assert torch.equal(out.details["score"], real.details["score"])  # the real per-image figures, unshuffled
    for lo in (0, 8):  # each prompt's multiset of scores is kept
        assert sorted(out.scores[lo:lo + 8].tolist()) == sorted(real.scores[lo:lo + 8].tolist())
    assert len(set(real.scores.tolist())) > 1 and not torch.equal(out.scores, real.scores)
    again = build_reward("shuffled", reward="shapes_verifier", kwargs={"mode": "partial"})(images, prompts, [{}] * 16)
    assert torch.equal(again.scores, out.scores)  # a pure function of the images: resumes see the same deal


def test_the_deal_is_a_random_permutation_uncorrelated_with_the_score():
    """Over many groups of 8 the advantage an image receives (its dealt score minus the group mean)
    is uncorrelated with its own: the expected update is zero. A derangement would give −1/7 (it
    would teach the reverse of the reward). Each image keeps its own score 1/8 of the time, as a
    uniform permutation does."""
    rng = np.random.default_rng(0)
    own, got, kept = [], [], 0
    for g in range(4000):
        scores = torch.tensor(rng.random(8), dtype=torch.float32)
        keys = [pixel_key(torch.tensor(rng.random(12))) for _ in range(8)]
        dealt = shuffle_within_prompts(scores, [f"p{g}"] * 8, keys)
        own += (scores - scores.mean()).tolist()
        got += (dealt - scores.mean()).tolist()
        kept += int((dealt == scores).sum())
    assert abs(np.corrcoef(own, got)[0, 1]) < 0.03
    assert abs(kept / (4000 * 8) - 1 / 8) < 0.01


def test_single_image_prompts_keep_their_score_and_bad_configs_are_refused():
    scores = torch.tensor([0.1, 0.9, 0.5])
    keys = [b"c", b"a", b"b"]
    assert torch.equal(shuffle_within_prompts(scores, ["x", "y", "z"], keys), scores)
    assert shuffle_within_prompts(scores, ["x", "x", "x"], keys).tolist() == pytest.approx([0.5, 0.1, 0.9])
    # two groups of the same prompt (the trainer's metadata) each keep their own scores
    four = torch.tensor([0.0, 0.1, 0.8, 0.9])
    dealt = shuffle_within_prompts(four, ["x"] * 4, [b"d", b"c", b"b", b"a"], groups=[0, 0, 1, 1])
    assert sorted(dealt[:2].tolist()) == pytest.approx([0.0, 0.1]) and sorted(dealt[2:].tolist()) == pytest.approx([0.8, 0.9])
    with pytest.raises(ConfigError, match="registered reward other than 'shuffled'"):
        build_reward("shuffled", reward="shuffled")
    with pytest.raises(ConfigError, match="unknown reward"):
        build_reward("shuffled", reward="no_such_reward")
