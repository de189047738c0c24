"""Tests for the outer loop and its checkpoints: SIGKILL + resume equivalence, atomic
checkpoint swaps, the lr schedule, best weights / early stopping, non-finite losses.

Everything runs on the tiny random BERT of `conftest.py` (or on a toy module)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from run_tools import (
    assert_same_runs,
    assert_same_tensors,
    kill_b_then_resume,
    one_thread_env,
    read_log,
    weights_of,
)
from safetensors.torch import load_file

from metalm.atomic import NEW_SUFFIX, OLD_SUFFIX, old_path
from metalm.checkpoint import (
    load_checkpoint,
)
from metalm.cli import main
from metalm.config import TrainConfig, load_config, save_config
from metalm.errors import MetalmError
from metalm.learners import build_learner
from metalm.models.encoder import TextEncoder
from metalm.runs.directory import find_checkpoint
from metalm.tasks import build_pools
from metalm.trainer import MetaTrainer, lr_lambda


def _trainer(model_dir: Path, output_dir: Path, **extra: object) -> MetaTrainer:
    """A MetaTrainer on the tiny model, built the way `metalm.runs.recipe.run` builds it."""
    config = load_config(None, tiny_overrides(model_dir, output_dir, **extra))
    torch.manual_seed(config.seed)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    pools = build_pools(config.data, config.eval.full_way_shots)
    drop = config.data.drop_small_classes
    train = pools.sampler("train", config.episode, config.seed, drop)
    val = pools.sampler("val", config.episode, config.seed + 1, drop)
    return MetaTrainer(learner, train, val, config.train, output_dir / "run", progress=False)


def _leftovers(run_dir: Path) -> list[str]:
    """Temporary files/directories of interrupted writes, and half-swapped checkpoints."""
    patterns = ("*.tmp", "*.old", f"*{NEW_SUFFIX}", f"*{OLD_SUFFIX}")
    found = [path for pattern in patterns for path in run_dir.rglob(pattern)]
    return sorted(str(p.relative_to(run_dir)) for p in found)


STEPS = 10


KILL_AFTER = 7  # checkpoints at 4, 8: the kill lands between them, after the eval at 6


KILL_EXTRA = {
    "train.steps": STEPS,
    "train.checkpoint_every": 4,
    "train.eval_every": 2,
    # with this lr the validation accuracy moves (here best at step 6 of 2, 4, 6, 8, 10),
    # so the killed run has written a newer best.safetensors than its last checkpoint knows
    "train.lr": 0.03,
}


TIMEOUT = 150.0


# a task mixture with state that depends on the encoder (hard-negative neighbours, k-means
# cluster tasks), refreshed at steps 0, 3, 6, 9: the resumed run must restore it
MIXTURE_EXTRA = {
    "data.train": "[clinc150, {source: "
    + str(Path(__file__).parents[1] / "examples" / "intents.csv")
    + ", weight: 0.5}]",
    "data.unlabeled": "{source: banking77, max_texts: 300, clusters: 10, n_way: 4, "
    "refresh_every: 3}",
    "episode.hard_negatives": 0.5,
    "episode.hard_refresh_every": 3,
    "episode.q_queries": 1,
}


def _cli(model_dir: Path, output_dir: Path, extra: dict[str, object]) -> list[str]:
    overrides = tiny_overrides(model_dir, output_dir, **KILL_EXTRA, **extra)
    return [sys.executable, "-m", "metalm.cli", "-q", "train", *overrides]


def _report_rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    report = json.loads((run_dir / "report.json").read_text())
    keep = ("accuracy", "ci95", "episodes", "per_episode", "vs_frozen")
    return {(r["method"], r["protocol"]): {k: r[k] for k in keep} for r in report["results"]}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, MIXTURE_EXTRA], ids=["one-source", "mixture"])
def test_resume_after_sigkill_gives_the_same_results(
    tiny_model_dir: Path, tmp_path: Path, extra: dict[str, object]
):
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    killed = kill_b_then_resume(
        _cli(tiny_model_dir, tmp_path / "a", extra),
        _cli(tiny_model_dir, tmp_path / "b", extra),
        [sys.executable, "-m", "metalm.cli", "-q", "train", "--resume", str(run_b)],
        run_b,
        kill_after=KILL_AFTER,
        steps=STEPS,
        env=one_thread_env(),
        timeout=TIMEOUT,
        errors=tmp_path,
    )
    context = f"(B killed after logging steps {killed.logged}, resumed from step {killed.step})"
    # the log (every step exactly once, with the same loss, lr and validation accuracy),
    # the best and final weights (bitwise) and the training summary
    report_a, _ = assert_same_runs(run_a, run_b, STEPS, context)
    assert report_a["train"]["steps"] == STEPS and report_a["train"]["best_step"] is not None

    # the final evaluation: every method and protocol, down to each episode
    rows_a, rows_b = _report_rows(run_a), _report_rows(run_b)
    assert rows_a.keys() == rows_b.keys()
    assert ("protonet", "3-way 1-shot") in rows_a
    for key in rows_a:
        assert rows_a[key] == rows_b[key], f"{key} differs {context}"
    state_a = json.loads((run_a / "checkpoint" / "state.json").read_text())
    assert state_a == json.loads((run_b / "checkpoint" / "state.json").read_text())
    assert _leftovers(run_a) == [] and _leftovers(run_b) == []
    if extra:  # the samplers' state went through the checkpoint
        assert_same_tensors(
            load_file(run_a / "checkpoint" / "samplers.safetensors"),
            load_file(run_b / "checkpoint" / "samplers.safetensors"),
        )


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # steps=10, warmup=2: (s+1)/2 for s < 2, then decay over the 8 steps 2..9
        ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.75, 6: 0.5, 9: 0.125, 10: 0.0, 50: 0.0}),
        ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 + 0.5**1.5, 6: 0.5, 10: 0.0, 50: 0.0}),
        ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 9: 1.0, 50: 1.0}),
    ],
)
def test_lr_lambda_warms_up_then_decays(schedule: str, expected: dict[int, float]):
    factor = lr_lambda(TrainConfig(steps=10, warmup_steps=2, schedule=schedule))
    assert {s: factor(s) for s in expected} == pytest.approx(expected)
    values = [factor(s) for s in range(2, 11)]
    assert values == sorted(values, reverse=True)  # never rises after the warm-up


def test_lr_lambda_without_warmup_and_bad_name():
    factor = lr_lambda(TrainConfig(steps=4, warmup_steps=0, schedule="linear"))
    assert [factor(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(MetalmError, match=r"train\.schedule"):
        lr_lambda(TrainConfig(schedule="exponential"))


def test_early_stopping_keeps_the_best_weights(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    extra = {
        "train.steps": 20,
        "train.eval_every": 2,
        "train.checkpoint_every": 5,
        "train.patience": 1,
        "train.warmup_steps": 0,
        "train.schedule": "cosine",
    }
    trainer = _trainer(tiny_model_dir, tmp_path, **extra)
    run_dir = trainer.run_dir
    scores = iter([0.5, 0.9, 0.4])  # evals at steps 2, 4, 6: best at 4, worse at 6 -> stop
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def scripted_validation(learner, sampler, episodes):
        seen[trainer.state.step] = weights_of(learner)
        return next(scores)

    monkeypatch.setattr("metalm.trainer.validation_accuracy", scripted_validation)
    result = trainer.fit()

    assert (result.steps, result.best_step, result.best_val_accuracy) == (6, 4, 0.9)
    assert result.stopped_early and sorted(seen) == [2, 4, 6]
    assert [h["step"] for h in result.val_history] == [2, 4, 6]
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r.get("val_accuracy") for r in log if "val_accuracy" in r] == [0.5, 0.9, 0.4]
    # each step logs the learning rate it trained with
    factor = lr_lambda(trainer.config)
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * factor(s) for s in range(6)])

    # the learner ends with the best (step 4) weights; the checkpoint holds step 6
    assert any(not torch.equal(seen[4][k], seen[6][k]) for k in seen[4])
    assert_same_tensors(weights_of(trainer.learner), seen[4])
    assert_same_tensors(load_file(run_dir / "best.safetensors"), seen[4])
    assert_same_tensors(load_file(run_dir / "checkpoint" / "learner.safetensors"), seen[6])
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and state["stopped_early"] and state["best_step"] == 4
    assert _leftovers(run_dir) == []

    # resuming a stopped run (here from a half-swapped checkpoint) trains no further
    os.replace(run_dir / "checkpoint", old_path(run_dir / "checkpoint"))
    again = _trainer(tiny_model_dir, tmp_path, **extra)
    resumed = again.fit(resume=True)
    assert (resumed.steps, resumed.best_step, resumed.stopped_early) == (6, 4, True)
    assert sorted(seen) == [2, 4, 6]
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(weights_of(again.learner), seen[4])
    assert _leftovers(run_dir) == [] and (run_dir / "checkpoint" / "state.json").exists()


def test_select_best_false_keeps_the_last_weights(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    extra = {"train.steps": 6, "train.eval_every": 2, "train.select_best": "false"}
    trainer = _trainer(tiny_model_dir, tmp_path, **extra)
    scores = iter([0.5, 0.9, 0.4])  # best at step 4, but the last weights are kept
    monkeypatch.setattr("metalm.trainer.validation_accuracy", lambda *args: next(scores))
    result = trainer.fit()
    assert (result.steps, result.best_step, result.best_val_accuracy) == (6, 4, 0.9)
    assert not (trainer.run_dir / "best.safetensors").exists()
    last = load_file(trainer.run_dir / "checkpoint" / "learner.safetensors")
    assert_same_tensors(weights_of(trainer.learner), last)


def test_early_stopping_when_validation_cannot_improve(tiny_model_dir: Path, tmp_path: Path):
    # lr=0: the weights never change, so the eval at step 4 ties the one at 2 -> stop
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        **{"train.steps": 12, "train.eval_every": 2, "train.patience": 1, "train.lr": 0},
    )
    initial = weights_of(trainer.learner)
    result = trainer.fit()
    assert result.stopped_early and result.steps == 4 < trainer.config.steps
    assert result.best_step == 2 and len(result.val_history) == 2
    assert result.val_history[0]["val_accuracy"] == result.val_history[1]["val_accuracy"]
    assert [r["step"] for r in read_log(trainer.run_dir)] == [1, 2, 3, 4]
    state = json.loads((trainer.run_dir / "checkpoint" / "state.json").read_text())
    assert state["stopped_early"] and state["step"] == 4
    assert_same_tensors(weights_of(trainer.learner), initial)
    assert_same_tensors(load_file(trainer.run_dir / "best.safetensors"), initial)


def test_non_finite_loss_stops_with_one_error_line_and_keeps_the_checkpoint(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # lr=1e30 sends the weights (and the learned logit scale) to ~1e29 after step 1,
    # so step 2's loss is nan; a checkpoint is written after every step
    overrides = tiny_overrides(
        tiny_model_dir, tmp_path, **{"train.lr": 1e30, "train.checkpoint_every": 1}
    )
    capsys.readouterr()
    assert main(["-q", "train", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    assert "loss" in lines[0] and "nan" in lines[0] and "train.lr" in lines[0]

    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_log(run_dir)] == [1]
    assert not (run_dir / "report.json").exists()
    assert _leftovers(run_dir) == []
    trainer = _trainer(tiny_model_dir, tmp_path, **{"train.checkpoint_every": 1})
    found = find_checkpoint(run_dir / "checkpoint")
    assert found == run_dir / "checkpoint"
    state = load_checkpoint(found, trainer.learner, trainer.optimizer, trainer.scheduler)
    assert state["step"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.learner.parameters())


def test_resume_without_a_checkpoint_is_a_clear_error(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    capsys.readouterr()
    assert main(["-q", "train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(
        load_config(None, tiny_overrides(tiny_model_dir, tmp_path)), run_dir / "config.yaml"
    )
    assert main(["-q", "train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no checkpoint to resume from" in err
    assert len(err.splitlines()) == 1

    assert main(["-q", "train", "--resume", str(run_dir), "train.steps=3"]) == 2
    assert "--resume" in capsys.readouterr().err

    trainer = _trainer(tiny_model_dir, tmp_path)
    trainer.run_dir = run_dir  # a run directory without a checkpoint
    with pytest.raises(MetalmError, match="no checkpoint to resume from"):
        trainer.fit(resume=True)
