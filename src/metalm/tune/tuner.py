"""`tune(...)`: the search end to end. Trials meta-train on meta-train classes and are
scored on meta-val episodes; the best config is then re-run by `metalm.runs.recipe` and
evaluated on the meta-test episodes, which the search never sees.

Example:
    >>> from metalm.tune import load_tune_config
    >>> base, space = load_tune_config("configs/tune_protonet.yaml", tiny)  # + overrides
    >>> quiet = lambda *line, **kwargs: None               # printer: one line per event
    >>> result = tune(base, space, 2, "runs/tune-protonet", TuneOptions(sampler="tpe"), quiet)
    >>> 0.0 <= result.best_value <= 1.0, "train.lr" in result.best_params
    (True, True)
    >>> [r.protocol for r in result.test_report.results]   # the best config on meta-test
    ['3-way 1-shot']
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from metalm import distributed
from metalm.config import RunConfig
from metalm.errors import MetalmError
from metalm.runs.directory import REPORT_MD
from metalm.runs.report import EvalReport
from metalm.tune.objective import Objective
from metalm.tune.options import TuneOptions
from metalm.tune.outputs import ProgressLine, write_outputs
from metalm.tune.space import SearchSpace, apply_params
from metalm.tune.study import FINISHED, finished_count, open_study, warm_start

BEST_RUN = "best"


@dataclass
class TuneResult:
    study: optuna.Study
    study_dir: Path
    best_value: float | None = None
    best_params: dict = field(default_factory=dict)
    best_config: RunConfig | None = None
    test_report: EvalReport | None = None
    pareto: list[dict] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def tune(
    base: RunConfig,
    space: SearchSpace,
    trials: int,
    study_dir: str | Path,
    options: TuneOptions | None = None,
    printer: Callable[..., None] = print,
) -> TuneResult:
    """Run the study until it holds `trials` finished (complete or pruned) trials, counting
    those of other workers and earlier runs; then write the outputs and (single
    objective, `options.final`) re-run the best config and test it on meta-test.
    `printer` gets one line per event (a trial finished or failed, the best one)."""
    if trials < 1:
        raise MetalmError(f"tune.trials (--trials) must be >= 1, got {trials}")
    options = options or TuneOptions()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(study_dir, options, base.train.steps, base.train.eval_every)
    names = list(options.objectives)
    if len(names) > 1:
        study.set_user_attr("objectives", names)
    if options.warm_start_from:
        queued = warm_start(study, options.warm_start_from, space.names, options.warm_start_top)
        printer(f"warm start: queued {len(queued)} configuration(s) from earlier studies")
    left = trials - finished_count(study)
    if left > 0:
        printer(
            f"study {options.study_name!r} in {study_dir}: {trials - left}/{trials} finished, "
            f"running up to {left} more"
        )
        study.optimize(
            Objective(base, space, study_dir, names, options.progress),
            n_trials=left,
            callbacks=[
                optuna.study.MaxTrialsCallback(trials, states=FINISHED),
                ProgressLine(trials, printer),
                _failure_line(printer),
            ],
            catch=(MetalmError,),
        )
    return finish(study, base, study_dir, options.final, options.progress, printer)


def _failure_line(printer: Callable[..., None]):
    """A `study.optimize` callback: one line for each failed trial, with its reason."""

    def report_failure(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            reason = trial.system_attrs.get("fail_reason", "")
            printer(f"trial {trial.number} failed: {reason.splitlines()[-1] if reason else ''}")

    return report_failure


def finish(
    study: optuna.Study,
    base: RunConfig,
    study_dir: Path,
    final: bool = True,
    progress: bool = False,
    printer=print,
) -> TuneResult:
    """Outputs, and the best config re-run and evaluated on meta-test."""
    result = TuneResult(study=study, study_dir=study_dir)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise MetalmError(f"no trial of study {study.study_name!r} completed; see the errors above")
    if len(study.directions) > 1:
        from metalm.tune.arch import pareto_rows

        result.pareto = pareto_rows(study)
        result.outputs = write_outputs(study, study_dir, None)
        return result
    best = study.best_trial
    result.best_value, result.best_params = best.value, dict(best.params)
    config = apply_params(base, best.params)
    config.output_dir, config.run_name = str(study_dir), BEST_RUN
    result.best_config = config
    result.outputs = write_outputs(study, study_dir, config)
    printer(f"best: trial {best.number}, val accuracy {best.value:.4f}, {best.params}")
    if final:
        shutil.rmtree(study_dir / BEST_RUN, ignore_errors=True)
        from metalm.runs.recipe import run

        printer("re-running the best config and testing it on the meta-test episodes")
        distributed.announce("run", config)  # under torchrun: every rank trains it
        result.test_report = run(config, progress=progress)
        result.outputs.append(f"{BEST_RUN}/{REPORT_MD}")
    return result
