"""Reward zoo: PickScore / CLIPScore (tiny random CLIP saved offline), OCR on rendered text,
the weighted multi-reward and per-reward advantages."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from tiny import tiny_unet

from diffalign.algorithms.flow_grpo import GRPO, GRPOConfig
from diffalign.algorithms.grpo import grpo_advantages, per_reward_advantages
from diffalign.config import load_config
from diffalign.errors import ConfigError, DiffalignError
from diffalign.models.checkpoint import save_unet
from diffalign.rewards import RewardError, build_reward, checked_call, register_reward
from diffalign.rewards.multi import MultiReward, per_reward_inputs
from diffalign.rewards.ocr import edit_distance, ocr_text_score, quoted_text
from diffalign.training.rundir import read_metrics
from diffalign.training.trainer import TrainConfig, Trainer

# -- tiny CLIP -------------------------------------------------------------------------------


def build_tiny_clip(model_dir, processor_dir=None, *, image_size=30, seed=0):
    """A random CLIP (2 layers, width 32) and a byte-level CLIP tokenizer, saved offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab.setdefault(c + suffix, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=6),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(model_dir)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    processor.save_pretrained(processor_dir or model_dir)
    return model_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(build_tiny_clip(tmp_path_factory.mktemp("clip")))


def smooth_images(n, h, w, seed=0):
    """Low-frequency random images, quantised to 8 bits (what a PNG or the processor sees)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g)
    x = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return x.mul(255).round().div(255)


def to_pil(images):
    return [Image.fromarray(im.mul(255).round().byte().permute(1, 2, 0).numpy()) for im in images]


PROMPTS = ["a red circle", "a blue square to the left of a green triangle", "a red circle", "three purple squares",
           "a yellow triangle"]


@pytest.mark.parametrize("size", [(30, 30), (64, 64), (48, 80), (90, 50), (20, 40)])
def test_clip_preprocessing_matches_the_processor(clip_dir, size):
    from transformers import CLIPProcessor

    reward = build_reward("pickscore", model_path=clip_dir)
    images = smooth_images(4, *size)
    ours = reward.clip.preprocess(images)
    ref = CLIPProcessor.from_pretrained(clip_dir)(images=to_pil(images), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (4, 3, 30, 30)
    diff = (ours - ref).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.1  # bicubic rounding only (values span ±2)
    if size == (30, 30):
        assert torch.equal(ours, ref)


def test_pickscore_is_clip_logits_and_clipscore_its_clamped_cosine(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = smooth_images(5, 30, 30, seed=1)  # at the crop size preprocessing is exact
    pick = build_reward("pickscore", model_path=clip_dir)(images, PROMPTS, [{}] * 5)
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        inputs = proc(text=PROMPTS, images=to_pil(images), return_tensors="pt", padding=True)
        logits = model(**inputs).logits_per_image  # (images, texts) = exp(logit_scale)·cos
    torch.testing.assert_close(pick.scores, logits.diagonal(), atol=1e-4, rtol=1e-4)
    scale = float(model.logit_scale.detach().exp())
    torch.testing.assert_close(pick.details["cosine"] * scale, pick.scores)
    clip = build_reward("clipscore", model_path=clip_dir)(images, PROMPTS, [{}] * 5)
    torch.testing.assert_close(clip.scores, 2.5 * pick.details["cosine"].clamp_min(0))
    scaled = build_reward("pickscore", model_path=clip_dir, scale=1 / 26)(images, PROMPTS, [{}] * 5)
    torch.testing.assert_close(scaled.scores, pick.scores / 26)


def test_clip_reward_is_deterministic_batched_equals_unbatched(clip_dir):
    images = smooth_images(5, 64, 48, seed=2)
    r = build_reward("pickscore", model_path=clip_dir, batch_size=2)  # chunks of 2 inside
    out = checked_call(r, images, PROMPTS, [{}] * 5)
    assert out.scores.shape == (5,) and out.scores.dtype == torch.float32 and out.details["cosine"].shape == (5,)
    again = build_reward("pickscore", model_path=clip_dir, batch_size=5)(images, PROMPTS, [{}] * 5)
    one_by_one = torch.cat([r(images[i : i + 1], PROMPTS[i : i + 1], [{}]).scores for i in range(5)])
    torch.testing.assert_close(out.scores, again.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, one_by_one, atol=1e-5, rtol=1e-5)
    assert out.scores[0] == out.scores[0]  # finite
    # same image, different prompts → different scores; same prompt twice, same image → same score
    same = images[:1].expand(2, -1, -1, -1)
    two = r(same, ["a red circle", "three purple squares"], [{}] * 2).scores
    assert two[0] != two[1]
    assert r(same, ["a red circle"] * 2, [{}] * 2).scores.unique().numel() == 1


def test_clip_loads_processor_from_its_own_directory_and_truncates_long_prompts(tmp_path):
    model_dir = build_tiny_clip(tmp_path / "model", tmp_path / "processor", seed=3)
    r = build_reward("clipscore", model_path=str(model_dir), processor_path=str(tmp_path / "processor"))
    out = r(smooth_images(2, 40, 40), ["a red circle " * 40, "x"], [{}, {}])  # 520 characters > 77 tokens
    assert out.scores.shape == (2,) and torch.isfinite(out.scores).all()
    with pytest.raises(ConfigError, match="CLIP processor"):
        build_reward("clipscore", model_path=str(model_dir))  # the model directory has no tokenizer


def test_clip_hub_id_without_local_copy_fails_clearly():
    with pytest.raises(ConfigError, match=r"not a local directory.*huggingface-cli download yuvalkirstain/PickScore_v1"):
        build_reward("pickscore", model_path="yuvalkirstain/PickScore_v1")
    with pytest.raises(ConfigError, match="give model_path"):
        build_reward("clipscore")


# -- OCR -----------------------------------------------------------------------------------------


def test_ocr_text_helpers():
    assert quoted_text('a neon sign that says "Open Late"') == "Open Late"
    assert quoted_text('a mug with “coffee” and "tea"') == "coffee tea"
    with pytest.raises(ConfigError, match="no quoted text"):
        quoted_text("a red circle")
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert ocr_text_score("OPEN", "open") == (1.0, 0)
    assert ocr_text_score("0PEN", "OPEN") == (0.75, 1)
    assert ocr_text_score("Open  Late", "open late") == (1.0, 0)  # whitespace and case ignored
    assert ocr_text_score("", "OPEN") == (0.0, 4)
    assert ocr_text_score("completely different words", "OPEN") == (0.0, 4)  # capped at len(target)


def render_text(words, size=(256, 64), at=(12, 14), font_size=28):
    font = ImageFont.load_default(size=font_size)
    out = []
    for w in words:
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).text(at, w, fill=(20, 20, 20), font=font)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


OCR_PROMPTS = ['a shop sign that says "OPEN"', 'a poster with the word "diffusion"', 'a banner reading "Hello World"']


@pytest.mark.parametrize("detect", [False, True])
def test_ocr_reward_scores_correct_text_above_wrong_text(detect):
    reward = build_reward("ocr", detect=detect)
    size, at = ((256, 64), (12, 14)) if not detect else ((256, 160), (40, 60))
    right = render_text(["OPEN", "diffusion", "Hello World"], size, at)
    close = render_text(["OPFN", "difusion", "Hello Wrld"], size, at)
    wrong = render_text(["SHUT", "banana", "Goodbye"], size, at)
    meta = [{}] * 3
    s_right = checked_call(reward, right, OCR_PROMPTS, meta).scores
    s_close = checked_call(reward, close, OCR_PROMPTS, meta).scores
    s_wrong = checked_call(reward, wrong, OCR_PROMPTS, meta)
    assert (s_right >= 0.99).all(), s_right
    assert (s_close < s_right).all() and (s_close > s_wrong.scores).all(), (s_close, s_wrong.scores)
    assert (s_wrong.scores <= 0.5).all()
    assert set(s_wrong.details) == {"edit_distance", "ocr_confidence"}
    blank = torch.ones(1, 3, *size[::-1])
    assert float(reward(blank, OCR_PROMPTS[:1], [{}]).scores[0]) == 0.0  # no text: nothing right


def test_ocr_reward_target_from_metadata_and_clear_error_without_quotes():
    reward = build_reward("ocr", detect=False)
    img = render_text(["READY"])
    assert float(reward(img, ["a board"], [{"text": "ready"}]).scores[0]) == 1.0
    with pytest.raises(DiffalignError, match="no quoted text"):
        checked_call(reward, img, ["a board"], [{}])


# -- multi reward and per-reward advantages ------------------------------------------------------


@register_reward("test_zoo_raising")
class _Raising:
    name = "test_zoo_raising"

    def __call__(self, images, prompts, metadata):
        raise RuntimeError("detector crashed")


def test_multi_reward_is_the_weighted_sum_with_named_details():
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle"] * 4
    multi = build_reward("multi", rewards={
        "small": {"reward": "jpeg_compressibility", "weight": 2.0},
        "big": {"reward": "jpeg_incompressibility", "weight": 0.5, "kwargs": {"quality": 50}},
        "shapes_verifier": {"weight": 1.0, "kwargs": {"mode": "score"}},
    })
    out = checked_call(multi, images, prompts, [{}] * 4)
    small = build_reward("jpeg_compressibility")(images, prompts, [{}] * 4).scores
    big = build_reward("jpeg_incompressibility", quality=50)(images, prompts, [{}] * 4).scores
    verifier = build_reward("shapes_verifier", mode="score")(images, prompts, [{}] * 4).scores
    torch.testing.assert_close(out.scores, 2.0 * small + 0.5 * big + verifier)
    torch.testing.assert_close(out.details["small"], small)
    torch.testing.assert_close(out.details["big/jpeg_kb"], big)
    assert "shapes_verifier/hallucinated" in out.details
    assert multi.weights == {"small": 2.0, "big": 0.5, "shapes_verifier": 1.0}


def test_multi_reward_errors_name_the_part():
    with pytest.raises(ConfigError, match="at least one component"):
        MultiReward({})
    with pytest.raises(ConfigError, match="keys among"):
        MultiReward({"a": {"reward": "jpeg_compressibility", "wieght": 1}})
    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        MultiReward({"nope": {}})
    multi = MultiReward({"ok": {"reward": "jpeg_compressibility"}, "bad": {"reward": "test_zoo_raising"}})
    with pytest.raises(RewardError, match="'test_zoo_raising' raised RuntimeError: detector crashed"):
        checked_call(multi, torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])


def test_per_reward_advantages_hand_computed():
    gids = torch.tensor([0, 0, 1, 1])
    a = torch.tensor([1.0, 3.0, 10.0, 10.0])  # group 0: mean 2, std 1;   group 1: constant
    b = torch.tensor([0.0, 100.0, 5.0, 7.0])  # group 0: mean 50, std 50; group 1: mean 6, std 1
    adv = per_reward_advantages({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, gids, clip=None)
    eps = 1e-4
    expected = torch.tensor([-1 / (1 + eps) - 0.5 * 50 / (50 + eps), 1 / (1 + eps) + 0.5 * 50 / (50 + eps),
                             -0.5 / (1 + eps), 0.5 / (1 + eps)])
    torch.testing.assert_close(adv, expected)
    # the summed reward is dominated by b's range; per-reward normalisation is scale-free
    summed = grpo_advantages(a + 0.5 * b, gids, clip=None)
    rescaled = per_reward_advantages({"a": a, "b": 1000 * b}, {"a": 1.0, "b": 0.5}, gids, clip=None)
    torch.testing.assert_close(rescaled, adv, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(summed, adv, atol=0.1)
    assert per_reward_advantages({"a": a, "b": b}, {"a": 10.0, "b": 0.0}, gids, clip=5.0).abs().max() == 5.0
    with pytest.raises(ValueError, match="same rewards"):
        per_reward_advantages({"a": a}, {"b": 1.0}, gids)


def test_grpo_advantages_use_the_components_when_configured():
    gids = torch.tensor([0, 0, 1, 1])
    comps = {"a": torch.tensor([1.0, 3.0, 10.0, 10.0]), "b": torch.tensor([0.0, 100.0, 5.0, 7.0])}
    weights = {"a": 1.0, "b": 0.5}
    total = comps["a"] + 0.5 * comps["b"]
    algo = GRPO(GRPOConfig(reward_normalization="per_reward"))
    adv, metrics = algo.advantages(total, gids, ["p"] * 4, components=comps, weights=weights)
    torch.testing.assert_close(adv, per_reward_advantages(comps, weights, gids))
    assert metrics["zero_signal_groups"] == 0.0
    with pytest.raises(ConfigError, match="needs reward: multi"):
        algo.advantages(total, gids, ["p"] * 4)
    plain, _ = GRPO(GRPOConfig()).advantages(total, gids, ["p"] * 4, **per_reward_inputs(None, {}, "sum"))
    torch.testing.assert_close(plain, grpo_advantages(total, gids))
    with pytest.raises(ConfigError, match="reward_normalization"):
        GRPOConfig(reward_normalization="mean")
    with pytest.raises(ConfigError, match="needs reward: multi"):
        per_reward_inputs(build_reward("jpeg_compressibility"), {}, "per_reward")


def test_training_with_a_multi_reward_and_per_reward_advantages(tmp_path):
    model = str(save_unet(tmp_path / "tiny.safetensors", tiny_unet(0), 32))
    base = [f"model={model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=2", "group_size=4", "rollout.steps=3",
            "rollout.sde_window=null", "eval.num_images=4", "eval.steps=2", "eval.every=0", "grpo.minibatch_size=8",
            "grpo.clip_range=0.2", "reward=multi"]
    with pytest.raises(ConfigError, match="set reward: multi"):
        load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [*base[:-1], "grpo.reward_normalization=per_reward"]
                    ).validate()
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [*base, "grpo.reward_normalization=per_reward"])
    cfg.reward_kwargs = {"rewards": {"size": {"reward": "jpeg_incompressibility", "weight": 1.0},
                                     "verifier": {"reward": "shapes_verifier", "weight": 2.0}}}
    summary = Trainer(cfg, tmp_path / "run").train()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "policy_loss" in r]
    assert summary["epochs"] == 2 and len(rows) == 2
    for r in rows:
        assert {"reward/size", "reward/verifier", "reward/verifier/partial"} <= set(r)
        assert math.isclose(r["reward"], r["reward/size"] + 2 * r["reward/verifier"], rel_tol=1e-5)
        assert r["policy_loss"] == r["policy_loss"]


def test_prompt_brightness_signs_by_prompt_and_rejects_ambiguity():
    r = build_reward("prompt_brightness", up=["red"], down=["blue"])
    images = torch.full((3, 3, 4, 4), 0.25)
    out = r(images, ["a red circle", "a blue square", "a green triangle"], [{}] * 3)
    assert out.scores.tolist() == [0.25, -0.25, 0.0]
    with pytest.raises(ConfigError, match="ambiguous"):
        r(images[:1], ["a red circle and a blue square"], [{}])
    with pytest.raises(ConfigError, match="disjoint"):
        build_reward("prompt_brightness", up=["red"], down=["red"])
