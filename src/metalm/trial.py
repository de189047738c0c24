"""`meta_train(config, run_dir)`: one tuning trial, meta-training only and validating on
the meta-val classes; the meta-test classes are never touched (the tuner's objective
and the other ranks of `metalm tune` under torchrun call it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from metalm import distributed
from metalm.config import RunConfig
from metalm.errors import MetalmError
from metalm.evaluate import validation_accuracy
from metalm.learners import MetaLearner, build_learner
from metalm.models.base import build_model
from metalm.run import build_trainer, samplers, write_config
from metalm.tasks import build_pools
from metalm.trainer import TrainResult, ValidationCallback


def meta_train(
    config: RunConfig,
    run_dir: str | Path,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> tuple[MetaLearner, TrainResult]:
    """Meta-train only, validating on the meta-val classes. A learner that does not
    meta-train, or `train.steps=0`, is validated once as it is.

    Example:
        >>> learner, result = meta_train(config, "runs/tune/trials/trial-0000", progress=False)
        >>> result.steps, 0.0 <= result.best_val_accuracy <= 1.0
        (2, True)
    """
    distributed.setup(config.model.device, timeout=config.train.dist_timeout)
    torch.manual_seed(config.seed)
    learner = build_learner(build_model(config.model), config.learner)
    pools = build_pools(config.data)
    if pools.val is None:
        raise MetalmError("tuning needs meta-val classes: set data.classes.fractions or .val")
    run_dir = Path(run_dir)
    sampled = samplers(config, pools)
    trainer = build_trainer(learner, config, sampled, run_dir, progress, on_validation)
    # rank 0 writes it; if that fails, every rank stops
    distributed.on_main(lambda: write_config(config, run_dir), "writing the trial's config")
    if trainer is not None:
        return learner, trainer.fit()
    accuracy = validation_accuracy(learner, sampled[1], config.train.val_episodes)
    for callback in on_validation:
        callback(0, accuracy)
    history = [{"step": 0, "val_accuracy": accuracy}]
    return learner, TrainResult(0, 0, accuracy, history)
