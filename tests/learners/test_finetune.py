"""`metalm.learners.finetune`: transfer learning, fine-tuning a copy for each task."""

from __future__ import annotations

import pytest
import torch
from learner_tools import assert_unchanged, sampler, snapshot

from metalm.errors import MetalmError
from metalm.learners import (
    Finetune,
    FinetuneConfig,
)


@pytest.fixture(scope="module")
def episode():
    return sampler(4, 2, 3).sample(0)


@pytest.mark.parametrize("train_encoder", [False, True])
def test_finetune_never_changes_the_model_and_fits_support(tiny_encoder, episode, train_encoder):
    before = snapshot(tiny_encoder)
    learner = Finetune(
        tiny_encoder,
        FinetuneConfig(head_steps=100, steps=3, head_lr=0.1, lr=1e-3, train_encoder=train_encoder),
    )
    state = learner.adapt(episode.support_texts, episode.support_labels)
    assert_unchanged(before, tiny_encoder)
    assert any(k.startswith("encoder.") for k in state) == train_encoder
    support_logits = learner.predict(state, episode.support_texts)
    accuracy = (support_logits.argmax(-1) == torch.tensor(episode.support_labels)).float().mean()
    assert accuracy == 1.0  # a linear head on 8 distinct texts separates them


def test_finetune_is_deterministic(tiny_encoder, episode):
    learner = Finetune(tiny_encoder, FinetuneConfig(head_steps=5, steps=2))
    a = learner.predict(learner.adapt(episode.support_texts, episode.support_labels), ["x"])
    b = learner.predict(learner.adapt(episode.support_texts, episode.support_labels), ["x"])
    assert torch.equal(a, b)


def test_finetune_bad_config_fails_at_construction(tiny_encoder):
    with pytest.raises(MetalmError, match="head_init"):
        Finetune(tiny_encoder, FinetuneConfig(head_init="random"))
    with pytest.raises(MetalmError, match="steps"):
        Finetune(tiny_encoder, FinetuneConfig(steps=-1))
