"""Typed run configuration: dataclasses, YAML files, `a.b=value` overrides.

Unknown keys and wrong types are errors that list what is valid.

Example:
    >>> cfg = load_config(None, ["learner.name=frozen", "train.steps=0"])
    >>> cfg.learner.name, cfg.train.steps
    ('frozen', 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metalm.data.episodes import _range
from metalm.data.sources import DataSource, EvalSource
from metalm.data.unlabeled import UnlabeledConfig
from metalm.errors import MetalmError
from metalm.learners import (
    FinetuneConfig,
    FrozenConfig,
    LearnerConfig,
    ProtoNetConfig,
    learner_class,
)
from metalm.models.encoder import EncoderConfig

DEMO_CONFIG = Path(__file__).parent / "recipes" / "demo.yaml"
"""The recipe `metalm demo` runs (the best one measured in BENCHMARKS.md)."""


@dataclass
class ClassesConfig:
    """How classes are split into meta-train / meta-val / meta-test (disjoint).

    `fractions` cut the training source's classes (seeded by `seed`); explicit lists,
    when given, win. When the test source is another dataset, all its classes are test.
    """

    fractions: list[float] = field(default_factory=lambda: [0.8, 0.2, 0.0])
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class DataConfig:
    """Where tasks come from. `val`/`test` default to the (first) training source.

    `train` is one source or a list (a task mixture): each episode draws its classes
    from one source, chosen by the sources' `weight`, and each source's classes are
    split into meta-train/val/test on their own. `test` may also pair a `support` and a
    `query` source of your own (the full-way protocol on them, see `EvalSource`).
    `unlabeled` adds tasks made from texts without labels (see `UnlabeledConfig`); with
    `train: []` they are the only tasks (no meta-val classes; `test` may then be null,
    with no test protocols).
    """

    train: DataSource | list[DataSource] = field(
        default_factory=lambda: DataSource("clinc150", "train")
    )
    val: DataSource | None = None
    test: EvalSource | None = field(default_factory=lambda: EvalSource("banking77", "test"))
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    drop_small_classes: bool = False
    unlabeled: UnlabeledConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            if not self.train and self.unlabeled is None:
                raise MetalmError(
                    "data.train is an empty list; give at least one labeled source, or "
                    "data.unlabeled to meta-train on texts without labels"
                )
            if len(self.train) > 1 and self.val is not None:
                raise MetalmError(
                    "data.val works with one training source; with a list, each source's "
                    "own meta-val classes are used: drop data.val"
                )

    @property
    def train_sources(self) -> list[DataSource]:
        """The labeled training sources, as a list."""
        return list(self.train) if isinstance(self.train, list) else [self.train]


@dataclass
class EpisodeConfig:
    """Shape of meta-training episodes: N-way K-shot with Q queries per class.

    `n_way`: a number, `all` (every class of the source in each episode: the prototype
    loss over the whole label space) or a range `[min, max]` drawn per episode (capped
    at the source's classes); `k_shot`: a number or a range, as in Meta-Dataset.
    `hard_negatives`: the share of episodes made of an anchor class and classes among its
    nearest (class centroids under the current encoder, recomputed every
    `hard_refresh_every` steps).
    """

    n_way: int | str | list[int] = 5
    k_shot: int | list[int] = 5
    q_queries: int = 5
    hard_negatives: float = 0.0
    hard_refresh_every: int = 100

    def __post_init__(self) -> None:
        if self.n_way != "all":
            if isinstance(self.n_way, str):
                raise MetalmError(
                    f"episode.n_way must be a number, 'all' or [min, max], got {self.n_way!r}"
                )
            _range("episode.n_way", self.n_way, 2)
        _range("episode.k_shot", self.k_shot, 1)
        _range("episode.q_queries", self.q_queries, 1)
        if not 0.0 <= self.hard_negatives <= 1.0:
            raise MetalmError(
                f"episode.hard_negatives must be a share in [0, 1], got {self.hard_negatives}"
            )
        if self.hard_refresh_every < 1:
            raise MetalmError(
                f"episode.hard_refresh_every must be >= 1, got {self.hard_refresh_every}"
            )


@dataclass
class TrainConfig:
    """The outer loop. `steps=0` skips meta-training (evaluation only)."""

    steps: int = 300
    meta_batch_size: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 30
    schedule: str = "linear"
    grad_clip: float = 1.0
    eval_every: int = 50
    val_episodes: int = 100
    # validation episodes: harder than training ones by default, so that the choice of
    # the best checkpoint is not decided by noise on near-perfect scores; `val_n_way` is
    # capped at the number of meta-val classes
    val_n_way: int = 20
    val_k_shot: int = 1
    val_q_queries: int = 5
    patience: int = 0
    # keep the weights with the best validation accuracy (true), or the last ones (false:
    # validation is only logged; e.g. when the meta-val classes come from another domain
    # than the one the unlabeled tasks adapt the encoder to)
    select_best: bool = True
    checkpoint_every: int = 50
    tensorboard: bool = True
    # hypergradient descent on the learning rate (Baydin et al. 2018): the step size β of
    # the rate's own updates; 0 keeps the rate fixed (apart from the schedule).
    # multiplicative: rate *= 1 + β·cos(g_t, u_{t-1}) (β relative, e.g. 0.01);
    # additive: rate += β·g_t·u_{t-1} (β's scale depends on the model's size)
    hypergradient_lr: float = 0.0
    hypergradient_rule: str = "multiplicative"


@dataclass
class SettingConfig:
    """One episodic evaluation setting."""

    n_way: int = 5
    k_shot: int = 1


@dataclass
class EvalConfig:
    """Test protocol: `episodes` fixed test episodes per setting, full-way K-shot splits,
    and baseline learners evaluated on the very same tasks."""

    episodes: int = 600
    q_queries: int = 15
    settings: list[SettingConfig] = field(
        default_factory=lambda: [SettingConfig(5, 1), SettingConfig(5, 5)]
    )
    full_way_shots: list[int] = field(default_factory=lambda: [5])
    baselines: list[LearnerConfig] = field(
        default_factory=lambda: [FrozenConfig(), FinetuneConfig()]
    )
    # per-task fine-tuning costs seconds per task on a CPU: fewer episodes by default
    episodes_by_method: dict[str, int] = field(default_factory=lambda: {"finetune": 30})
    seed: int = 1234


@dataclass
class RunConfig:
    """Everything one run needs; saved beside its results as `config.yaml`."""

    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    learner: LearnerConfig = field(default_factory=ProtoNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- parsing -------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _same_kind(tp: Any, value: Any) -> bool:
    """Whether `value` has the shape of `tp` (mapping/dataclass, list, scalar)."""
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and isinstance(value, origin)


def _parse(tp: Any, value: Any, where: str) -> Any:
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
        if isinstance(value, str) and tp in (DataSource, EvalSource, UnlabeledConfig):
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


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
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
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise MetalmError(f"override {key}: value nested too deeply") from None
        if key == "learner.name" and isinstance(data.get("learner"), dict):
            # switching learner: keep only the keys the new learner knows
            known = {f.name for f in dataclasses.fields(learner_class(str(value)).config_class)}
            data["learner"] = {k: v for k, v in data["learner"].items() if k in known}
        set_dotted(data, key, value)
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise MetalmError(f"{path}: no such config file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise MetalmError(f"{path}: not a valid YAML file ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise MetalmError(f"{path}: YAML nested too deeply; flatten the config") from None
    except OSError as err:
        raise MetalmError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise MetalmError(f"{path}: a config file must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path`, then `overrides`; fully validated."""
    return config_from_data(read_yaml(path) if path is not None else {}, overrides)


def config_from_data(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the mapping `data` (as read from a YAML file), then `overrides`."""
    merged = _merge(to_dict(RunConfig()), data)
    return from_dict(RunConfig, apply_overrides(merged, list(overrides or [])))


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if key == "learner" and isinstance(value, dict) and "name" in value:
            out[key] = dict(value)  # a learner section replaces the default learner whole
        elif isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)  # an empty mapping replaces (`{}` means none)
        else:
            out[key] = value
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
