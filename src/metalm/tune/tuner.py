"""`tune(...)`: the search end to end. Trials meta-train on meta-train classes and are
scored on meta-val episodes; the best config is then re-run by `metalm.run` and
evaluated on the meta-test episodes, which the search never sees.

Example:
    >>> base, space = load_tune_config("configs/tune_protonet.yaml")
    >>> result = tune(base, space, trials=20, study_dir="runs/tune-protonet")
    >>> result.best_value, result.test_report.to_markdown()
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from metalm import distributed
from metalm.config import RunConfig
from metalm.errors import MetalmError
from metalm.report import EvalReport
from metalm.tune.objective import OBJECTIVES, Objective, parse_objectives
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
    study_name: str = "metalm",
    storage: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int | None = None,
    objectives: str | Sequence[str] = ("accuracy",),
    warm_start_from: Sequence[str] = (),
    warm_start_top: int = 1,
    final: bool = True,
    progress: bool = False,
    heartbeat: int = 60,
    printer=print,
    startup_trials: int | None = None,
) -> TuneResult:
    """Run the study until it holds `trials` finished (complete or pruned) trials, counting
    those of other workers and earlier runs; then write the outputs and (single
    objective, `final=True`) re-run the best config and test it on meta-test."""
    if trials < 1:
        raise MetalmError(f"--trials must be >= 1, got {trials}")
    names = parse_objectives(objectives)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(
        study_dir,
        study_name,
        storage,
        sampler,
        pruner,
        seed,
        [OBJECTIVES[n] for n in names],
        base.train.steps,
        base.train.eval_every,
        heartbeat,
        startup_trials,
    )
    if len(names) > 1:
        study.set_user_attr("objectives", names)
    if warm_start_from:
        queued = warm_start(study, warm_start_from, space.names, warm_start_top)
        printer(f"warm start: queued {len(queued)} configuration(s) from earlier studies")
    objective = Objective(base, space, study_dir, names, progress)
    line = ProgressLine(trials, printer)

    def report_failure(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            reason = trial.system_attrs.get("fail_reason", "")
            printer(f"trial {trial.number} failed: {reason.splitlines()[-1] if reason else ''}")

    left = trials - finished_count(study)
    if left > 0:
        printer(
            f"study {study_name!r} in {study_dir}: {trials - left}/{trials} finished, "
            f"running up to {left} more"
        )
        study.optimize(
            objective,
            n_trials=left,
            callbacks=[
                optuna.study.MaxTrialsCallback(trials, states=FINISHED),
                line,
                report_failure,
            ],
            catch=(MetalmError,),
        )
    return finish(study, base, study_dir, final, progress, printer)


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
        from metalm.run import run

        printer("re-running the best config and testing it on the meta-test episodes")
        distributed.announce("run", config)  # under torchrun: every rank trains it
        result.test_report = run(config, progress=progress)
        result.outputs.append(f"{BEST_RUN}/report.md")
    return result
