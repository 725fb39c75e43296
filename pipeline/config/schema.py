"""Loading and validating typed config dataclasses.

Sections are dataclasses whose fields are declared with `option(...)`: a default, a one-line
help text, optional `choices` / `ge` / `le` bounds, and what the key affects (`affects=`): the
stages whose outputs it changes (those stages hash it into their done.json), or RUNTIME (how a
stage runs or what it reports, never what a later stage reads: hashed by none). `build_section` turns a plain mapping
(YAML + dotted overrides) into a section object and raises `ConfigError` naming the full key
path and what is allowed -- never a raw traceback for a user mistake.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is meant to be shown as is."""


# What a key affects (`option(affects=...)`), besides a tuple of stage names:
RUNTIME = "runtime"   # how a stage runs (workers, retries, logging cadence, checks): no stage hashes it
OWNER = "owner"       # the stage that owns the key's section (a section class used twice, e.g. TrainConfig,
                      # names it on the root field: option(..., owner="train_prior"))


def option(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None,
           le: float | None = None, gt: float | None = None, affects: tuple[str, ...] | str | None = None,
           owner: str | None = None):
    """A config field: default, help text, allowed values (used for validation and docs) and what
    it affects. A leaf key must say `affects`; a section field may name its `owner` stage."""
    if isinstance(affects, str) and affects not in (RUNTIME, OWNER):
        affects = (affects,)
    meta = {"help": help, "choices": choices, "ge": ge, "le": le, "gt": gt, "affects": affects, "owner": owner}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def did_you_mean(name: str, allowed) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, path: str) -> Any:
    """Check `value` against the annotation `tp`; allow int->float, reject everything else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_bounds(value: Any, meta: Mapping, path: str) -> None:
    choices = meta.get("choices")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if choices is not None and item not in choices:
            raise ConfigError(
                f"{path}: {item!r} is not allowed; choose one of {', '.join(map(repr, choices))}."
                + (did_you_mean(str(item), map(str, choices)) if isinstance(item, str) else ""))
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            lo, hi, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
            if (lo is not None and item < lo) or (hi is not None and item > hi) or (gt is not None and item <= gt):
                bounds = [f">= {lo}" if lo is not None else None, f"> {gt}" if gt is not None else None,
                          f"<= {hi}" if hi is not None else None]
                raise ConfigError(f"{path}: {item!r} is out of range; allowed: {' and '.join(b for b in bounds if b)}.")


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build_section(cls, values: Mapping | None, path: str = ""):
    """Instantiate dataclass `cls` from `values`, validating every key recursively."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {type(values).__name__} {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            raise ConfigError(
                f"{join_key(path, key)}: unknown key.{did_you_mean(str(key), fields)} "
                f"Allowed keys{f' under {path!r}' if path else ''}: {', '.join(sorted(fields))}.")
    preset_hook = getattr(cls, "preset_values", None)
    if preset_hook is not None and values.get("preset"):
        merged = dict(preset_hook(values["preset"], join_key(path, "preset")))
        merged.update(values)
        values = merged
    kwargs = {}
    for name, value in values.items():
        f, tp, key_path = fields[name], hints[name], join_key(path, name)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, key_path)
            continue
        value = _coerce(value, tp, key_path)
        _check_bounds(value, f.metadata, key_path)
        kwargs[name] = value
    section = cls(**kwargs)
    validate = getattr(section, "validate", None)
    if validate is not None:
        validate(path)
    return section


def section_to_dict(section) -> dict:
    return dataclasses.asdict(section)


def leaf_fields(cls, prefix: str = ""):
    """(dotted key, type, field) of every leaf key under `cls`, nested sections flattened, in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, path + ".")
        else:
            yield path, tp, f


def key_effects(cls, prefix: str = "", owner: str | None = None) -> dict[str, tuple[str, ...]]:
    """Dotted key -> the stages whose outputs it changes (() for RUNTIME keys), from `affects=`.

    OWNER resolves to the nearest enclosing section field's `owner`; a leaf key that declares
    nothing is a programming error, reported by name."""
    effects = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            effects.update(key_effects(tp, path + ".", f.metadata.get("owner") or owner))
            continue
        affects = f.metadata.get("affects")
        if affects is None or (affects == OWNER and owner is None):
            raise TypeError(f"config key {path} does not declare what it affects (option(..., affects=...))")
        effects[path] = () if affects == RUNTIME else (owner,) if affects == OWNER else tuple(affects)
    return effects


def field_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key: `path (type, default): help` -- used by `tessera config --keys`."""
    lines = []
    for path, tp, f in leaf_fields(cls, prefix):
        extra = f" choices={list(f.metadata['choices'])}" if f.metadata.get("choices") else ""
        lines.append(f"{path} ({_type_name(tp)}, default {field_default(f)!r}{extra}): {f.metadata.get('help', '')}")
    return lines
