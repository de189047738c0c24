"""`metalm.runs.accuracy`: accuracy with 95% intervals over episodes and over full-way queries."""

from __future__ import annotations

import math

import pytest
import torch

from metalm.data import EpisodeSampler, builtin_dataset
from metalm.learners import (
    FrozenCentroids,
    FrozenConfig,
)
from metalm.runs.accuracy import Z95, critical_value, evaluate_episodes, mean_ci95


@pytest.fixture(scope="module")
def episode():
    return EpisodeSampler(builtin_dataset("banking77", "test"), 4, 2, 3, seed=5).sample(0)


# -- evaluation ----------------------------------------------------------------------
def test_mean_ci95_formula():
    """Student's t interval below 30 values, the normal one from 30 on."""
    from scipy.stats import t

    values = [0.2, 0.4, 0.9, 0.5]
    mean, ci = mean_ci95(values)
    std = torch.tensor(values, dtype=torch.float64).std().item()
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx(t.ppf(0.975, 3) * std / 2)
    for n in range(2, 30):
        assert critical_value(n) == pytest.approx(t.ppf(0.975, n - 1), abs=1e-6)
    values = [i % 7 / 7 for i in range(30)]
    std = torch.tensor(values, dtype=torch.float64).std().item()
    assert mean_ci95(values)[1] == pytest.approx(Z95 * std / 30**0.5)


def test_evaluation_cached_equals_uncached(tiny_encoder):
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 1, 4, seed=2)
    episodes = [sampler.sample(i) for i in range(6)]
    learner = FrozenCentroids(tiny_encoder, FrozenConfig())
    uncached = evaluate_episodes(learner, episodes, "frozen", "p", "d", timing_episodes=6)
    cached = evaluate_episodes(learner, episodes, "frozen", "p", "d", timing_episodes=0)
    assert cached.per_episode == pytest.approx(uncached.per_episode)
    assert uncached.adapt_seconds > 0 and uncached.predict_texts_per_second > 0


def test_full_way_interval_is_over_queries(tiny_encoder):
    episode = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 20, seed=3).sample(0)
    result = evaluate_episodes(
        FrozenCentroids(tiny_encoder, FrozenConfig()), [episode], "frozen", "full", "d"
    )
    p = result.accuracy
    assert result.ci95 == pytest.approx(Z95 * math.sqrt(max(p * (1 - p), 1e-12) / 100))
