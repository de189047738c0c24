"""A tuning YAML: the run config, the search space (its `search:` section, parsed into
typed parameters) and the study's settings (its `tune:` section: `load_tune`).

Each key of the search space is a dotted config field; its spec is one of
    {low: 1.0e-5, high: 1.0e-3, log: true}          float (linear or log)
    {low: 1, high: 5, type: int, step: 1}            int (linear or log)
    {choices: [protonet, fomaml]}                    categorical (scalars)
plus an optional condition `when: {learner.name: [fomaml, maml]}`: the parameter is only
sampled when each named parameter (earlier in the space) took one of the listed values.

Example:
    >>> space = parse_space({"train.lr": {"low": 1e-5, "high": 1e-3, "log": True}})
    >>> space.params[0].kind
    'float'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metalm.config import (
    RunConfig,
    apply_overrides,
    config_from_data,
    from_dict,
    read_yaml,
    to_dict,
)
from metalm.errors import MetalmError
from metalm.tune.options import TuneSection

SPEC_KEYS = {"low", "high", "log", "type", "step", "choices", "when"}
SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Param:
    """One searched config field."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def active(self, values: dict[str, Any]) -> bool:
        """Whether this parameter applies, given the values sampled so far."""
        return all(
            name in values and values[name] in allowed for name, allowed in self.when.items()
        )

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def example(self) -> Any:
        """A value inside the space (used to check the field exists and has the right type)."""
        if self.kind == "categorical":
            return self.choices[0]
        return int(self.low) if self.kind == "int" else float(self.low)


@dataclass(frozen=True)
class SearchSpace:
    """Parameters in sampling order (a condition only refers to earlier ones)."""

    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial) -> dict[str, Any]:
        """The values of one trial: active parameters only, in order."""
        values: dict[str, Any] = {}
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return values

    def apply(self, base: RunConfig, values: dict[str, Any]) -> RunConfig:
        """`base` with `values` applied as dotted overrides; fully validated."""
        return apply_params(base, values)


def apply_params(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """`base` with `{dotted.key: value}` applied (learner.name first), validated."""
    ordered = sorted(values.items(), key=lambda kv: kv[0] != "learner.name")
    overrides = [f"{key}={json.dumps(value)}" for key, value in ordered]
    return from_dict(RunConfig, apply_overrides(to_dict(base), overrides))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetalmError(f"{where}: expected a number, got {value!r}")
    return value


def _parse_param(name: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"search.{name}"
    if not isinstance(spec, dict):
        raise MetalmError(
            f"{where}: expected a mapping like {{low: 1, high: 5}} or {{choices: [a, b]}}, "
            f"got {spec!r}"
        )
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise MetalmError(
            f"{where}: unknown key {unknown[0]!r}; valid keys are {sorted(SPEC_KEYS)}"
        )
    when = _parse_when(spec.get("when", {}), where, earlier)
    if "choices" in spec:
        extra = sorted(set(spec) & {"low", "high", "log", "type", "step"})
        if extra:
            raise MetalmError(f"{where}: give either choices or low/high, not both ({extra[0]!r})")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise MetalmError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        for choice in choices:
            if not isinstance(choice, SCALARS):
                raise MetalmError(f"{where}.choices: choices must be scalars, got {choice!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise MetalmError(f"{where}.choices: duplicate choices in {choices!r}")
        return Param(name, "categorical", choices=tuple(choices), when=when)
    if "low" not in spec or "high" not in spec:
        raise MetalmError(f"{where}: a numeric range needs both low and high (or give choices)")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise MetalmError(f"{where}.type: expected int or float, got {kind!r}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise MetalmError(f"{where}: an int range needs whole low/high, got {low}..{high}")
    if not low < high:
        raise MetalmError(f"{where}: low must be below high, got low={low} high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise MetalmError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise MetalmError(f"{where}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0 or log:
            raise MetalmError(f"{where}.step: needs step > 0 and log: false, got {step}")
    return Param(name, kind, float(low), float(high), log, step, when=when)


def _parse_when(when: Any, where: str, earlier: dict[str, Param]) -> dict[str, tuple[Any, ...]]:
    if not isinstance(when, dict):
        raise MetalmError(f"{where}.when: expected a mapping {{param: [values]}}, got {when!r}")
    out = {}
    for key, allowed in when.items():
        if key not in earlier:
            raise MetalmError(
                f"{where}.when: {key!r} is not a parameter listed before it in the search space "
                f"(earlier: {list(earlier)})"
            )
        allowed = allowed if isinstance(allowed, list) else [allowed]
        parent = earlier[key]
        if parent.kind == "categorical":
            missing = [v for v in allowed if v not in parent.choices]
            if missing:
                raise MetalmError(
                    f"{where}.when: {missing[0]!r} is not one of {key}'s choices "
                    f"{list(parent.choices)}"
                )
        out[key] = tuple(allowed)
    return out


def parse_space(section: Any, base: RunConfig | None = None) -> SearchSpace:
    """Parse and check a `search:` mapping; with `base`, each parameter is also applied to
    it (under its conditions) to check that the field exists and takes such values."""
    if not isinstance(section, dict) or not section:
        raise MetalmError("search: expected a non-empty mapping of config fields to ranges")
    params: dict[str, Param] = {}
    for name, spec in section.items():
        if not isinstance(name, str) or not name:
            raise MetalmError(f"search: keys must be dotted config fields, got {name!r}")
        params[name] = _parse_param(name, spec, params)
    space = SearchSpace(tuple(params.values()))
    if base is not None:
        for param in space.params:
            values = {k: allowed[0] for k, allowed in param.when.items()}
            values[param.name] = param.example()
            try:
                apply_params(base, values)
            except MetalmError as err:
                raise MetalmError(
                    f"search.{param.name}: not a valid config field ({err})"
                ) from None
    return space


def split_tune_yaml(data: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """A tuning YAML is a run config plus a `search:` and a `tune:` section: (run part,
    search part, tune part)."""
    data = dict(data)
    return data, data.pop("search", None), data.pop("tune", None)


def is_tune_override(item: str) -> bool:
    """Whether the override `item` (`key=value`) sets the `tune:` section (`tune.trials=20`)."""
    key = item.partition("=")[0]
    return key == "tune" or key.startswith("tune.")


def parse_tune_section(
    section: Any,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    study_name: str = "metalm",
) -> TuneSection:
    """The `tune:` section (None: empty), then its `tune.key=value` overrides, then `flags`
    (`{key: value}` of the command-line flags given), checked as the run config is;
    `study_name` unless one is given, objectives `accuracy` (`accuracy,latency` with arch).

    Example:
        >>> parse_tune_section({"trials": 20}, ["tune.sampler=random"], {"trials": 5}).trials
        5
    """
    if section is not None and not isinstance(section, dict):
        raise MetalmError(
            f"tune: expected a mapping (trials: 20, sampler: tpe, ...), got {section!r}"
        )
    data = apply_overrides({"tune": dict(section or {})}, list(overrides or []))["tune"]
    if not isinstance(data, dict):  # an override tune=... replaced the whole section
        raise MetalmError(f"tune: expected a mapping (trials: 20, sampler: tpe, ...), got {data!r}")
    data = {**data, **(flags or {})}
    data.setdefault("study_name", study_name)
    data.setdefault("objectives", "accuracy,latency" if data.get("arch") is True else "accuracy")
    return from_dict(TuneSection, data, "tune")


def load_tune(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[RunConfig, SearchSpace | None, TuneSection]:
    """What `metalm tune` runs: the base run config (file, then overrides), the parsed
    search space (if any), and the `tune:` section (file, then the `tune.key=value`
    overrides, then `flags`, which win; see `parse_tune_section`). The study is named
    after the file unless `tune.study_name` says otherwise."""
    run_part, search, section = (
        split_tune_yaml(read_yaml(path)) if path is not None else ({}, None, None)
    )
    overrides = list(overrides or [])
    base = config_from_data(run_part, [o for o in overrides if not is_tune_override(o)])
    space = parse_space(search, base) if search is not None else None
    name = Path(path).stem if path is not None else "metalm"
    tune_overrides = [o for o in overrides if is_tune_override(o)]
    return base, space, parse_tune_section(section, tune_overrides, flags, name)


def load_tune_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> tuple[RunConfig, SearchSpace | None]:
    """The base run config (file, then overrides) and the parsed search space, if any
    (`load_tune` without the `tune:` section, which is checked all the same)."""
    base, space, _ = load_tune(path, overrides)
    return base, space


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
