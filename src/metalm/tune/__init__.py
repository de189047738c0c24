"""Meta-parameter search on Optuna: the search space and the study's settings in the YAML
(its `search:` and `tune:` sections), pruning, embedded or RDB storage shared by many
workers, warm start, and architecture search (Pareto front).

Example:
    >>> from metalm.tune import TuneOptions, load_tune_config, tune
    >>> base, space = load_tune_config("configs/tune_protonet.yaml", tiny)  # + overrides
    >>> result = tune(base, space, 2, "runs/tune-protonet",
    ...               TuneOptions(pruner="median"))  # doctest: +ELLIPSIS
    study 'metalm' in runs/tune-protonet: 0/2 finished, running up to 2 more
    trial 0 complete: value ...
    re-running the best config and testing it on the meta-test episodes
"""

from typing import TYPE_CHECKING, Any

from metalm.tune.options import TuneOptions, TuneSection
from metalm.tune.space import Param, SearchSpace, load_tune, load_tune_config, parse_space

if TYPE_CHECKING:
    from metalm.tune.tuner import TuneResult, tune

__all__ = [
    "Param",
    "SearchSpace",
    "TuneOptions",
    "TuneResult",
    "TuneSection",
    "load_tune",
    "load_tune_config",
    "parse_space",
    "tune",
]


def __getattr__(name: str) -> Any:
    """`tune` and `TuneResult` on first use: they import Optuna, the options do not."""
    if name in ("TuneResult", "tune"):
        from metalm.tune import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
