"""Shared fixtures: a tiny random BERT (fast unit tests) and the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalm.models.tiny import save_tiny_bert


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer, saved locally."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def tiny_overrides(model_dir: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides for a fast run: tiny model, few steps/episodes, small splits."""
    values: dict[str, object] = {
        "model.name_or_path": str(model_dir),
        "model.max_length": 16,
        "output_dir": str(output_dir),
        "run_name": "run",
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.eval_every": 3,
        "train.val_episodes": 4,
        "train.checkpoint_every": 2,
        "train.lr": 1e-3,
        "train.tensorboard": False,
        "episode.n_way": 3,
        "episode.k_shot": 2,
        "episode.q_queries": 2,
        "eval.episodes": 5,
        "eval.q_queries": 3,
        "eval.settings": "[{n_way: 3, k_shot: 1}]",
        "eval.full_way_shots": "[]",
        "eval.baselines": "[{name: frozen}]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
