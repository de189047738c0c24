"""Fixtures the learner tests share: an encoder of a test's own, three small episodes."""

from __future__ import annotations

import pytest
from learner_tools import sampler

from metalm.models import EncoderConfig, TextEncoder


@pytest.fixture
def fresh_encoder(tiny_model_dir) -> TextEncoder:
    """An encoder of its own, for tests that change it (dtype, LoRA)."""
    return TextEncoder.from_config(EncoderConfig(name_or_path=str(tiny_model_dir), max_length=16))


@pytest.fixture(scope="module")
def episodes():
    """Three 3-way 2-shot episodes with 2 queries per class."""
    episode_sampler = sampler(3, 2, 2)
    return [episode_sampler.sample(i) for i in range(3)]
