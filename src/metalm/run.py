"""`run(config)`: meta-train a learner, then evaluate it beside baselines. The CLI,
the benchmarks and the tests all go through here.

What else works on a run directory (resume, reload, re-evaluate, export) is in
`metalm.runs`; the tuner's meta-train-only entry is `metalm.trial.meta_train`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from metalm import distributed
from metalm.config import RunConfig, save_config
from metalm.data.episodes import TaskSampler
from metalm.errors import MetalmError
from metalm.learners import MetaLearner, build_learner
from metalm.models.base import build_model
from metalm.protocols import evaluate_learner, evaluate_with_baselines, fixed_test_samplers
from metalm.report import EvalReport
from metalm.rundir import CONFIG_FILE, new_run_dir
from metalm.tasks import TaskPools, build_pools, validation_sampler
from metalm.trainer import MetaTrainer, ValidationCallback

__all__ = [
    "build_trainer",
    "evaluate_learner",
    "evaluate_with_baselines",
    "run",
    "run_on_both_splits",
    "samplers",
]


def samplers(config: RunConfig, pools: TaskPools) -> tuple[TaskSampler, TaskSampler | None]:
    """Meta-training episodes (a task mixture when there are several sources or
    unlabeled texts) and (if there are meta-val classes) validation episodes; building
    them checks the episode shapes against the classes there are."""
    drop = config.data.drop_small_classes
    return (
        pools.train_sampler(config.episode, config.seed, drop),
        validation_sampler(pools, config.train, config.seed + 1, drop),
    )


def build_trainer(
    learner: MetaLearner,
    config: RunConfig,
    sampled: tuple[TaskSampler, TaskSampler | None],
    run_dir: Path,
    progress: bool,
    on_validation: Sequence[ValidationCallback],
) -> MetaTrainer | None:
    """The outer loop for `learner` on the `(train, val)` samplers, or None if it does
    not meta-train (or `train.steps=0`)."""
    distributed.check_learner(learner, config.train.steps)
    if not (learner.meta_trainable and config.train.steps > 0):
        return None
    train_sampler, val_sampler = sampled
    return MetaTrainer(
        learner,
        train_sampler,
        val_sampler,
        config.train,
        run_dir,
        progress=progress,
        on_validation=on_validation,
    )


def run(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> EvalReport:
    """Meta-train `config.learner` (if it learns and `train.steps > 0`), then evaluate it
    and the baselines on the same test tasks; results go to the run directory.

    Example:
        >>> report = run(load_config(None, tiny), progress=False)  # e.g. ["train.steps=20"]
        >>> print(report.to_markdown())  # doctest: +ELLIPSIS
        | method | protocol | test data | accuracy % (±95% CI) | ...
    """
    # under torchrun: one rank of several
    world = distributed.setup(config.model.device, timeout=config.train.dist_timeout)
    torch.manual_seed(config.seed)
    learner = build_learner(build_model(config.model), config.learner)
    pools = build_pools(config.data, config.eval.full_way_shots)
    # the config checked its own values when it was loaded; what depends on the data
    # (N, K, Q against the classes there are) is checked here, before anything is written
    fixed_test_samplers(config, pools)
    run_dir = Path(resume) if resume else distributed.broadcast_object(new_run_dir(config))
    trainer = build_trainer(
        learner, config, samplers(config, pools), run_dir, progress, on_validation
    )
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise MetalmError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} "
            "or pick another run_name"
        )
    distributed.barrier()  # every rank has checked before rank 0 writes
    # rank 0 writes it; if that fails, every rank stops
    distributed.on_main(lambda: write_config(config, run_dir), "writing the run's config")

    train_summary: dict[str, Any] = {}
    if trainer is not None:
        train_summary = asdict(trainer.fit(resume=resume is not None))
    if not world.is_main:  # rank 0 evaluates and writes the report
        return EvalReport(results=[], train=train_summary, run_dir=str(run_dir))

    results = evaluate_with_baselines(learner, config, pools, progress)
    removed = [o.as_dict() for o in pools.removed_overlap]
    report = EvalReport(results=results, train=train_summary, removed_overlap=removed)
    report.write(run_dir)
    return report


def write_config(config: RunConfig, run_dir: Path) -> None:
    """`config` as the run directory's `config.yaml` (the directory made if need be)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)


STRICT_SUFFIX = " (strict split)"


def run_on_both_splits(config: RunConfig, progress: bool = True) -> EvalReport:
    """`run(config)`, then the same learner meta-trained on the strict split
    (`data.classes.strict`, its run directory `<run>-strict`, no baselines of its own);
    one report of both, the strict rows named `<method> (strict split)`, written to the
    first run's directory (`metalm demo`). A config that is strict already runs once.

    Example:
        >>> from metalm.config import DEMO_CONFIG
        >>> report = run_on_both_splits(load_config(DEMO_CONFIG, tiny), progress=False)
        >>> sorted({r.method for r in report.results})
        ['protonet', 'protonet (strict split)']
    """
    report = run(config, progress=progress)
    if config.data.classes.strict or not report.run_dir:
        return report
    run_dir = Path(report.run_dir)
    strict = replace(
        config,
        output_dir=str(run_dir.parent),
        run_name=f"{run_dir.name}-strict",
        data=replace(config.data, classes=replace(config.data.classes, strict=True)),
        eval=replace(config.eval, baselines=[]),
    )
    other = run(strict, progress=progress)
    renamed = [replace(r, method=r.method + STRICT_SUFFIX) for r in other.results]
    own = {r.method for r in renamed}
    position = max(i for i, r in enumerate(report.results) if r.method + STRICT_SUFFIX in own)
    merged = report.results[: position + 1] + renamed + report.results[position + 1 :]
    combined = EvalReport(merged, report.train, removed_overlap=other.removed_overlap)
    combined.write(run_dir)
    return combined


_MOVED = {
    "meta_train": "metalm.trial",
    "resume_run": "metalm.runs",
    "load_trained_learner": "metalm.runs",
    "evaluate_run": "metalm.runs",
}


def __getattr__(name: str) -> Any:
    """Names that lived here before the split (`from metalm.run import meta_train`)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
