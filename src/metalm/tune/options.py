"""`TuneOptions`: how a study runs (its name and storage, sampler, pruner, objectives,
warm start, the final re-run), each value checked when the options are made; and
`TuneSection`, the `tune:` section of a tuning config (the options, the trial budget,
the study directory). Plain Python: the sampler and pruner names are checked here, and
`metalm.tune.study` builds the Optuna objects (importing this module does not import
Optuna).

Example:
    >>> options = TuneOptions(sampler="random", pruner="none", seed=0)
    >>> options.objectives
    ['accuracy']
    >>> TuneSection(trials=20, sampler="random").trials
    20
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from metalm.errors import MetalmError

SAMPLERS = ("random", "tpe", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "asha", "hyperband")
OBJECTIVES = {"accuracy": "maximize", "latency": "minimize", "params": "minimize"}


def check_sampler(name: str, startup_trials: int | None = None) -> None:
    """A known sampler name and a non-negative startup count, or a MetalmError."""
    if name not in SAMPLERS:
        raise MetalmError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    if startup_trials is not None and startup_trials < 0:
        raise MetalmError(
            f"tune.startup_trials (--startup-trials) must be >= 0, got {startup_trials}"
        )


def check_pruner(name: str) -> None:
    """A known pruner name, or a MetalmError."""
    if name not in PRUNERS:
        raise MetalmError(f"unknown pruner {name!r}; choose one of {list(PRUNERS)}")


def parse_objectives(text: str | Sequence[str]) -> list[str]:
    """`accuracy`, then optionally `latency` and/or `params` (a list or `a,b` text)."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown or not names or names[0] != "accuracy" or len(set(names)) != len(names):
        raise MetalmError(
            f"tune.objectives (--objectives) {','.join(names)!r}: start with accuracy, then "
            "optionally latency and/or params (e.g. accuracy,latency)"
        )
    return names


@dataclass
class TuneOptions:
    """Everything about a study but the base config, the space, the trial budget and the
    study directory (see `metalm.tune.tune`).

    `storage`: None (the journal file in the study directory), a `.journal` path or an
    RDB URL shared by workers. `startup_trials`: random trials before the model-based
    samplers take over (None: Optuna's 10). `objectives`: `accuracy`, or with `latency`
    and/or `params` an architecture search (a Pareto front). `warm_start_from`: earlier
    studies whose `warm_start_top` best configurations are tried first. `final`: re-run
    the best config and test it on meta-test. `heartbeat`: seconds between an RDB
    worker's heartbeats (a silent worker's trial is retried).
    """

    study_name: str = "metalm"
    storage: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None
    startup_trials: int | None = None
    objectives: str | list[str] = "accuracy"
    warm_start_from: list[str] = field(default_factory=list)
    warm_start_top: int = 1
    final: bool = True
    progress: bool = False
    heartbeat: int = 60

    def __post_init__(self) -> None:
        check_sampler(self.sampler, self.startup_trials)
        check_pruner(self.pruner)
        self.objectives = parse_objectives(self.objectives)
        self.warm_start_from = list(self.warm_start_from)
        if self.warm_start_top < 1:
            raise MetalmError(
                f"tune.warm_start_top (--warm-start-top) must be >= 1, got {self.warm_start_top}"
            )
        if self.heartbeat < 1:
            raise MetalmError(
                f"tune.heartbeat (--heartbeat) must be >= 1 second, got {self.heartbeat}"
            )

    @property
    def directions(self) -> list[str]:
        """`maximize`/`minimize` for each objective."""
        return [OBJECTIVES[name] for name in self.objectives]


@dataclass
class TuneSection(TuneOptions):
    """The `tune:` section of a tuning config, after `tune.key=value` overrides and the
    flags of `metalm tune` (see `metalm.tune.space.load_tune`): the `TuneOptions` fields,
    plus `trials` (finished trials to reach; required to run), `study_dir` (None:
    `output_dir/study_name`) and `arch` (search the encoder's size: a space of its own).
    """

    trials: int | None = None
    study_dir: str | None = None
    arch: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trials is not None and self.trials < 1:
            raise MetalmError(f"tune.trials (--trials) must be >= 1, got {self.trials}")
