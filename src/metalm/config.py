"""Typed run configuration: the dataclasses, each checking its own values when built
(a bad value fails at load time and says what is valid), loaded from defaults, a YAML
file and `a.b=value` overrides (parsing: `metalm.parsing`).

Example:
    >>> cfg = load_config(None, ["learner.name=frozen", "train.steps=0"])
    >>> cfg.learner.name, cfg.train.steps
    ('frozen', 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metalm.choices import check_choices
from metalm.data.episodes import _range
from metalm.data.overlap import DEFAULT_SIMILARITY
from metalm.data.sources import DataSource, EvalSource
from metalm.data.splits import check_fractions
from metalm.data.unlabeled import UnlabeledConfig
from metalm.errors import MetalmError
from metalm.hypergrad import check_hypergradient
from metalm.learners import FinetuneConfig, FrozenConfig, LearnerConfig, ProtoNetConfig
from metalm.models.base import EncoderConfig
from metalm.parsing import (
    apply_overrides,
    from_dict,
    merge,
    parse_learner_config,
    read_yaml,
    set_dotted,
    to_dict,
)

__all__ = [
    "DEMO_CONFIG",
    "TUNE_SECTIONS",
    "ClassesConfig",
    "DataConfig",
    "EncoderConfig",
    "EpisodeConfig",
    "EvalConfig",
    "RunConfig",
    "SettingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_data",
    "from_dict",
    "load_config",
    "parse_learner_config",
    "read_yaml",
    "save_config",
    "set_dotted",
    "to_dict",
]

DEMO_CONFIG = Path(__file__).parent / "recipes" / "demo.yaml"
"""The recipe `metalm demo` runs (the best one measured in BENCHMARKS.md)."""
TUNE_SECTIONS = ("search", "tune")
"""The sections of a tuning config beside the run config's (the search space, the study's
settings: `metalm.tune.space`); other commands skip them, so a study's base config runs
with `metalm train -c` as it is."""


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
    # a strict split: meta-train and meta-val lose every class whose name or near-name is
    # a test class's (same words, one name's words inside the other's, or names whose
    # embeddings are at least `name_similarity` alike; null: names and words only).
    # See metalm.data.overlap; `metalm overlap` lists them.
    strict: bool = False
    name_similarity: float | None = DEFAULT_SIMILARITY

    def __post_init__(self) -> None:
        if not (self.train or self.val or self.test):  # explicit lists win over fractions
            check_fractions(self.fractions, "data.classes.fractions")
        if self.name_similarity is not None and not 0 < self.name_similarity <= 1:
            raise MetalmError(
                "data.classes.name_similarity must be in (0, 1] (a cosine similarity) or "
                f"null (names and words only), got {self.name_similarity}"
            )


@dataclass
class DataConfig:
    """Where tasks come from. `val`/`test` default to the (first) training source.

    `train` is one source or a list (a task mixture): each episode draws its classes
    from one source, chosen by the sources' `weight`, and each source's classes are
    split into meta-train/val/test on their own. `test` may also pair a `support` and a
    `query` source of your own (the full-way protocol on them, see `EvalSource`).
    `unlabeled` adds tasks made from texts without labels (see `UnlabeledConfig`), one
    source or a list (each with its own weight and tasks); with
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
    unlabeled: UnlabeledConfig | list[UnlabeledConfig] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            if not self.train and not self.unlabeled_sources:
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

    @property
    def unlabeled_sources(self) -> list[UnlabeledConfig]:
        """The sources of texts without labels, as a list (each makes its own tasks)."""
        if self.unlabeled is None:
            return []
        return list(self.unlabeled) if isinstance(self.unlabeled, list) else [self.unlabeled]


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
    """The outer loop. `steps=0` skips meta-training (evaluation only). `schedule`:
    `linear` or `cosine` decay after `warmup_steps`, or `constant`."""

    steps: int = 300
    meta_batch_size: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 30
    schedule: Literal["linear", "cosine", "constant"] = "linear"
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
    hypergradient_rule: Literal["additive", "multiplicative"] = "multiplicative"
    # seconds a rank of a data-parallel run waits for the others (the process group's
    # timeout): long enough for rank 0 to evaluate alone while the others wait
    dist_timeout: float = 7200.0

    def __post_init__(self) -> None:
        check_choices(self, "train")
        if not self.dist_timeout > 0:
            raise MetalmError(f"train.dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.steps < 0:
            raise MetalmError(f"train.steps must be >= 0, got {self.steps}")
        for name in ("meta_batch_size", "eval_every", "checkpoint_every", "val_episodes"):
            if getattr(self, name) < 1:
                raise MetalmError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "warmup_steps", "patience"):
            if getattr(self, name) < 0:
                raise MetalmError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        _range("train.val_n_way", self.val_n_way, 2)
        _range("train.val_k_shot", self.val_k_shot, 1)
        _range("train.val_q_queries", self.val_q_queries, 1)
        check_hypergradient(
            self.hypergradient_lr,
            self.hypergradient_rule,
            ("train.hypergradient_lr", "train.hypergradient_rule"),
        )


@dataclass
class SettingConfig:
    """One episodic evaluation setting."""

    n_way: int = 5
    k_shot: int = 1

    def __post_init__(self) -> None:
        _range("eval.settings.n_way", self.n_way, 2)
        _range("eval.settings.k_shot", self.k_shot, 1)


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

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise MetalmError(f"eval.episodes must be >= 1, got {self.episodes}")
        _range("eval.q_queries", self.q_queries, 1)
        for shots in self.full_way_shots:
            if shots < 1:
                raise MetalmError(f"eval.full_way_shots must be >= 1 each, got {shots}")
        for method, count in self.episodes_by_method.items():
            if count < 1:
                raise MetalmError(f"eval.episodes_by_method.{method} must be >= 1, got {count}")


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path` (less the sections only `metalm tune` reads,
    `TUNE_SECTIONS`), then `overrides`; fully validated."""
    data = read_yaml(path) if path is not None else {}
    return config_from_data({k: v for k, v in data.items() if k not in TUNE_SECTIONS}, overrides)


def config_from_data(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the mapping `data` (as read from a YAML file), then `overrides`."""
    merged = merge(to_dict(RunConfig()), data)
    return from_dict(RunConfig, apply_overrides(merged, list(overrides or [])))


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
