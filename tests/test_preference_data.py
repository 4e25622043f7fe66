"""Preference datasets on disk: round trip, winners-only view, clear errors, the ShapesWorld builder."""

import json

import pytest
import torch
from tiny import tiny_unet

from diffalign.cli import main
from diffalign.data.preference import (
    PrefDataConfig,
    PreferenceWriter,
    build_shapes_preferences,
    load_preference_dataset,
)
from diffalign.errors import DatasetError
from diffalign.models.checkpoint import save_unet
from diffalign.world.render import render, render_batch
from diffalign.world.verify import verify_batch

PROMPTS = ["a red circle", "two blue squares", "a circle and a square", "a green triangle", "a yellow square"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_unet(tmp_path_factory.mktemp("m") / "tiny.safetensors", tiny_unet(0), 32))


def _write(root, n=5, shard_size=2, losers=True):
    g = torch.Generator().manual_seed(0)
    winners = render_batch(PROMPTS[:n], list(range(n)))
    lose = torch.rand(n, 3, 32, 32, generator=g)
    with PreferenceWriter(root, shard_size=shard_size) as w:
        for i in range(n):
            w.add(PROMPTS[i], winners[i], lose[i] if losers else None, task="t", k=i)
    return winners, lose


def test_round_trip(tmp_path):
    winners, losers = _write(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_pairs"] == 5 and len(manifest["shards"]) == 3
    ds = load_preference_dataset(tmp_path / "d")
    assert ds.prompts == PROMPTS and ds.image_size == 32 and len(ds) == 5
    assert [r["k"] for r in ds.records] == list(range(5))
    b = ds.batch([4, 0])
    assert b.prompts == [PROMPTS[4], PROMPTS[0]]
    # uint8 storage: exact for renders, within half a level for float losers
    torch.testing.assert_close(b.winners, winners[[4, 0]])
    assert (b.losers - losers[[4, 0]]).abs().max() <= 0.5 / 255 + 1e-6
    # the stored winners are still verified-correct renders
    assert all(v.score == 1.0 for v in verify_batch(ds.batch(range(5)).winners, ds.prompts))


def test_winners_only_view_deduplicates(tmp_path):
    img, _ = render("a red circle", 3)
    with PreferenceWriter(tmp_path / "d") as w:
        for k in range(3):  # one winner, three losers
            w.add("a red circle", img, torch.full((3, 32, 32), k / 3))
        w.add("a blue square", render("a blue square", 1)[0], torch.zeros(3, 32, 32))
    ds = load_preference_dataset(tmp_path / "d")
    view = ds.winners_only()
    assert len(ds) == 4 and len(view) == 2 and view.losers is None
    assert view.prompts == ["a red circle", "a blue square"]
    # a winners-only dataset written as such
    _write(tmp_path / "w", losers=False)
    assert load_preference_dataset(tmp_path / "w").losers is None


def test_corrupt_shard_is_a_clear_error(tmp_path):
    _write(tmp_path / "d")
    shard = tmp_path / "d" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-00001.safetensors is corrupt or was replaced: its sha256"):
        load_preference_dataset(tmp_path / "d")
    # without a checksum (a hand-written manifest) a truncated file is still caught
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    for s in manifest["shards"]:
        s.pop("sha256")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(manifest))
    shard.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DatasetError, match="corrupt or not a safetensors file"):
        load_preference_dataset(tmp_path / "d")
    shard.unlink()
    with pytest.raises(DatasetError, match="is missing"):
        load_preference_dataset(tmp_path / "d")


def test_mismatched_shard_and_index_errors(tmp_path):
    from safetensors.torch import save_file

    _write(tmp_path / "d")
    root = tmp_path / "d"
    manifest = json.loads((root / "manifest.json").read_text())
    for s in manifest["shards"]:
        s.pop("sha256")
    (root / "manifest.json").write_text(json.dumps(manifest))
    good = (root / "shard-00000.safetensors").read_bytes()
    # 16 px images in a 32 px dataset
    save_file({"winners": torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
               "losers": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}, str(root / "shard-00000.safetensors"))
    with pytest.raises(DatasetError, match=r"'winners' must be uint8 \(n, 3, 32, 32\); got torch.uint8 \(2, 3, 16, 16\)"):
        load_preference_dataset(root)
    save_file({"winners": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, str(root / "shard-00000.safetensors"))
    with pytest.raises(DatasetError, match="has no 'losers' tensor"):
        load_preference_dataset(root)
    (root / "shard-00000.safetensors").write_bytes(good)
    lines = (root / "pairs.jsonl").read_text().splitlines()
    bad = json.loads(lines[0]) | {"row": 7}
    (root / "pairs.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match="row 7 is out of range for shard-00000.safetensors"):
        load_preference_dataset(root)
    (root / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="not a preference dataset"):
        load_preference_dataset(root)


def test_writer_rejects_bad_input(tmp_path):
    w = PreferenceWriter(tmp_path / "d")
    with pytest.raises(DatasetError, match=r"winner must be a \(3, 32, 32\) image"):
        w.add("a red circle", torch.zeros(3, 16, 16), torch.zeros(3, 32, 32))
    w.add("a red circle", torch.zeros(3, 32, 32), torch.zeros(3, 32, 32))
    with pytest.raises(DatasetError, match="either every pair has a loser or none does"):
        w.add("a red circle", torch.zeros(3, 32, 32))
    w.flush()
    with pytest.raises(DatasetError, match="incomplete"):
        load_preference_dataset(tmp_path / "d")


def test_builder_makes_verified_pairs_and_resumes(tmp_path, tiny_model):
    settings = dict(model=tiny_model, steps=1, batch_size=4, images_per_prompt=2, shard_size=3, seed=1)
    out = build_shapes_preferences(PrefDataConfig(num_pairs=7, **settings), tmp_path / "full")
    ds = load_preference_dataset(out)
    assert len(ds) == 7 and ds.losers is not None
    # losers are samples the verifier rejects; render winners pass it
    assert all(v.score == 0.0 for v in verify_batch(ds.batch(range(7)).losers, ds.prompts))
    assert all(v.score == 1.0 for v in verify_batch(ds.batch(range(7)).winners, ds.prompts))
    assert {r["winner_source"] for r in ds.records} == {"render"}
    assert all(0 <= r["loser_partial"] < 1 for r in ds.records)
    # built in two goes (3 pairs, then extended to 7): the same pairs as in one go
    build_shapes_preferences(PrefDataConfig(num_pairs=3, **settings), tmp_path / "two")
    assert len(load_preference_dataset(tmp_path / "two")) == 3
    build_shapes_preferences(PrefDataConfig(num_pairs=7, **settings), tmp_path / "two")
    again = load_preference_dataset(tmp_path / "two")
    assert again.prompts == ds.prompts and torch.equal(again.winners, ds.winners) and torch.equal(again.losers, ds.losers)
    # a finished dataset is reused as it is; other settings are refused
    mtime = (out / "manifest.json").stat().st_mtime_ns
    build_shapes_preferences(PrefDataConfig(num_pairs=7, **settings), out)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="built with other settings"):
        build_shapes_preferences(PrefDataConfig(num_pairs=9, **(settings | {"steps": 2})), out)


def test_cli_data_prefs(tmp_path, tiny_model, capsys):
    out = tmp_path / "prefs"
    assert main(["data", "prefs", "--out", str(out), f"model={tiny_model}", "num_pairs=4", "steps=1",
                 "batch_size=4", "images_per_prompt=2"]) == 0
    text = capsys.readouterr().out
    assert '"pairs": 4' in text and len(load_preference_dataset(out)) == 4
    assert main(["data", "prefs", "--out", str(out), "winners=best"]) == 2
    assert "winners" in capsys.readouterr().err
