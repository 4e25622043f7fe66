"""ShapesWorld grammar, renderer and verifier."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.errors import DiffalignError, PromptError
from diffalign.world import (
    HELD_OUT_COMBOS,
    TASKS,
    all_prompts,
    eval_prompts,
    format_prompt,
    parse_prompt,
    prompt_splits,
    render,
    render_batch,
    snap_to_palette,
    verify,
    verify_batch,
)
from diffalign.world.nearmiss import NEAR_MISS_KINDS, near_miss
from diffalign.world.render import draw, layout
from diffalign.world.verify import Detection, detect, judge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_every_prompt_round_trips_through_the_parser():
    prompts = [p for ps in all_prompts().values() for p in ps]
    assert len(prompts) == len(set(prompts)) == 1485
    for p in prompts:
        spec = parse_prompt(p)
        assert format_prompt(spec) == p


@pytest.mark.parametrize(
    "text,task,n",
    [
        ("a circle", "single_object", 1),
        ("A Red Circle.", "colors", 1),
        ("a circle and a square", "two_object", 2),
        ("three green triangles", "counting", 3),
        ("a red circle to the left of a blue square", "position", 2),
        ("an orange triangle below a purple square", "position", 2),
        ("a red circle and a blue square", "color_attr", 2),
    ],
)
def test_parse_task_types(text, task, n):
    spec = parse_prompt(text)
    assert spec.task == task and len(spec.objects) == n


@pytest.mark.parametrize(
    "text,needle",
    [
        ("a pink circle", "unknown word 'pink'"),
        ("a red hexagon", "unknown word 'hexagon'"),
        ("circle red a the", "malformed prompt"),
        ("a red circle and a square", "colours one object but not the other"),
        ("a red circle to the left of a red circle", "identical"),
        ("a circle and a circle", "same shape twice"),
    ],
)
def test_bad_prompts_have_clear_errors(text, needle):
    with pytest.raises(PromptError, match=needle):
        parse_prompt(text)
    assert issubclass(PromptError, DiffalignError)


def test_splits_are_disjoint_and_hold_out_combos():
    s = prompt_splits()
    for task in TASKS:
        train, test, ood = set(s["train"][task]), set(s["test"][task]), set(s["ood"][task])
        assert not (ood & (train | test))
        if task not in ("single_object", "two_object"):
            assert not (train & test)
        for p in train | test:
            assert not (parse_prompt(p).combos & HELD_OUT_COMBOS)
        for p in ood:
            assert parse_prompt(p).combos & HELD_OUT_COMBOS
    assert prompt_splits() == prompt_splits()  # seeded, stable


def test_eval_prompts_balanced_and_deterministic():
    ps = eval_prompts("test", 60, seed=0)
    assert ps == eval_prompts("test", 60, seed=0)
    counts = {t: sum(parse_prompt(p).task == t for p in ps) for t in TASKS}
    assert set(counts.values()) == {10}


def test_eval_prompts_restricted_to_task_types():
    ps = eval_prompts("test", 40, seed=3, tasks=("position", "color_attr"))
    assert ps == eval_prompts("test", 40, seed=3, tasks=("color_attr", "position"))  # order of the names is moot
    counts = {t: sum(parse_prompt(p).task == t for p in ps) for t in TASKS}
    assert counts["position"] == counts["color_attr"] == 20 and sum(counts.values()) == 40
    with pytest.raises(PromptError, match="unknown task type"):
        eval_prompts("test", 4, tasks=("positon",))
    with pytest.raises(PromptError, match="unknown task type"):
        eval_prompts("test", 4, tasks=())


def test_verifier_reward_task_modes_pay_strict_on_named_tasks_only():
    from diffalign.errors import ConfigError
    from diffalign.rewards import build_reward

    prompts = ["a red circle below a purple square", "a yellow square and a purple circle", "three green triangles"]
    # drawn for other prompts: the relation inverted, the colours swapped, one triangle short
    images = render_batch(["a red circle above a purple square", "a yellow circle and a purple square",
                           "two green triangles"], [0, 1, 2])
    mixed = build_reward("shapes_verifier", mode="partial", task_modes={"position": "score"})
    out = mixed(images, prompts, [{}] * 3)
    partial, strict = out.details["partial"], out.details["score"]
    assert strict.tolist() == [0.0, 0.0, 0.0]
    # position: objects and no_extra hold, the relation does not: partial 3/4, paid the strict 0
    assert partial[0].item() == pytest.approx(0.75) and out.scores[0].item() == 0.0
    assert out.scores[1:].tolist() == partial[1:].tolist() and partial[1].item() > 0
    assert mixed.name == "shapes_verifier[partial,position=score]"
    with pytest.raises(ConfigError, match="unknown task type"):
        build_reward("shapes_verifier", task_modes={"positions": "score"})
    with pytest.raises(ConfigError, match="partial, graded or score"):
        build_reward("shapes_verifier", task_modes={"position": "strict"})


def test_render_is_deterministic_and_objects_do_not_overlap():
    for i, p in enumerate(eval_prompts("train", 120, seed=1)):
        a, objs = render(p, i)
        b, _ = render(p, i)
        assert np.array_equal(a, b)
        masks = np.zeros((32, 32), int)
        for o in objs:
            masks[o.y0 : o.y0 + o.size, o.x0 : o.x0 + o.size] += 1
        assert masks.max() <= 1
        assert a.dtype == np.uint8 and a.shape == (32, 32, 3)


def test_training_renders_avoid_held_out_combos():
    for i in range(300):
        _, objs = render("a circle", i)
        assert ("orange", "circle") not in {(o.color, o.shape) for o in objs}


def test_render_64_and_bad_size():
    img, _ = render("three green triangles", 0, 64)
    assert img.shape == (64, 64, 3)
    assert verify(img, "three green triangles").score == 1.0
    with pytest.raises(DiffalignError, match="image size 48 is not supported"):
        render("a circle", 0, 48)


def test_verifier_exact_on_5000_renders_and_never_fooled_by_near_misses():
    import verifier  # benchmarks/verifier.py

    r = verifier.run(renders=5000, near_misses=200)
    print(r)
    assert r["renders"] == 5000
    assert r["render_pass_rate"] >= 0.999
    assert set(r["render_pass_rate_by_task"]) == set(TASKS)
    assert set(r["near_miss_fail_rate"]) == set(NEAR_MISS_KINDS)
    assert all(v == 1.0 for v in r["near_miss_fail_rate"].values())


def test_verdict_counts_for_each_near_miss_kind():
    p = "a red circle to the left of a blue square"
    img, objs = render(p, 5)
    v = verify(img, p)
    assert (v.score, v.partial, v.hallucinated, v.missing, v.misattributed) == (1.0, 1.0, 0, 0, 0)
    v = verify(near_miss(p, 5, "object_removed"), p)
    assert v.score == 0 and v.missing == 1 and v.hallucinated == 0
    v = verify(near_miss(p, 5, "wrong_color"), p)
    assert v.score == 0 and v.misattributed == 1 and v.missing == 0
    v = verify(near_miss(p, 5, "extra_object"), p)
    assert v.score == 0 and v.hallucinated == 1 and not v.constraints["no_extra"]
    v = verify(near_miss(p, 5, "wrong_relation"), p)
    assert v.score == 0 and v.constraints == {**v.constraints, "relation:left of": False}
    assert v.partial == pytest.approx(3 / 4)


def test_counting_partial_credit():
    p = "three green triangles"
    spec = parse_prompt(p)
    objs = layout(spec, 3)
    v = verify(draw(objs[:2]), p)
    # constraints: 3 objects + no_extra; two objects present, third missing, no extras
    assert v.partial == pytest.approx(3 / 4) and v.missing == 1 and v.score == 0


def test_free_colour_prompt_accepts_any_colour():
    for i in range(20):
        img, objs = render("a triangle", i)
        assert verify(img, "a triangle").score == 1.0


def test_verifier_tolerates_mild_noise_but_not_blank():
    img, _ = render("a blue square and a yellow circle", 2)
    noisy = np.clip(img.astype(float) + np.random.default_rng(0).normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    assert verify(noisy, "a blue square and a yellow circle").score == 1.0
    blank = np.full_like(img, 255)
    v = verify(blank, "a blue square and a yellow circle")
    assert v.score == 0 and v.missing == 2 and detect(blank) == []


def test_snap_to_palette_removes_pixel_noise_and_keeps_renders():
    ps = ["four blue circles", "a red circle below a purple square"]
    clean = render_batch(ps, [3, 4])
    assert torch.equal(snap_to_palette(clean), clean)  # renders are palette images already
    noisy = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)) * 0.03
    noisy = torch.where(clean == 1, noisy + 0.3, noisy)  # the background's overshoot past 1, as CFG samples have
    snapped = snap_to_palette(noisy)
    assert torch.equal(snapped, clean)
    palette = {tuple(c) for c in (render_batch(["a red circle"], [0])[0].reshape(3, -1).T.tolist())}
    assert (1.0, 1.0, 1.0) in palette  # white background is one of the snapped colours


def test_tensor_and_batch_interfaces_agree():
    ps = eval_prompts("test", 12, seed=4)
    imgs = render_batch(ps, list(range(12)))
    assert imgs.shape == (12, 3, 32, 32) and imgs.dtype == torch.float32 and 0 <= imgs.min() and imgs.max() <= 1
    vb = verify_batch(imgs, ps)
    assert [v.score for v in vb] == [verify(imgs[i], ps[i]).score for i in range(12)] == [1.0] * 12


def test_graded_credit_for_near_misses():
    """graded: 1 on correct renders, between strict failure and success for each near miss."""
    p = "a red circle to the left of a blue square"
    assert verify(render(p, 5)[0], p).graded == pytest.approx(1.0, abs=0.01)
    v = verify(near_miss(p, 5, "wrong_color"), p)  # one object mis-attributed: half its credit
    assert v.partial < v.graded < 1 and v.misattributed == 1
    v = verify(near_miss(p, 5, "extra_object"), p)  # no_extra earns 1/(1 + 1)
    assert v.graded == pytest.approx((3 + 0.5) / 4, abs=0.01)
    v = verify(near_miss(p, 5, "object_removed"), p)  # the relation loses its credit with the object
    assert v.graded == pytest.approx(v.partial) == pytest.approx(2 / 4)
    # the relation's credit grows with the offset along its axis and is ½ at the margin
    a, b = Detection("red", "circle", 10.0, 16.0, 40, 0.8), Detection("blue", "square", 0.0, 16.0, 40, 1.0)
    spec = parse_prompt(p)
    credits = []
    for bx in (4.0, 12.0, 14.0, 20.0):
        v = judge(spec, [a, Detection("blue", "square", bx, 16.0, 40, 1.0)])
        credits.append(v.graded * 4 - 3)  # the relation's share
    assert credits[0] < 0.1 and credits[1] == pytest.approx(0.5) and credits[1] < credits[2] < credits[3] <= 1
    assert judge(spec, [a, b]).score == 0.0
