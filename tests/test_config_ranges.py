"""Valid ranges live in the config field definitions (``ranged(...)``) and are enforced where a
config is built; out-of-range and wrong-typed values on the command line give one ``error:`` line
and exit status 2, never a traceback (a property-based test over every numeric field)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffalign.cli import main
from diffalign.config import (
    MAX_SEED,
    Range,
    _hints,
    check_ranges,
    config_from_dict,
    describe,
    field_range,
    load_config,
    ranged,
)
from diffalign.data.preference import PrefDataConfig
from diffalign.errors import ConfigError
from diffalign.rewards.server import ServerConfig
from diffalign.training.preference import PreferenceConfig
from diffalign.training.pretrain import PretrainConfig
from diffalign.training.proxy import ProxyPairsConfig, ProxyTrainConfig
from diffalign.training.registry import train_classes
from diffalign.training.trainer import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (command line before the overrides, the config class it builds); nothing runs: every override
# given here is bad, so each command stops at load_config
ROOTS = {
    "train": (["train", "flow_grpo", "--out", "{tmp}/run"], TrainConfig),
    "train-preference": (["train", "seppo", "--out", "{tmp}/run"], PreferenceConfig),
    "pretrain": (["pretrain", "--out", "{tmp}/pre"], PretrainConfig),
    "proxy-pairs": (["data", "proxy-pairs", "--out", "{tmp}/pairs.pt"], ProxyPairsConfig),
    "proxy-train": (["proxy", "train", "--train", "{tmp}/none.pt", "--out", "{tmp}/p.safetensors"],
                    ProxyTrainConfig),
    "prefs": (["data", "prefs", "--out", "{tmp}/prefs"], PrefDataConfig),
}


@dataclass(frozen=True)
class NumField:
    """A numeric leaf of a config: dotted key, item type, range, and its shape."""

    key: str
    base: type  # int or float
    range: Range | None
    optional: bool
    container: str | None  # None, "tuple" (fixed length n) or "var" (tuple[X, ...])
    n: int
    default: typing.Any


def _strip_optional(tp):
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


def _numeric(tp) -> tuple[type, str | None, int] | None:
    if tp in (int, float):
        return tp, None, 1
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (tuple, list) and args:
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float):
            return args[0], "var", 1
        if all(a in (int, float) for a in args) and typing.get_origin(tp) is tuple:
            return args[0], "tuple", len(args)
        if typing.get_origin(tp) is list and args[0] in (int, float):
            return args[0], "var", 1
    return None


def numeric_fields(cls: type, prefix: str = "", instance=None) -> list[tuple[NumField, dataclasses.Field]]:
    out = []
    hints = _hints(cls)
    instance = instance if instance is not None else cls()
    for f in dataclasses.fields(cls):
        tp, optional = _strip_optional(hints[f.name])
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            out += numeric_fields(tp, f"{prefix}{f.name}.", value)
            continue
        kind = _numeric(tp)
        if kind is not None:
            base, container, n = kind
            out.append((NumField(prefix + f.name, base, field_range(f), optional, container, n, value), f))
    return out


ALL_FIELDS = {name: [nf for nf, _ in numeric_fields(cls)] for name, (_, cls) in ROOTS.items()}
SERVER_FIELDS = [nf for nf, _ in numeric_fields(ServerConfig)]


# --------------------------------------------------------------------------- declarations


def test_every_numeric_config_field_declares_a_range_and_its_default_is_in_it():
    missing = [f"{name}: {nf.key}" for name, fields in {**ALL_FIELDS, "server": SERVER_FIELDS}.items()
               for nf in fields if nf.range is None]
    assert not missing, f"numeric config fields without ranged(...): {missing}"
    for _, cls in ROOTS.values():
        check_ranges(cls())
    check_ranges(ServerConfig())


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                                          if p.parent.name != "accelerate"))
def test_shipped_presets_are_in_range(preset):
    path = CONFIGS / preset
    cls, _ = train_classes(path, [])
    check_ranges(load_config(cls, path))


def test_range_text_and_membership():
    assert str(Range(ge=1)) == ">= 1" and str(Range(gt=0)) == "> 0"
    assert str(Range(gt=0, le=1)) == "in (0, 1]" and str(Range(ge=0, lt=1)) == "in [0, 1)"
    assert str(Range(ge=0, le=MAX_SEED)) == f"in [0, {MAX_SEED}]"
    assert Range(gt=0, le=1).contains(1) and not Range(gt=0, le=1).contains(0)
    assert not Range(ge=0).contains(math.nan) and not Range(ge=0).contains(math.inf)
    with pytest.raises(TypeError, match="at most one lower bound"):
        Range(ge=0, gt=0)


@dataclass
class _Toy:
    epochs: int = ranged(3, ge=1)
    """Passes."""
    betas: tuple[float, float] = ranged((0.9, 0.99), ge=0, lt=1)
    """AdamW betas."""
    budget: float | None = ranged(None, gt=0)
    """Minutes."""


def test_ranges_are_checked_where_configs_are_built():
    with pytest.raises(ConfigError, match=r"config key 'epochs' \(Passes\) must be >= 1, got 0\."):
        config_from_dict(_Toy, {"epochs": 0})
    with pytest.raises(ConfigError, match=r"'betas' \(AdamW betas\) must be in \[0, 1\) \(each item\)"):
        load_config(_Toy, None, ["betas=[0.5,1]"])
    with pytest.raises(ConfigError, match=r"'budget' \(Minutes\) must be > 0 \(a finite number\), got nan.*"
                                          r"set by override 'budget=nan'"):
        load_config(_Toy, None, ["budget=nan"])
    assert load_config(_Toy, None, ["budget=null", "epochs=1e3"]) == _Toy(epochs=1000)
    with pytest.raises(ConfigError, match="'epochs' .*must be >= 1, got -1"):
        check_ranges(_Toy(epochs=-1))  # configs made in Python: the same check on request
    with pytest.raises(ConfigError, match="'max_batch_images' .*must be >= 1, got 0"):
        ServerConfig(max_batch_images=0)  # the reward server's flags
    table = describe(_Toy)
    assert "int, >= 1" in table and "tuple[float, float], in [0, 1)" in table and "float | None, > 0" in table


# --------------------------------------------------------------------------- the issue's rows


@pytest.mark.parametrize("override,needle", [
    ("prompts_per_epoch=0", "config key 'prompts_per_epoch' must be >= 1, got 0."),
    ("prompts_per_epoch=-2", "config key 'prompts_per_epoch' must be >= 1, got -2."),
    ("epochs=-1", "config key 'epochs' (Sample → update iterations) must be >= 1, got -1."),
])
def test_issue_rows_are_one_line_errors_with_exit_2(tmp_path, capsys, override, needle):
    assert main(["train", "flow_grpo", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run").exists()  # rejected before anything was written


# --------------------------------------------------------------------------- generative


def _num_text(x: float | int) -> str:
    return repr(x) if not isinstance(x, float) or math.isfinite(x) else {math.inf: ".inf", -math.inf: "-.inf"}.get(
        x, ".nan")


def _outside(nf: NumField) -> st.SearchStrategy:
    """Numbers outside ``nf.range`` (non-finite floats included)."""
    r, options = nf.range, []
    lo, lo_open = (r.ge, False) if r.ge is not None else (r.gt, True)
    hi, hi_open = (r.le, False) if r.le is not None else (r.lt, True)
    if nf.base is int:
        if lo is not None:
            options.append(st.integers(max_value=math.floor(lo) if lo_open else math.ceil(lo) - 1))
        if hi is not None:
            options.append(st.integers(min_value=math.ceil(hi) if hi_open else math.floor(hi) + 1))
    else:
        finite = {"allow_nan": False, "allow_infinity": False}
        if lo is not None:
            options.append(st.floats(max_value=lo, exclude_max=not lo_open, **finite))
        if hi is not None:
            options.append(st.floats(min_value=hi, exclude_min=not hi_open, **finite))
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return st.one_of(options)


_WORDS = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True).filter(lambda w: w not in {"null", "none"})


def _wrong_type(nf: NumField) -> st.SearchStrategy:
    """Override texts of the wrong type for the field."""
    texts = [_WORDS, st.just("{a: 1}"), st.just("true")]
    if nf.container is None:
        texts.append(st.just("[1, 2]"))
        if nf.base is int:
            texts.append(st.floats(0.01, 1e6).filter(lambda x: not x.is_integer()).map(repr))
    else:
        texts.append(st.just("3"))
    if not nf.optional:
        texts.append(st.just("null"))
    return st.one_of(texts)


def _bad_text(nf: NumField, data) -> str:
    if data.draw(st.booleans(), label="wrong type"):
        return data.draw(_wrong_type(nf), label="text")
    bad = _num_text(data.draw(_outside(nf), label="outside"))
    if nf.container is None:
        return bad
    items = list(nf.default) if nf.default else [1] * (nf.n if nf.container == "tuple" else 2)
    items[data.draw(st.integers(0, len(items) - 1), label="slot")] = bad
    return "[" + ", ".join(str(i) if not isinstance(i, str) else i for i in items) + "]"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_bad_numeric_values_give_one_line_error_and_exit_2(tmp_path, capsys, data):
    root = data.draw(st.sampled_from(sorted(ROOTS)), label="command")
    nf = data.draw(st.sampled_from(ALL_FIELDS[root]), label="field")
    text = _bad_text(nf, data)
    argv = [a.format(tmp=tmp_path) for a in ROOTS[root][0]] + [f"{nf.key}={text}"]
    capsys.readouterr()
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err + out, err
    assert err.startswith(f"error: config key '{nf.key}"), (argv, err)
    assert f"set by override '{nf.key}=" in err, err


def _inside(nf: NumField) -> st.SearchStrategy:
    r = nf.range
    lo, hi = (r.ge if r.ge is not None else r.gt), (r.le if r.le is not None else r.lt)
    if nf.base is int:
        return st.integers(min_value=None if lo is None else math.floor(lo) + 1 if r.gt is not None else math.ceil(lo),
                           max_value=None if hi is None else math.ceil(hi) - 1 if r.lt is not None else math.floor(hi))
    return st.floats(min_value=lo, max_value=hi, exclude_min=r.gt is not None, exclude_max=r.lt is not None,
                     allow_nan=False, allow_infinity=False)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_in_range_values_build_or_fail_with_a_config_error(data):
    root = data.draw(st.sampled_from(sorted(ROOTS)), label="command")
    nf = data.draw(st.sampled_from(ALL_FIELDS[root]), label="field")
    value = _num_text(data.draw(_inside(nf), label="value"))
    if nf.container is not None:
        value = "[" + ", ".join([value] * (nf.n if nf.container == "tuple" else 2)) + "]"
    preset = CONFIGS / "shapes" / f"{ROOTS[root][0][1]}.yaml" if root.startswith("train") else None
    try:
        load_config(ROOTS[root][1], preset, [f"{nf.key}={value}"])
    except ConfigError as e:  # a cross-field rule (e.g. sde_window within steps): still one line
        assert "\n" not in str(e)
