"""Typed dataclasses from plain data (YAML): values parsed against the type hints,
unknown keys and wrong types refused with what is valid, `a.b=value` overrides.

Example:
    >>> from_dict(DataSource, {"source": "banking77", "split": "test"}).split
    'test'
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from metalm.choices import choice_error, literal_values
from metalm.data.sources import DataSource, EvalSource
from metalm.data.unlabeled import UnlabeledConfig
from metalm.errors import MetalmError, first_line
from metalm.learners import LearnerConfig, learner_class

# dataclasses that also take a plain string: the source it names
STRING_SHORTHANDS = (DataSource, EvalSource, UnlabeledConfig)
# libyaml's parser where PyYAML was built with it (~8x faster), the same safe constructor
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str) -> Any:
    """`yaml.safe_load`, on libyaml's parser when PyYAML has it."""
    return yaml.load(text, Loader=_SAFE_LOADER)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _same_kind(tp: Any, value: Any) -> bool:
    """Whether `value` has the shape of `tp` (mapping/dataclass, list, scalar)."""
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _parse(tp: Any, value: Any, where: str) -> Any:
    allowed = literal_values(tp)  # a choice field: one of its values, or what they are
    if allowed is not None:
        if value in allowed:
            return value
        raise choice_error(where, allowed, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        errors = []
        for option in inner:  # the first type that takes the value wins
            try:
                return _parse(option, value, where)
            except MetalmError as err:
                errors.append(err)
        for option, err in zip(inner, errors, strict=True):
            if _same_kind(option, value):  # e.g. a mapping for a dataclass: its own error
                raise err
        names = " or ".join(_type_name(t) for t in inner)
        raise MetalmError(f"{where}: expected {names}, got {value!r}")
    if tp is LearnerConfig or (isinstance(tp, type) and issubclass(tp, LearnerConfig)):
        return parse_learner_config(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp in STRING_SHORTHANDS:
            return tp(source=value)
        if not isinstance(value, dict):
            raise MetalmError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise MetalmError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MetalmError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {
            _parse(key_type, k, where): _parse(value_type, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise MetalmError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


@functools.cache  # a config class's fields and their types, resolved once a process
def _fields(cls: type) -> tuple[list[str], dict[str, Any]]:
    return [f.name for f in dataclasses.fields(cls)], typing.get_type_hints(cls)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise."""
    names, hints = _fields(cls)
    unknown = [k for k in data if k not in names]
    if unknown:
        raise MetalmError(f"{where}: unknown key {unknown[0]!r}; valid keys are {names}")
    kwargs = {k: _parse(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def parse_learner_config(value: Any, where: str = "learner") -> LearnerConfig:
    """The typed config of the learner named in `value["name"]`."""
    if isinstance(value, LearnerConfig):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise MetalmError(f"{where}: expected a mapping with a 'name' key, got {value!r}")
    cls = learner_class(str(value["name"])).config_class
    return from_dict(cls, value, where)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for YAML/JSON) from a config dataclass."""
    return dataclasses.asdict(config)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted(d, "a.b", 1)` sets d["a"]["b"] = 1, creating mappings on the way;
    a number indexes a list (`data.train.1.weight=2`)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(parts[:depth])
                raise MetalmError(
                    f"{key}: {where} is a list of {len(node)}; index it with "
                    f"{where}.0 .. {where}.{len(node) - 1}, or set {where}=[...] whole"
                )
            index: Any = int(part)
        else:
            index = part
            if not last and not isinstance(node.get(part), dict | list):
                node[part] = {}
        if last:
            node[index] = value
        else:
            node = node[index]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` strings; values are parsed as YAML (`5`, `true`, `[1, 2]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise MetalmError(f"override {item!r} must look like key.sub=value")
        try:
            value = safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise MetalmError(f"override {key}: value nested too deeply") from None
        if key == "learner.name" and isinstance(data.get("learner"), dict):
            # switching learner: keep only the keys the new learner knows, and of those
            # only the ones set away from the old learner's defaults (its own defaults,
            # e.g. protonet's label_names=example, are not the new learner's)
            known = {f.name for f in dataclasses.fields(learner_class(str(value)).config_class)}
            old_defaults = _learner_defaults(data["learner"].get("name"))
            data["learner"] = {
                k: v
                for k, v in data["learner"].items()
                if k in known and (k not in old_defaults or old_defaults[k] != v)
            }
        set_dotted(data, key, value)
    return data


def _learner_defaults(name: Any) -> dict[str, Any]:
    """The default values of learner `name`'s config fields ({} for an unknown name)."""
    try:
        config_class = learner_class(str(name)).config_class
    except MetalmError:
        return {}
    return {
        f.name: f.default
        for f in dataclasses.fields(config_class)
        if f.default is not dataclasses.MISSING and f.name != "name"
    }


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise MetalmError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise MetalmError(f"{path}: not a valid YAML file ({first_line(err)})") from None
    except RecursionError:
        raise MetalmError(f"{path}: YAML nested too deeply; flatten the config") from None
    except OSError as err:
        raise MetalmError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise MetalmError(f"{path}: a config file must hold a mapping at the top level")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mapping by mapping; a learner section with a name, or an
    empty mapping, replaces whole."""
    out = dict(base)
    for key, value in update.items():
        if key == "learner" and isinstance(value, dict) and "name" in value:
            out[key] = dict(value)  # a learner section replaces the default learner whole
        elif isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)  # an empty mapping replaces (`{}` means none)
        else:
            out[key] = value
    return out
