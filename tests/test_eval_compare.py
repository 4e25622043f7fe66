"""diffalign eval (every metric, determinism, bad input) and diffalign compare (incl. headless Chromium).

Run directories come from the real trainer on a tiny random model (a few seconds each)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import tiny_unet

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.errors import CheckpointError, DiffalignError
from diffalign.evaluation.compare import (
    MixedConfigWarning,
    compare,
    config_differences,
    group_runs,
    load_run,
    training_curve,
)
from diffalign.evaluation.report import diversity, evaluate
from diffalign.models.checkpoint import save_unet
from diffalign.models.unet import FlowUNet, UNetConfig
from diffalign.rewards.shapes_score import SHIPPED
from diffalign.training.trainer import TrainConfig, Trainer
from diffalign.world.render import render_batch
from diffalign.world.verify import verify_batch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def _train(model, out, *extra):
    cfg = load_config(TrainConfig, "configs/shapes/flow_grpo.yaml", [
        f"model={model}", "lora_rank=0", "epochs=2", "prompts_per_epoch=2", "group_size=2", "rollout.steps=2",
        "rollout.sde_window=null", "eval.num_images=4", "eval.steps=2", "eval.every=1", "ckpt_every=1",
        "grpo.minibatch_size=4", "reward=jpeg_incompressibility", "reward_kwargs={}", *extra])
    Trainer(cfg, out).train()
    return out


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # lr set explicitly: the figures below must not depend on the shipped preset's rate
    return [_train(tiny_model, root / "a-seed0", "seed=0", "lr=2e-3"),
            _train(tiny_model, root / "a-seed1", "seed=1", "lr=2e-3"),
            _train(tiny_model, root / "b-seed0", "seed=0", "lr=3e-3")]


def _figures(report):
    return {s: {k: v for k, v in r.items() if k != "seconds"} for s, r in report["splits"].items()}


def test_eval_scores_everything_and_is_deterministic(runs, tmp_path):
    kw = dict(num_images=8, steps=2, splits=("test", "ood"), images_per_prompt=2)
    a = evaluate(runs[0], tmp_path / "e1", **kw)
    b = evaluate(runs[0], tmp_path / "e2", **kw)
    assert _figures(a) == _figures(b)
    t = a["splits"]["test"]
    for key in ("score", "partial", "hallucinated", "misattributed", "missing", "lowlevel/flat_noise",
                "renderer_lowlevel/highpass", "jpeg_kb", "diversity/pixel", "diversity/outcomes"):
        assert key in t, key
    assert t["diversity/pixel"] > 0  # two seeds of one prompt differ
    if SHIPPED.is_file():
        assert 0 <= t["proxy/score"] <= 1 and "proxy/gap" in t
    for name in ("eval.json", "eval.md", "grid_test.png", "grid_ood.png"):
        assert (tmp_path / "e1" / name).is_file()
    assert json.loads((tmp_path / "e1" / "eval.json").read_text())["images_per_prompt"] == 2


def test_eval_on_chosen_task_types(runs, tmp_path, capsys):
    rep = evaluate(runs[0], tmp_path / "et", num_images=4, steps=1, splits=("test",), use_proxy=False,
                   tasks=("position", "color_attr"))
    t = rep["splits"]["test"]
    assert rep["tasks"] == ["position", "color_attr"]
    assert {k for k in t if k.startswith("score/")} == {"score/position", "score/color_attr"}
    assert "task types: position, color_attr" in (tmp_path / "et" / "eval.md").read_text()
    assert main(["eval", str(runs[0]), "--out", str(tmp_path / "o"), "--tasks", "position,colour",
                 "--num-images", "2", "--steps", "1", "--no-proxy"]) == 2
    assert "unknown task type(s) ['colour']" in capsys.readouterr().err


def test_diversity_of_identical_and_different_images():
    prompts = ["a red circle"] * 2 + ["a blue square"] * 2
    imgs = render_batch(prompts, [0, 0, 1, 2])
    d = diversity(imgs, prompts, verify_batch(imgs, prompts))
    # prompt 1: identical images (distance 0); prompt 2: two different layouts
    assert 0 < d["diversity/pixel"] < 0.5
    assert d["diversity/outcomes"] == pytest.approx(0.5)  # each prompt's images hold the same object set


def test_eval_bad_inputs(runs, tmp_path, tiny_model, capsys):
    with pytest.raises(DiffalignError, match="not a run directory"):
        evaluate(tmp_path, tmp_path / "o", num_images=2, steps=1)
    evaluate(runs[0], tmp_path / "ev", num_images=2, steps=1, splits=("test",), use_proxy=False)
    with pytest.raises(DiffalignError, match="evaluation output, not a run"):
        evaluate(tmp_path / "ev", tmp_path / "o", num_images=2, steps=1)
    with pytest.raises(DiffalignError, match="divide"):
        evaluate(runs[0], tmp_path / "o", num_images=3, steps=1, images_per_prompt=2)
    # a checkpoint from another model: a reward model file, and a run whose weights do not fit its model
    if SHIPPED.is_file():
        with pytest.raises(CheckpointError, match="not a diffalign tiny-model checkpoint"):
            evaluate(SHIPPED, tmp_path / "o", num_images=2, steps=1)
    other_arch = UNetConfig(channels=(8, 16), attn_levels=(1,), groups=4, emb_dim=32, heads=2)
    other = save_unet(tmp_path / "other.safetensors", FlowUNet(other_arch), 32)
    broken = tmp_path / "broken"
    shutil.copytree(runs[0], broken)
    cfg = (broken / "config.yaml").read_text().replace(tiny_model, str(other))
    (broken / "config.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        evaluate(broken, tmp_path / "o", num_images=2, steps=1)
    empty = tmp_path / "empty-run"
    shutil.copytree(runs[0], empty)
    shutil.rmtree(empty / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        evaluate(empty, tmp_path / "o", num_images=2, steps=1)
    assert main(["eval", str(tmp_path / "ev"), "--num-images", "2", "--steps", "1"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_compare_groups_seeds_and_warns_on_mixed_configs(runs, tmp_path):
    loaded = [load_run(r) for r in runs]
    assert [len(g) for g in group_runs(loaded)] == [2, 1]
    assert training_curve(group_runs(loaded))[0] == "reward"  # RL runs: the lower curves show the reward
    diffs = config_differences(loaded)
    assert list(diffs) == ["lr"] and diffs["lr"][2] == 3e-3
    with pytest.warns(MixedConfigWarning, match="lr"):
        res = compare(runs, tmp_path / "cmp", target=0.0)
    assert res["labels"][0] == "a" and len(res["groups"]) == 2
    assert res["stats"][0]["runs"] == 2 and res["stats"][0]["seeds"] == [0, 1]
    for name in ("compare.html", "compare.md", "curves.png", "bars.png", "compare.json"):
        assert (tmp_path / "cmp" / name).is_file(), name
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "data:image/png;base64," in page and "mixed-config-warning" in page
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| lr |" in md and "Warning" in md

    # same config, two seeds: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedConfigWarning)
        compare(runs[:2], tmp_path / "cmp2")

    # a run saved before a config field existed groups with a newer run at that field's default
    old = tmp_path / "a-seed2"
    shutil.copytree(runs[1], old)
    text = (old / "config.yaml").read_text()
    assert "\nsharding: none\n" in text
    (old / "config.yaml").write_text(text.replace("\nsharding: none\n", "\n").replace("seed: 1", "seed: 2"))
    assert [len(g) for g in group_runs([load_run(runs[0]), load_run(old)])] == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedConfigWarning)
        compare([runs[0], old], tmp_path / "cmp3")

    # many runs: the warning names the distinct values instead of one value per run
    many = [runs[0], runs[1], runs[2]]
    for lr in ("0.004", "0.005"):
        d = tmp_path / f"c-lr{lr}"
        shutil.copytree(runs[2], d)
        text = (d / "config.yaml").read_text()
        assert "\nlr: 0.003\n" in text
        (d / "config.yaml").write_text(text.replace("\nlr: 0.003\n", f"\nlr: {lr}\n"))
        many.append(d)
    with pytest.warns(MixedConfigWarning, match=r"lr \(4 values: 0\.002, 0\.003, 0\.004, 0\.005\)"):
        compare(many, tmp_path / "cmp4")


def test_compare_bad_inputs(runs, tmp_path, capsys):
    with pytest.raises(DiffalignError, match="not a run directory"):
        compare([runs[0], tmp_path], tmp_path / "o")
    with pytest.raises(DiffalignError, match="given twice"):
        compare([runs[0], runs[0]], tmp_path / "o")
    assert main(["compare", str(runs[0]), str(runs[2]), "--out", str(tmp_path / "c")]) == 0
    assert "warning: the compared runs differ in more than their seed: lr" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_MISSING = ("headless Chromium not installed: `bash scripts/install-browser.sh` installs it "
                   "(root or passwordless sudo), or `sudo apt-get install -y chromium`")


def _screenshot(page: Path, shot: Path) -> np.ndarray:
    """Render ``page`` in headless Chromium at 1280x2400 and return the RGB pixels."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1280,2400", f"--screenshot={shot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2400, 1280)
    return img


def _rows_with_dark_run(img: np.ndarray, length: int) -> int:
    """How many pixel rows hold a run of at least ``length`` contiguous near-black pixels."""
    dark = np.pad((img.sum(axis=2) < 150).astype(np.int8), ((0, 0), (1, 1)))
    edges = np.diff(dark, axis=1)
    rows = 0
    for row in edges:
        starts, ends = np.flatnonzero(row == 1), np.flatnonzero(row == -1)
        rows += bool(starts.size) and int((ends - starts).max()) >= length
    return rows


def _page_problems(img: np.ndarray) -> list[str]:
    """What a rendered compare page lacks: text, both tables' header rows, the plots, the warning box."""
    def near(rgb, tol):
        return np.abs(img - np.array(rgb)).sum(axis=2) < tol
    problems = []
    if (img.sum(axis=2) < 720).mean() <= 0.02:
        problems.append("the page rendered (almost) blank")
    # table header cells are #eef; the summary and config-difference tables give two separate bands of rows
    header_rows = np.flatnonzero(near([238, 238, 255], 4).sum(axis=1) > 100)
    bands = 0 if header_rows.size == 0 else 1 + int((np.diff(header_rows) > 5).sum())
    if bands < 2:
        problems.append(f"{bands} table header band(s), expected the summary and config-difference tables")
    # the inlined plots: matplotlib's black axis spines are the only long dark horizontal runs on the page
    # (text is short, table borders are light grey, the sample grids are noise)
    if _rows_with_dark_run(img, 200) < 3:
        problems.append("no plot axes on the page")
    if near([255, 243, 205], 6).sum() <= 1000:
        problems.append("no mixed-config warning box (#fff3cd)")
    return problems


@pytest.mark.skipif(CHROMIUM is None, reason=BROWSER_MISSING)
def test_compare_html_renders_in_headless_chromium(runs, tmp_path):
    with pytest.warns(MixedConfigWarning):
        compare(runs, tmp_path / "cmp")
    page = tmp_path / "cmp" / "compare.html"
    assert _page_problems(_screenshot(page, tmp_path / "shot.png")) == []
    # the check is a real one: the same page without its plots, or without the config table, fails it
    html_text = page.read_text()
    no_plots = re.sub(r"<img id='(curves|bars)'[^>]*>", "", html_text)
    no_config = re.sub(r"<h2>Config fields that differ</h2><table id='config-diff'>.*?</table>", "",
                       html_text, flags=re.S)
    assert no_plots != html_text and no_config != html_text
    for name, text, expected in [("no_plots", no_plots, "no plot axes"),
                                 ("no_config", no_config, "table header band")]:
        broken = page.with_name(f"{name}.html")
        broken.write_text(text)
        problems = _page_problems(_screenshot(broken, tmp_path / f"{name}.png"))
        assert any(expected in p for p in problems), (name, problems)
