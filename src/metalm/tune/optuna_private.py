"""The one place metalm reaches past Optuna's public API (`Study._storage`,
`FrozenTrial._trial_id`): writes to a trial that another process left running, which
`optuna.Trial` (only for trials this process runs) cannot make."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def set_trial_state(study: optuna.Study, trial: FrozenTrial, state: TrialState) -> None:
    """Move `trial` to `state` in the study's storage (raises if it already finished)."""
    study._storage.set_trial_state_values(trial._trial_id, state)


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Set a user attribute of `trial` in the study's storage."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)
