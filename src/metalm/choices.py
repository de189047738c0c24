"""Choice fields: a config field typed `Literal[...]` takes one of those values, and one
check says so (`check_choices`, run by each config's `__post_init__`; the YAML parser
gives the same message with the value's place in the file).

Example:
    >>> @dataclasses.dataclass
    ... class Pooling:
    ...     pooling: Literal["mean", "cls"] = "mean"
    >>> check_choices(Pooling(pooling="max"), "model")
    Traceback (most recent call last):
    metalm.errors.MetalmError: model.pooling must be one of mean, cls; got 'max'
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal

from metalm.errors import MetalmError


def literal_values(tp: Any) -> tuple[Any, ...] | None:
    """The values a `Literal[...]` type allows (with None when it is optional), or None
    when `tp` is no choice."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [literal_values(t) for t in typing.get_args(tp) if t is not type(None)]
        if len(parts) == 1 and parts[0] is not None:
            return (*parts[0], None) if type(None) in typing.get_args(tp) else parts[0]
    return None


def choice_error(where: str, allowed: tuple[Any, ...], value: Any) -> MetalmError:
    shown = ", ".join("null" if a is None else str(a) for a in allowed)
    return MetalmError(f"{where} must be one of {shown}; got {value!r}")


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    hints = typing.get_type_hints(cls)
    found = ((f.name, literal_values(hints[f.name])) for f in dataclasses.fields(cls))
    return tuple((name, allowed) for name, allowed in found if allowed is not None)


def check_choices(config: Any, section: str) -> None:
    """Raise a `MetalmError` naming `section.field` and the valid values when a choice
    field of dataclass `config` holds another value."""
    for name, allowed in _choice_fields(type(config)):
        value = getattr(config, name)
        if value not in allowed:
            raise choice_error(f"{section}.{name}", allowed, value)
