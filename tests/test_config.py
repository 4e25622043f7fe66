"""Typed configs: coercion, presets with `base:`, overrides, errors that teach, docs, diffs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from diffalign.config import (
    MISSING,
    config_diff,
    config_from_dict,
    config_to_dict,
    describe,
    field_docs,
    load_config,
    save_config,
)
from diffalign.errors import ConfigError


@dataclass
class ModelCfg:
    """Model section."""

    channels: tuple[int, ...] = (32, 64)
    """UNet channels per level."""
    dropout: float = 0.0
    """Dropout probability."""


@dataclass
class TrainCfg:
    """Top-level config used by these tests."""

    lr: float = 3e-4
    """Peak learning rate."""
    steps: int = 100
    """Optimizer steps in total."""
    use_ema: bool = True
    """Keep an EMA copy of the weights."""
    name: str = "run"
    """Run name."""
    sampler: Literal["sde", "ode"] = "sde"
    """Rollout sampler."""
    resume_from: str | None = None
    """Checkpoint to start from (null = fresh)."""
    tags: list[str] = field(default_factory=list)
    """Free-form labels."""
    extra: dict = field(default_factory=dict)
    """Extra model kwargs."""
    model: ModelCfg = field(default_factory=lambda: ModelCfg(dropout=0.1))
    """The policy network."""


def _write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_and_overrides_are_coerced() -> None:
    cfg = load_config(TrainCfg, overrides=["lr=1e-4", "steps=2e3", "use_ema=false", "name=123",
                                           "model.channels=[8,16,32]", "tags=[a,b]", "resume_from=null"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.steps == 2000 and isinstance(cfg.steps, int)
    assert cfg.use_ema is False
    assert cfg.name == "123"  # string fields keep the raw override text
    assert cfg.model == ModelCfg(channels=(8, 16, 32), dropout=0.1)  # factory default kept
    assert cfg.tags == ["a", "b"] and cfg.resume_from is None


def test_int_accepted_for_float_and_nested_dict_override() -> None:
    cfg = load_config(TrainCfg, overrides=["lr=1", "extra.width=4", "extra.depth=2"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.extra == {"width": 4, "depth": 2}


def test_preset_inherits_from_base_key_by_key(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", {"lr": "1e-3", "steps": 10, "model": {"channels": [4, 8], "dropout": 0.2}})
    sub = tmp_path / "sub"
    sub.mkdir()
    preset = _write(sub / "child.yaml", "base: ../base.yaml\nsteps: 20\nmodel:\n  dropout: 0.5\n")
    cfg = load_config(TrainCfg, preset, ["steps=30"])
    assert (cfg.lr, cfg.steps) == (1e-3, 30)
    assert cfg.model == ModelCfg(channels=(4, 8), dropout=0.5)


def test_inheritance_cycle_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(TrainCfg, tmp_path / "a.yaml")


def test_unknown_key_suggests_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, overrides=["lrr=1e-4"])
    msg = str(e.value)
    assert "'lrr'" in msg and "Did you mean 'lr'" in msg and "steps, use_ema" in msg
    assert "override 'lrr=1e-4'" in msg


def test_unknown_nested_key_in_preset_names_the_file(tmp_path: Path) -> None:
    preset = _write(tmp_path / "p.yaml", {"model": {"chanels": [1]}})
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, preset)
    msg = str(e.value)
    assert "'model.chanels'" in msg and "Did you mean 'model.channels'" in msg
    assert "p.yaml" in msg and "dropout" in msg


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("lr=fast", ["'lr'", "float", "'fast'"]),
        ("steps=0.5", ["'steps'", "int", "0.5"]),
        ("use_ema=maybe", ["'use_ema'", "bool", "'maybe'"]),
        ("model.channels=7", ["'model.channels'", "tuple[int, ...]", "7"]),
        ("model.channels=[1,x]", ["'model.channels[1]'", "int", "'x'"]),
        ("tags=solo", ["'tags'", "list[str]", "YAML list"]),
        ("resume_from=[1]", ["'resume_from'", "str | None", "[1]"]),
        ("model=3", ["'model'", "ModelCfg", "section"]),
    ],
)
def test_bad_types_name_field_type_and_value(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, overrides=[override])
    for needle in needles:
        assert needle in str(e.value)


def test_bad_literal_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainCfg, overrides=["sampler=ood"])
    msg = str(e.value)
    assert "'sde', 'ode'" in msg and "'ood'" in msg and "Did you mean 'ode'" in msg


@pytest.mark.parametrize("override", ["lr", "=3", "--lr=3", "a..b=1", "channels=[32,64"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match="malformed override"):
        load_config(TrainCfg, overrides=[override])


def test_bad_preset_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainCfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainCfg, _write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainCfg, _write(tmp_path / "bad.yaml", "lr: [1\n"))


def test_yaml_round_trip_equals_original(tmp_path: Path) -> None:
    cfg = TrainCfg(lr=1e-5, sampler="ode", resume_from="x", tags=["a"], extra={"k": [1, 2]},
                   model=ModelCfg(channels=(3, 5), dropout=0.25))
    d = config_to_dict(cfg)
    assert d["model"]["channels"] == [3, 5]
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TrainCfg, path) == cfg
    assert config_from_dict(TrainCfg, yaml.safe_load(path.read_text())) == cfg


def test_config_from_dict_validates() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        config_from_dict(TrainCfg, {"step": 3})


def test_config_diff_dotted_keys() -> None:
    a = config_to_dict(TrainCfg())
    b = config_to_dict(TrainCfg(lr=1e-4, model=ModelCfg(channels=(1,), dropout=0.1)))
    b["new"] = 1
    assert config_diff(a, b) == {"lr": (3e-4, 1e-4), "model.channels": ([32, 64], [1]), "new": (MISSING, 1)}
    assert config_diff(TrainCfg(), TrainCfg()) == {}


def test_field_docs_and_describe() -> None:
    docs = field_docs(TrainCfg)
    assert docs["lr"] == "Peak learning rate." and docs["model"] == "The policy network."
    assert set(docs) == {f for f in TrainCfg.__dataclass_fields__}
    table = describe(TrainCfg)
    assert "model.channels" in table and "UNet channels per level." in table
    assert "'sde' | 'ode'" not in table and "one of 'sde', 'ode'" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("lr "))
    assert "float" in line and "0.0003" in line and "Peak learning rate." in line
    dropout = next(ln for ln in table.splitlines() if ln.startswith("model.dropout"))
    assert "0.1" in dropout  # the parent's default_factory value, not ModelCfg's own default

