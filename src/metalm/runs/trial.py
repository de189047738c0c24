"""`meta_train(config, run_dir)`: one tuning trial, meta-training only and validating on
the meta-val classes; the meta-test classes are never touched (the tuner's objective
and the other ranks of `metalm tune` under torchrun call it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metalm.config import RunConfig
from metalm.learners import MetaLearner
from metalm.runs.recipe import RunRecipe
from metalm.trainer import TrainResult, ValidationCallback


def meta_train(
    config: RunConfig,
    run_dir: str | Path,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> tuple[MetaLearner, TrainResult]:
    """Meta-train only, validating on the meta-val classes (`RunRecipe`'s setup and
    train). A learner that does not meta-train, or `train.steps=0`, is validated once as
    it is.

    Example:
        >>> learner, result = meta_train(config, "runs/tune/trials/trial-0000", progress=False)
        >>> result.steps, 0.0 <= result.best_val_accuracy <= 1.0
        (2, True)
    """
    recipe = RunRecipe(config, progress, on_validation)
    recipe.setup(run_dir, trial=True)
    result = recipe.train()
    return recipe.learner, result if result is not None else recipe.validate_once()
