"""The objective: a trial's values as overrides of the base config, meta-training with a
pruning callback, and the best meta-val accuracy (the meta-test classes are never used).

Example:
    >>> from metalm.tune import TuneOptions, load_tune_config
    >>> from metalm.tune.study import open_study
    >>> base, space = load_tune_config("configs/tune_protonet.yaml", tiny)
    >>> study = open_study("runs/tune", TuneOptions(seed=0))
    >>> objective = Objective(base, space, "runs/tune")
    >>> study.optimize(objective, n_trials=1)
    >>> 0.0 <= study.best_value <= 1.0
    True
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import optuna

from metalm import distributed
from metalm.config import RunConfig
from metalm.errors import MetalmError
from metalm.runs.directory import remove_weights
from metalm.runs.trial import meta_train
from metalm.tune.space import SearchSpace, apply_params
from metalm.tune.study import mark_worker

TRIALS_DIR = "trials"


def pruning_callback(trial: optuna.Trial):
    """A MetaTrainer `on_validation` callback: report, and stop the trial if hopeless."""

    def report(step: int, accuracy: float) -> None:
        trial.report(accuracy, step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", step)
            raise optuna.TrialPruned(f"pruned at step {step} (val accuracy {accuracy:.4f})")

    return report


def trial_config(base: RunConfig, values: dict, study_dir: str | Path, number: int) -> RunConfig:
    config = apply_params(base, values)
    config.output_dir = str(Path(study_dir) / TRIALS_DIR)
    config.run_name = f"trial-{number:04d}"
    return config


class Objective:
    """Callable for `study.optimize`: returns val accuracy, or (accuracy, latency_ms |
    parameter count, ...) for an architecture search."""

    def __init__(
        self,
        base: RunConfig,
        space: SearchSpace,
        study_dir: str | Path,
        objectives: Sequence[str] = ("accuracy",),
        progress: bool = False,
        keep_weights: bool = False,
    ):
        self.base = base
        self.space = space
        self.study_dir = Path(study_dir)
        self.objectives = list(objectives)
        self.progress = progress
        self.keep_weights = keep_weights

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        mark_worker(trial)
        values = self.space.suggest(trial)
        config = trial_config(self.base, values, self.study_dir, trial.number)
        run_dir = Path(config.output_dir) / config.run_name
        if run_dir.exists():  # trial numbers are unique: only a crashed copy could be here
            shutil.rmtree(run_dir)
        callbacks = [pruning_callback(trial)] if len(self.objectives) == 1 else []
        try:
            distributed.announce("trial", (config, run_dir))  # under torchrun: all ranks train
            learner, result = meta_train(config, run_dir, self.progress, callbacks)
            accuracy = result.best_val_accuracy
            if accuracy is None or math.isnan(accuracy):
                raise MetalmError("no validation accuracy (no meta-val episodes?)")
            trial.set_user_attr("best_step", result.best_step)
            trial.set_user_attr("run_dir", str(run_dir))
            if len(self.objectives) == 1:
                return float(accuracy)
            from metalm.tune.arch import measure

            measured = measure(learner, config)
            for key, value in measured.items():
                trial.set_user_attr(key, value)
            return (float(accuracy), *(measured[name] for name in self.objectives[1:]))
        finally:
            if not self.keep_weights:
                remove_weights(run_dir)
