"""`metalm.tune.objective`: trials report validations and prune."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState
from tuning import TINY_SEARCH, tiny_base

from metalm.tune import TuneOptions, parse_space
from metalm.tune.objective import Objective
from metalm.tune.study import open_study


class _PruneAtFirstReport(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return bool(trial.intermediate_values)


def test_pruning_stops_training(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 9, "train.eval_every": 3})
    space = parse_space(TINY_SEARCH, base)
    study = optuna.create_study(direction="maximize", pruner=_PruneAtFirstReport())
    study.optimize(Objective(base, space, tmp_path / "study"), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [3]  # reported at the first validation...
    log = tmp_path / "study" / "trials" / "trial-0000" / "log.jsonl"
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert max(steps) < 9  # ...and training stopped there, long before step 9
    assert not (log.parent / "checkpoint").exists()  # pruned trials keep no weights


@pytest.mark.slow
def test_median_pruner_reports_every_validation(tiny_model_dir, tmp_path):
    base = tiny_base(tiny_model_dir, tmp_path, **{"train.steps": 4, "train.eval_every": 2})
    space = parse_space(TINY_SEARCH, base)
    study = open_study(tmp_path / "s", TuneOptions(sampler="random", pruner="median", seed=0))
    study.optimize(Objective(base, space, tmp_path / "s"), n_trials=2)
    for trial in study.trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert set(trial.intermediate_values) <= {2, 4} and trial.intermediate_values
