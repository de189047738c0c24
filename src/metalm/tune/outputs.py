"""What a study leaves in its directory: the best config as YAML, a summary table of
trials (Markdown and CSV), PNG plots, and one progress line per finished trial."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from metalm.config import RunConfig, save_config
from metalm.tune.study import FINISHED, finished_count

BEST_CONFIG = "best_config.yaml"
SUMMARY = "summary.md"
TRIALS_CSV = "trials.csv"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressLine:
    """A `study.optimize` callback: one line per finished trial with its value, the best
    so far and an ETA (from this worker's pace) to `target` finished trials."""

    def __init__(self, target: int, printer=print):
        self.target = target
        self.printer = printer
        self.started = time.monotonic()
        self.done_here = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done_here += 1
        finished = finished_count(study)
        state = trial.state.name.lower()
        if trial.state == TrialState.PRUNED:
            step = trial.user_attrs.get("pruned_at_step", trial.last_step)
            value = trial.intermediate_values.get(trial.last_step) if trial.last_step else None
            head = f"trial {trial.number} pruned at step {step}" + (
                f" (val {value:.4f})" if value is not None else ""
            )
        elif trial.values:
            names = study.user_attrs.get("objectives") or ["value"] * len(trial.values)
            head = f"trial {trial.number} {state}: " + ", ".join(
                f"{n} {_fmt(v)}" for n, v in zip(names, trial.values, strict=False)
            )
        else:
            head = f"trial {trial.number} {state}"
        if len(study.directions) == 1:
            try:
                best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
            except ValueError:
                best = "best -"
        else:
            best = f"pareto set {len(study.best_trials)} trials"
        pace = (time.monotonic() - self.started) / self.done_here
        left = max(0, self.target - finished)
        eta = _duration(pace * left) if left else "done"
        self.printer(f"{head} | {best} | {finished}/{self.target} finished | ETA {eta}", flush=True)


def summary_markdown(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    objectives = (
        ["value"]
        if len(study.directions) == 1
        else [f"value {i}" for i in range(len(study.directions))]
    )
    head = ["trial", "state", *objectives, "seconds", *names]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t in trials:
        values = list(t.values) if t.values else [math.nan] * len(objectives)
        seconds = t.duration.total_seconds() if t.duration else math.nan
        row = [t.number, t.state.name, *values, seconds, *(t.params.get(n, "") for n in names)]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _plot(fn, path: Path, **kwargs) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = fn(**kwargs)
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path.name
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
        plt.close("all")
        return None  # e.g. too few finished trials for importances


def write_plots(study: optuna.Study, study_dir: Path) -> list[str]:
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    if len(study.directions) == 1:
        if done:
            written.append(
                _plot(vis.plot_optimization_history, study_dir / "history.png", study=study)
            )
        if len(done) >= 3:
            written.append(
                _plot(
                    vis.plot_param_importances,
                    study_dir / "importances.png",
                    study=study,
                    evaluator=PedAnovaImportanceEvaluator(),
                )
            )
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            written.append(
                _plot(vis.plot_intermediate_values, study_dir / "learning_curves.png", study=study)
            )
    elif done:
        names = ["accuracy", *(f"objective {i}" for i in range(1, len(study.directions)))]
        written.append(
            _plot(
                vis.plot_pareto_front,
                study_dir / "pareto_front.png",
                study=study,
                target_names=study.user_attrs.get("objectives", names),
            )
        )
    return [w for w in written if w]


def write_outputs(study: optuna.Study, study_dir: Path, best_config: RunConfig | None) -> list[str]:
    """best_config.yaml (single objective), summary.md, trials.csv and the plots."""
    study_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if best_config is not None:
        save_config(best_config, study_dir / BEST_CONFIG)
        written.append(BEST_CONFIG)
    text = f"# study {study.study_name}\n\n{summary_markdown(study)}"
    if len(study.directions) > 1:
        from metalm.tune.arch import pareto_rows

        names = study.user_attrs.get("objectives", [])
        text += f"\n## Pareto front ({', '.join(names)})\n\n"
        text += "| trial | values | params |\n|---|---|---|\n"
        for row in pareto_rows(study):
            values = ", ".join(_fmt(v) for v in row["values"])
            text += f"| {row['trial']} | {values} | {row['params']} |\n"
    (study_dir / SUMMARY).write_text(text, encoding="utf-8")
    written.append(SUMMARY)
    if study.get_trials(deepcopy=False, states=FINISHED):
        study.trials_dataframe().to_csv(study_dir / TRIALS_CSV, index=False)
        written.append(TRIALS_CSV)
    return written + write_plots(study, study_dir)
