"""`run(config)`: meta-train a learner, then evaluate it beside baselines. The CLI,
the benchmarks and the tests all go through here.

`RunRecipe` holds a run's stages (setup, train, evaluate, report) and their timings;
a tuning trial (`metalm.runs.trial.meta_train`) and `compare` use it too. What else works
on a run directory (resume, reload, re-evaluate, export) is in `metalm.runs.existing`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from metalm import distributed
from metalm.config import RunConfig, save_config
from metalm.data.episodes import TaskSampler
from metalm.errors import MetalmError
from metalm.learners import build_learner
from metalm.models.base import build_model
from metalm.runs.accuracy import MethodResult, validation_accuracy
from metalm.runs.directory import CONFIG_FILE, new_run_dir
from metalm.runs.protocols import TestSamplers, evaluate_with_baselines, fixed_test_samplers
from metalm.runs.report import EvalReport
from metalm.tasks import build_pools, validation_sampler
from metalm.trainer import MetaTrainer, TrainResult, ValidationCallback

__all__ = ["RunRecipe", "run", "run_on_both_splits"]


@dataclass
class RunRecipe:
    """One run's life in four stages, shared by `run`, a tuning trial
    (`metalm.runs.trial.meta_train`), `compare` and the benchmarks: `setup` (model, learner,
    task pools and samplers, the run directory and its config), `train` (the outer loop
    when the learner meta-trains, else one validation for a trial), `evaluate` (the
    learner beside the baselines on the test tasks) and `write_report`. `seconds` holds
    each stage's wall time (the report keeps them too).

    Example:
        >>> recipe = RunRecipe(load_config(None, tiny), progress=False)
        >>> report = recipe.run()
        >>> sorted(report.seconds)  # as in recipe.seconds
        ['evaluate', 'report', 'setup', 'train']
    """

    config: RunConfig
    progress: bool = True
    on_validation: Sequence[ValidationCallback] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    learner: Any = None  # a MetaLearner once `setup` ran
    pools: Any = None  # TaskPools
    train_sampler: TaskSampler | None = None
    val_sampler: TaskSampler | None = None
    run_dir: Path | None = None
    trainer: MetaTrainer | None = None
    test_samplers: TestSamplers | None = None
    resume: bool = False

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began

    def setup(self, run_dir: str | Path | None = None, trial: bool = False) -> None:
        """Build everything and write the run's config. `run_dir`: where (default: a new
        directory under `output_dir`); `trial`: a tuning trial (meta-val classes
        required, the test tasks never built)."""
        config = self.config
        with self._timed("setup"):
            distributed.setup(config.model.device, timeout=config.train.dist_timeout)
            torch.manual_seed(config.seed)
            self.learner = build_learner(build_model(config.model), config.learner)
            if trial:
                self.pools = build_pools(config.data)
                if self.pools.val is None:
                    raise MetalmError(
                        "tuning needs meta-val classes: set data.classes.fractions or .val"
                    )
            else:
                self.pools = build_pools(config.data, config.eval.full_way_shots)
                # the config checked its own values when it was loaded; what depends on
                # the data (N, K, Q against the classes) is checked before anything is
                # written, by building the test samplers (kept for `evaluate`)
                self.test_samplers = fixed_test_samplers(config, self.pools)
            if run_dir is None:
                run_dir = distributed.broadcast_object(new_run_dir(config))
            self.run_dir = Path(run_dir)
            drop = config.data.drop_small_classes
            self.train_sampler = self.pools.train_sampler(config.episode, config.seed, drop)
            self.val_sampler = validation_sampler(self.pools, config.train, config.seed + 1, drop)
            distributed.check_learner(self.learner, config.train.steps)
            if self.learner.meta_trainable and config.train.steps > 0:
                self.trainer = MetaTrainer(
                    self.learner,
                    self.train_sampler,
                    self.val_sampler,
                    config.train,
                    self.run_dir,
                    progress=self.progress,
                    on_validation=self.on_validation,
                )
            if not trial and not self.resume and _holds_files(self.run_dir):
                raise MetalmError(
                    f"{self.run_dir} already holds a run; continue it with --resume "
                    f"{self.run_dir} or pick another run_name"
                )
            distributed.barrier()  # every rank has checked before rank 0 writes
            # rank 0 writes it; if that fails, every rank stops
            distributed.on_main(
                lambda: write_config(config, self.run_dir), "writing the run's config"
            )

    def train(self) -> TrainResult | None:
        """Meta-train (resuming from the checkpoint when `resume`), or None when the
        learner does not meta-train (or `train.steps=0`)."""
        with self._timed("train"):
            return self.trainer.fit(resume=self.resume) if self.trainer is not None else None

    def validate_once(self) -> TrainResult:
        """A learner that does not meta-train, validated once as it is (for a trial)."""
        with self._timed("train"):
            accuracy = validation_accuracy(
                self.learner, self.val_sampler, self.config.train.val_episodes
            )
            for callback in self.on_validation:
                callback(0, accuracy)
            return TrainResult(0, 0, accuracy, [{"step": 0, "val_accuracy": accuracy}])

    def evaluate(self) -> list[MethodResult]:
        """The learner and the baselines on the same test tasks (rank 0 only)."""
        with self._timed("evaluate"):
            return evaluate_with_baselines(
                self.learner, self.config, self.pools, self.progress, self.test_samplers
            )

    def write_report(self, results: list[MethodResult], train: TrainResult | None) -> EvalReport:
        with self._timed("report"):
            removed = [o.as_dict() for o in self.pools.removed_overlap]
            summary = asdict(train) if train is not None else {}
            report = EvalReport(results, summary, removed_overlap=removed, seconds=self.seconds)
            report.write(self.run_dir)
        return report

    def run(self, run_dir: str | Path | None = None) -> EvalReport:
        """All four stages; under torchrun the other ranks train and return an empty
        report (rank 0 evaluates and writes it)."""
        self.setup(run_dir)
        train = self.train()
        if not distributed.world().is_main:
            summary = asdict(train) if train is not None else {}
            return EvalReport(results=[], train=summary, run_dir=str(self.run_dir))
        return self.write_report(self.evaluate(), train)


def _holds_files(directory: Path) -> bool:
    return directory.exists() and any(directory.iterdir())


def run(
    config: RunConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    on_validation: Sequence[ValidationCallback] = (),
) -> EvalReport:
    """Meta-train `config.learner` (if it learns and `train.steps > 0`), then evaluate it
    and the baselines on the same test tasks; results go to the run directory
    (`RunRecipe` runs each stage).

    Example:
        >>> report = run(load_config(None, tiny), progress=False)  # e.g. ["train.steps=20"]
        >>> print(report.to_markdown())  # doctest: +ELLIPSIS
        | method | protocol | test data | accuracy % (±95% CI) | ...
    """
    recipe = RunRecipe(config, progress, on_validation, resume=resume is not None)
    return recipe.run(resume)


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
