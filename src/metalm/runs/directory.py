"""The run directory's layout: every file name in it, and where a run's state is found.

A run directory (`output_dir/run_name`) holds::

    config.yaml           the config the run was started with
    log.jsonl             one line per meta-training step
    tensorboard/          TensorBoard events (when `train.tensorboard`)
    best.safetensors      the learner's weights at the best validation accuracy
    checkpoint/           the last checkpoint (see `metalm.checkpoint`)
    report.json, report.md, accuracy.png, training.png   the evaluation report
    evals/<name>/         re-evaluations (`metalm eval`), each with its config and report

Checkpoints are replaced through `metalm.atomic.replace_dir`; `checkpoint.old` (and
`checkpoint.tmp`) are the names earlier versions of metalm swapped through, still read
(`.old`) and cleared (both) so that their runs resume.

Example:
    >>> new_eval_dir(Path("runs/protonet-demo"), "more-episodes").as_posix()
    'runs/protonet-demo/evals/more-episodes'
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from metalm.atomic import new_path, old_path, recover
from metalm.errors import MetalmError

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
BEST_WEIGHTS = "best.safetensors"
CHECKPOINT_DIR = "checkpoint"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PLOT = "accuracy.png"
TRAINING_PLOT = "training.png"
EVALS_DIR = "evals"

# inside a checkpoint
LEARNER_WEIGHTS = "learner.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
PROGRESS_STATE = "state.json"
SAMPLER_STATE = "samplers.safetensors"


def new_run_dir(config: Any) -> Path:
    """`output_dir/run_name` of a `RunConfig` (default name: the learner and a timestamp)."""
    name = config.run_name or f"{config.learner.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output_dir) / name


def require_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or a MetalmError if it holds no run (no `config.yaml`)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise MetalmError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return run_dir


def find_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint in `directory` (restored first if a swap was cut short,
    see `metalm.atomic.recover`), or None."""
    directory = recover(directory)
    return directory if (directory / PROGRESS_STATE).exists() else None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` can be resumed (it holds a complete checkpoint)."""
    return find_checkpoint(Path(run_dir) / CHECKPOINT_DIR) is not None


def trained_weights(run_dir: Path) -> Path | None:
    """The weights a finished run's learner gets: the best ones, else the last
    checkpoint's (a run that kept the last weights, `train.select_best=false`)."""
    checkpoint = find_checkpoint(run_dir / CHECKPOINT_DIR)
    candidates = [run_dir / BEST_WEIGHTS]
    if checkpoint is not None:
        candidates.append(checkpoint / LEARNER_WEIGHTS)
    return next((path for path in candidates if path.exists()), None)


def remove_weights(run_dir: Path) -> None:
    """Delete a run's weights (best weights and checkpoints), keeping its log and config
    (the tuner keeps trials small)."""
    checkpoint = run_dir / CHECKPOINT_DIR
    for path in (checkpoint, new_path(checkpoint), old_path(checkpoint)):
        shutil.rmtree(path, ignore_errors=True)
    (run_dir / BEST_WEIGHTS).unlink(missing_ok=True)


def new_eval_dir(run_dir: Path, name: str | None) -> Path:
    """`RUN/evals/<name>`: a new folder for one re-evaluation (default name: a
    timestamp, made unique); an explicit name already used is refused."""
    if name is not None:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise MetalmError(f"--name must be a plain folder name, got {name!r}")
        out = run_dir / EVALS_DIR / name
        if out.exists():
            raise MetalmError(f"{out} already exists; pick another --name")
        return out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = run_dir / EVALS_DIR / stamp, 1
    while out.exists():
        n += 1
        out = run_dir / EVALS_DIR / f"{stamp}-{n}"
    return out
