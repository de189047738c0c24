"""What the tuning tests share: search spaces, a tuning YAML, tiny base configs and
worker processes on one study. Trials run on the tiny random BERT of conftest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import yaml
from conftest import tiny_overrides
from optuna.trial import TrialState
from run_tools import one_thread_env

from metalm.config import RunConfig, load_config

SPACE = {
    "learner.name": {"choices": ["protonet", "fomaml"]},
    "train.lr": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
    "episode.k_shot": {"low": 1, "high": 3, "type": "int"},
    "learner.inner_lr": {
        "low": 1e-4,
        "high": 1e-2,
        "log": True,
        "when": {"learner.name": ["fomaml"]},
    },
}
TINY_SEARCH = {
    "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "episode.k_shot": {"low": 1, "high": 2},
    "learner.distance": {"choices": ["euclidean", "cosine"]},
}


def write_tune_yaml(path: Path, search: dict | None = None) -> Path:
    data = {"learner": {"name": "protonet"}, "search": search or TINY_SEARCH}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_base(model_dir: Path, out: Path, **extra) -> RunConfig:
    return load_config(None, tiny_overrides(model_dir, out, **extra))


def worker_command(path: Path, model_dir: Path, out: Path, trials: int, *extra: str) -> list[str]:
    """`metalm tune` as a worker process: `trials` random trials of 4 steps, no final run."""
    overrides = tiny_overrides(model_dir, out, **{"train.steps": 4, "train.eval_every": 2})
    return [
        sys.executable, "-m", "metalm.cli", "-q", "tune", "-c", str(path),
        "--trials", str(trials), "--sampler", "random", "--no-final", *extra, *overrides,
    ]  # fmt: skip


def run_workers(commands: list[list[str]]) -> None:
    """Start every worker command at once and wait: each must exit 0."""
    procs = [
        subprocess.Popen(
            command,
            env=one_thread_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs


def check_study_consistent(study: optuna.Study, trials: int) -> None:
    """No lost, duplicated or half-written trials."""
    all_trials = study.get_trials()
    numbers = [t.number for t in all_trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(numbers)))
    finished = [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= trials
    assert not [t for t in all_trials if t.state == TrialState.RUNNING]
    for t in all_trials:
        if t.state == TrialState.COMPLETE:
            assert t.value is not None and 0.0 <= t.value <= 1.0
            assert set(t.params) == set(TINY_SEARCH)
            assert t.datetime_complete is not None
