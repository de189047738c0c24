"""Working with a run directory once it exists: resume it, load its trained learner,
evaluate it again, export it as a model directory (its layout: `metalm.runs.directory`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from metalm.checkpoint import load_weights
from metalm.config import RunConfig, apply_overrides, from_dict, load_config, save_config, to_dict
from metalm.errors import MetalmError, first_line
from metalm.learners import MetaLearner, build_learner
from metalm.models.base import build_model
from metalm.pretrained import save_pretrained
from metalm.runs.directory import (
    CONFIG_FILE,
    REPORT_JSON,
    has_checkpoint,
    new_eval_dir,
    require_run_dir,
    trained_weights,
)
from metalm.runs.protocols import evaluate_with_baselines, fixed_test_samplers
from metalm.runs.recipe import run
from metalm.runs.report import EvalReport
from metalm.tasks import build_pools


def resume_run(run_dir: str | Path, progress: bool = True) -> EvalReport:
    """Continue a run from its last checkpoint with the config it was started with."""
    run_dir = require_run_dir(run_dir)
    if not has_checkpoint(run_dir):
        raise MetalmError(f"{run_dir}: no checkpoint to resume from")
    return run(load_config(run_dir / CONFIG_FILE), resume=run_dir, progress=progress)


def load_trained_learner(
    run_dir: str | Path, overrides: Sequence[str] | None = None
) -> tuple[RunConfig, MetaLearner]:
    """The learner of a finished run, with its best weights.

    `overrides` (`key.sub=value`) change the saved config first, so that the learner is
    built from the changed config (e.g. `learner.head=logreg`, `model.device=cpu`) and
    then gets the run's weights; a change that alters the weights' shapes
    (`model.num_layers`, ...) is refused."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    if overrides:
        config = from_dict(RunConfig, apply_overrides(to_dict(config), list(overrides)))
    learner = build_learner(build_model(config.model), config.learner)
    weights = trained_weights(run_dir)
    if weights is not None:
        try:
            load_weights(learner, weights)
        except RuntimeError as err:  # shapes that differ from the saved ones
            first = first_line(err)
            raise MetalmError(
                f"{weights}: the run's weights do not fit the learner built with these "
                f"overrides ({first}); leave the encoder's shape as the run had it"
            ) from None
    return config, learner


def evaluate_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool = True,
    name: str | None = None,
) -> EvalReport:
    """Evaluate a finished run's best learner (and the baselines) again, e.g. with
    more episodes (`eval.episodes=1000`) or another task head (`learner.head=logreg`):
    `overrides` apply to the whole saved config, learner and model included, before the
    learner is built. The report, and the config it used, go to a new folder
    `RUN/evals/<name>` (default name: a timestamp); the run's own report is left as it
    is.

    Example:
        >>> report = evaluate_run(trained_run, ["learner.head=logreg"])  # "runs/protonet-demo"
        >>> Path(report.run_dir).relative_to(trained_run).parent.as_posix()  # evals/<time>
        'evals'
    """
    run_dir = require_run_dir(run_dir)
    out = new_eval_dir(run_dir, name)
    config, learner = load_trained_learner(run_dir, overrides)
    pools = build_pools(config.data, config.eval.full_way_shots)
    fixed_test_samplers(config, pools)  # N, K, Q against the test classes, up front
    report = EvalReport(results=evaluate_with_baselines(learner, config, pools, progress))
    out.mkdir(parents=True)
    save_config(config, out / CONFIG_FILE)
    report.write(out)
    return report


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """A pretrained directory from a finished run (its best weights; its report.json
    for the model card).

    Example:
        >>> export_run(trained_run, "protonet-minilm")     # e.g. "runs/protonet-demo"
        PosixPath('protonet-minilm')
    """
    run_dir = require_run_dir(run_dir)
    config, learner = load_trained_learner(run_dir)
    report = None
    if (run_dir / REPORT_JSON).exists():
        report = json.loads((run_dir / REPORT_JSON).read_text(encoding="utf-8"))
    with torch.no_grad():
        return save_pretrained(learner, out, run_config=config, report=report)
