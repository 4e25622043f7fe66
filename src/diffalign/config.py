"""Typed dataclass configs: YAML presets, ``key=value`` overrides, docs and diffs.

A config is a (possibly nested) dataclass whose fields each carry a docstring on the line after
them. ``load_config`` builds one from three layers, later ones winning key by key:

1. the dataclass defaults;
2. a preset YAML file — a mapping of field names, nested sections as nested mappings. A preset
   may start with ``base: other.yaml`` (relative to the preset) to inherit from another one;
3. ``key=value`` overrides from the command line, e.g. ``lr=1e-4``, ``model.channels=[32,64]``.
   Values are parsed as YAML scalars / flow collections.

Every value is checked against its field's annotation, and a numeric field's value against the
valid range its definition declares (``epochs: int = ranged(30, ge=1)``; :func:`ranged`). Unknown
keys, wrong types, out-of-range values and malformed overrides raise
:class:`~diffalign.errors.ConfigError` naming the key, where it was set, what was expected and how
to fix it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from diffalign.errors import ConfigError

__all__ = [
    "MAX_SEED",
    "MISSING",
    "Range",
    "check_ranges",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "describe",
    "field_docs",
    "field_range",
    "load_config",
    "load_yaml",
    "parse_override",
    "ranged",
    "save_config",
]

T = TypeVar("T")
BASE_KEY = "base"
"""Top-level preset key naming the preset it inherits from."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()
"""Stands for a key present on only one side of :func:`config_diff`."""


class _Problem(Exception):
    """A bad key or value at dotted ``key``; turned into a ConfigError with its origin."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclasses.dataclass(frozen=True)
class _Override:
    """An override value: its YAML parse, and the raw text for string-typed fields."""

    raw: str
    parsed: Any


# --------------------------------------------------------------------------- type helpers


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__} ({e}); define config dataclasses "
            "at module level and import every type their annotations name"
        ) from e


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if args else origin.__name__
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    """A deep copy with override wrappers replaced by their parsed values."""
    if isinstance(value, _Override):
        return value.parsed
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return copy.deepcopy(value)


def _describe_value(value: Any) -> str:
    value = _plain(value)
    return f"{value!r} ({type(value).__name__})"


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


# --------------------------------------------------------------------------- coercion


def _bad(key: str, tp: Any, value: Any, hint: str = "") -> _Problem:
    msg = f"config key {key!r} expects {_type_name(tp)}, got {_describe_value(value)}."
    return _Problem(key, msg + (f" {hint}" if hint else ""))


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (e.g. "1e-4" → 1e-4)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key, default)
    if origin is Literal:
        return _coerce_literal(value, tp, key)
    if isinstance(value, _Override):
        value = value.raw if tp is str and _is_plain_scalar(value.parsed) else value.parsed
    if tp is Any or tp is object:
        return _plain(value)
    if _is_dataclass_type(tp):
        return _coerce_dataclass(value, tp, key, default)
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        return _coerce_container(value, tp, key)
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar(value, tp, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(key, tp, value)


def _is_plain_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _coerce_union(value: Any, tp: Any, key: str, default: Any) -> Any:
    members = get_args(tp)
    parsed = value.parsed if isinstance(value, _Override) else value
    if parsed is None and type(None) in members:
        return None
    problems = []
    for member in (m for m in members if m is not type(None)):
        try:
            return _coerce(value, member, key, default)
        except _Problem as p:
            problems.append(p)
    if len(problems) == 1:  # X | None: keep X's more specific hint
        p = problems[0]
        if p.key == key:
            p.message = p.message.replace(f"expects {_type_name(members[0])}", f"expects {_type_name(tp)}", 1)
        raise p
    raise _bad(key, tp, parsed)


def _coerce_literal(value: Any, tp: Any, key: str) -> Any:
    choices = get_args(tp)
    candidates = [value.parsed, value.raw] if isinstance(value, _Override) else [value]
    for candidate in candidates:
        for choice in choices:
            if candidate == choice and type(candidate) is type(choice):
                return choice
    shown = candidates[0]
    hint = _closest(shown, [c for c in choices if isinstance(c, str)]) if isinstance(shown, str) else ""
    options = ", ".join(repr(c) for c in choices)
    raise _Problem(key, f"config key {key!r} must be one of {options}; got {shown!r}.{hint}")


def _coerce_dataclass(value: Any, tp: type, key: str, default: Any) -> Any:
    if isinstance(value, tp):
        return value
    if not isinstance(value, Mapping):
        raise _bad(key, tp, value, f"{key!r} is a section: give a mapping of its fields "
                                   f"(or set one field with {key}.FIELD=VALUE).")
    base = default if isinstance(default, tp) else None
    return _build(tp, value, prefix=f"{key}.", base=base)


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp) or tp
    args = get_args(tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value, f"Write a mapping, e.g. {key}={{a: 1}}.")
        if not args:
            return _plain(dict(value))
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise _bad(key, tp, value, f"Write a YAML list, e.g. {key}=[1,2].")
    if origin is list:
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_tuple(value, tp, key, args)


def _coerce_tuple(value: Sequence, tp: Any, key: str, args: tuple) -> tuple:
    if not args:
        return tuple(_plain(list(value)))
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise _bad(key, tp, value, f"It needs exactly {len(args)} items.")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _to_int(value: Any, tp: Any, key: str) -> int:
    if isinstance(value, bool):
        raise _bad(key, tp, value)
    if isinstance(value, int):
        return value
    try:
        number = _to_float(value, float, key)
    except _Problem:
        number = None
    if number is not None and number.is_integer():
        return int(number)
    raise _bad(key, tp, value, "Give a whole number, e.g. 100 or 1e4.")


def _to_float(value: Any, tp: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _bad(key, tp, value, "Give a number, e.g. 3e-4 or 0.5.")


_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}


def _to_bool(value: Any, tp: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(key, tp, value, "Write true or false.")


def _to_str(value: Any, tp: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _bad(key, tp, value, "Quote it if it should be text.")


def _to_path(value: Any, tp: Any, key: str) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise _bad(key, tp, value)


def _to_none(value: Any, tp: Any, key: str) -> None:
    if value is None:
        return None
    raise _bad(key, tp, value, "Write null.")


_SCALARS: dict[Any, Any] = {
    int: _to_int, float: _to_float, bool: _to_bool, str: _to_str, Path: _to_path, type(None): _to_none,
}


# --------------------------------------------------------------------------- valid ranges

RANGE_KEY = "range"
"""``dataclasses.field`` metadata key holding a numeric field's :class:`Range`."""
MAX_SEED = 2**32 - 1
"""Largest seed a config accepts (numpy's seed range; seeds are combined into larger draws)."""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field: finite numbers within the given bounds
    (``ge``/``gt`` below, ``le``/``lt`` above; None = unbounded). A tuple or list value is checked
    item by item; None (an optional field left unset) always passes."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise TypeError("a Range takes at most one lower bound (ge or gt) and one upper bound (le or lt)")

    def __str__(self) -> str:
        lo, hi = _first(self.ge, self.gt), _first(self.le, self.lt)
        if lo is not None and hi is not None:
            left, right = ("[" if self.ge is not None else "("), ("]" if self.le is not None else ")")
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'>=' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'<=' if self.le is not None else '<'} {_num(hi)}"
        return "a finite number"

    def contains(self, x: float) -> bool:
        """Whether the number ``x`` is finite and within the bounds."""
        return (math.isfinite(x) and (self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))


def _first(a: float | None, b: float | None) -> float | None:
    return a if a is not None else b


def ranged(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose valid range lives in its definition, enforced whenever a config is
    built from YAML or ``key=value`` (and by :func:`check_ranges`)::

        epochs: int = ranged(30, ge=1)
        lr: float = ranged(1e-4, gt=0)
        rate: float = ranged(0.25, ge=0, le=1)
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE_KEY: Range(ge=ge, gt=gt, le=le, lt=lt)})


def field_range(f: dataclasses.Field) -> Range | None:
    """The :class:`Range` a field declares, or None."""
    return f.metadata.get(RANGE_KEY)


def _short_doc(cls: type, name: str) -> str:
    doc = field_docs(cls).get(name, "").split("\n\n")[0]
    doc = " ".join(doc.replace("``", "").split())
    return f" ({doc.rstrip('.')})" if doc and len(doc) <= 90 else ""


def _check_range(cls: type, f: dataclasses.Field, value: Any, key: str) -> None:
    """Raise a _Problem when the coerced ``value`` of field ``f`` lies outside its declared range."""
    rng = field_range(f)
    if rng is None or value is None:
        return
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    bad = [v for v in numbers if not rng.contains(v)]
    if not bad:
        return
    each = " (each item)" if isinstance(value, (list, tuple)) else ""
    finite = " (a finite number)" if not all(math.isfinite(v) for v in bad) else ""
    raise _Problem(key, f"config key {key!r}{_short_doc(cls, f.name)} must be {rng}{each}{finite}, "
                        f"got {_plain(value)!r}.")


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Check every field of a config instance (nested sections too) against its declared range;
    :class:`ConfigError` names the first field out of range. ``load_config`` and
    ``config_from_dict`` do this already; call it on configs made in Python."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"expected a config dataclass instance, got {cfg!r}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, f"{prefix}{f.name}.")
            continue
        try:
            _check_range(type(cfg), f, value, prefix + f.name)
        except _Problem as p:
            raise ConfigError(p.message) from None


# --------------------------------------------------------------------------- building


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unknown_key(cls: type, name: str, prefix: str) -> _Problem:
    valid = list(_init_fields(cls))
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f" Did you mean {prefix + match[0]!r}?" if match else ""
    section = f"section {prefix[:-1]!r} ({cls.__name__})" if prefix else cls.__name__
    return _Problem(
        f"{prefix}{name}",
        f"unknown config key {prefix + str(name)!r}.{hint} Valid keys of {section}: {', '.join(valid)}.",
    )


def _build(cls: type[T], data: Any, prefix: str = "", base: T | None = None) -> T:
    """Make a ``cls`` from mapping ``data``; missing fields come from ``base`` or the defaults."""
    if not isinstance(data, Mapping):
        raise _Problem(prefix[:-1] or "<root>", f"a {cls.__name__} config must be a mapping of its "
                                                f"fields, got {_describe_value(data)}.")
    fields, hints = _init_fields(cls), _hints(cls)
    for name in data:
        if name not in fields:
            raise _unknown_key(cls, name, prefix)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            default = getattr(base, name) if base is not None else _field_default(f)
            kwargs[name] = _coerce(data[name], hints[name], prefix + name, default)
            _check_range(cls, f, kwargs[name], prefix + name)
        elif base is None and _field_default(f) is dataclasses.MISSING:
            raise _Problem(prefix + name, f"config key {prefix + name!r} is required "
                                          f"({_type_name(hints[name])}); set it in the preset or "
                                          f"with {prefix + name}=VALUE.")
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate a ``cls`` config from a (nested) mapping, e.g. a loaded config.yaml."""
    _require_dataclass(cls)
    try:
        return _build(cls, data)
    except _Problem as p:
        raise ConfigError(p.message) from None


def _require_dataclass(cls: Any) -> None:
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


# --------------------------------------------------------------------------- presets and overrides


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (empty file → ``{}``), with ConfigErrors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}. Check the path (relative paths start "
                          f"from {Path.cwd()}).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys (key: value lines), "
                          f"got {type(data).__name__}.")
    return data


def _load_preset(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"preset inheritance cycle: {cycle}. Remove one of the `base:` keys.")
    data = load_yaml(path)
    merged: dict[str, Any] = {}
    if BASE_KEY in data:
        base = data.pop(BASE_KEY)
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `base:` must be a preset file name, got {_describe_value(base)}.")
        merged = _load_preset(path.parent / base, origins, (*chain, path))
    for key in _leaf_keys(data):
        origins[key] = f"preset {path}"
    return _merge(merged, data)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b=value"`` into ``(["a", "b"], parsed_value)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    parts = [p.strip() for p in key.split(".")]
    fix = "Write overrides as key=value, e.g. lr=1e-4 or model.channels=[32,64]."
    if not sep or not all(parts):
        raise ConfigError(f"malformed override {text!r}: expected key=value. {fix}")
    if parts[0].startswith("-"):
        raise ConfigError(f"malformed override {text!r}: overrides take no dashes. {fix}")
    try:
        parsed = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(e).splitlines()[0]
        raise ConfigError(f"malformed override {text!r}: the value is not valid YAML ({problem}). "
                          f"Quote text values and close brackets, e.g. key=[1,2].") from None
    return parts, _Override(raw.strip(), parsed)


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = dict(node[part]) if isinstance(node.get(part), Mapping) else {}
        node = node[part]
    node[parts[-1]] = value


def _origin_of(key: str, origins: Mapping[str, str]) -> str | None:
    parts = key.replace("[", ".[").split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n]).replace(".[", "[")
        if candidate in origins:
            return origins[candidate]
    return next((where for k, where in origins.items() if k.startswith(key + ".")), None)


def load_config(cls: type[T], preset: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the ``preset`` YAML (with its ``base:`` chain), then ``overrides``.

    >>> load_config(PretrainConfig, "configs/shapes/pretrain.yaml", ["lr=1e-4", "channels=[32,64]"])
    """
    _require_dataclass(cls)
    if isinstance(overrides, str):
        overrides = [overrides]
    origins: dict[str, str] = {}
    data = _load_preset(Path(preset), origins) if preset is not None else {}
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(data, parts, value)
        origins[".".join(parts)] = f"override {text!r}"
    try:
        return _build(cls, data)
    except _Problem as p:
        where = _origin_of(p.key, origins)
        raise ConfigError(p.message + (f" (set by {where})" if where else "")) from None


# --------------------------------------------------------------------------- export and comparison


def config_to_dict(cfg: Any) -> Any:
    """A plain, JSON/YAML-safe copy: dataclasses → dicts, tuples → lists, paths → strings."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` (a dataclass or mapping) as YAML, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
    tmp.replace(path)
    return path


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_diff(a: Mapping[str, Any] | Any, b: Mapping[str, Any] | Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: ``{"train.lr": (1e-4, 3e-4)}``; one-sided keys get MISSING."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    keys = sorted(fa.keys() | fb.keys())
    diff = {k: (fa.get(k, MISSING), fb.get(k, MISSING)) for k in keys}
    return {k: v for k, v in diff.items() if v[0] is MISSING or v[1] is MISSING or v[0] != v[1]}


# --------------------------------------------------------------------------- documentation


def _class_docs(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal on the line after it), by field name."""
    _require_dataclass(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_class_docs(klass))
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}


def _rows(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str]]:
    """One row per field; nested sections show the defaults of the parent's default instance."""
    rows = []
    docs, hints = field_docs(cls), _hints(cls)
    for name, f in _init_fields(cls).items():
        tp = hints[name]
        default = getattr(instance, name) if instance is not None else _field_default(f)
        shown = "(required)" if default is dataclasses.MISSING else repr(config_to_dict(default))
        doc = " ".join(docs.get(name, "").split())
        if _is_dataclass_type(tp):
            rows.append((prefix + name, _type_name(tp), "", doc))
            rows += _rows(tp, f"{prefix}{name}.", default if isinstance(default, tp) else None)
        else:
            rng = field_range(f)
            rows.append((prefix + name, _type_name(tp) + (f", {rng}" if rng else ""), shown, doc))
    return rows


def describe(cls: type) -> str:
    """A ``--help`` style table of every key (nested ones dotted): name, type (and valid range),
    default, doc."""
    _require_dataclass(cls)
    rows = [("key", "type", "default", "description"), *_rows(cls)]
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((40, 30, 24))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    return "\n".join(lines)
