"""`metalm.learners.protonet`: `frozen` (nearest centroid) and `protonet` (its meta-loss,
temperature, distances and the ridge train head)."""

from __future__ import annotations

import math

import pytest
import torch
from learner_tools import sampler

from metalm.config import load_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.learners import (
    FrozenCentroids,
    FrozenConfig,
    ProtoNet,
    ProtoNetConfig,
    build_learner,
)
from metalm.learners.protonet import ridge_logits
from metalm.models import EncoderConfig, TextEncoder
from metalm.runs.accuracy import evaluate_episodes


@pytest.fixture(scope="module")
def episode():
    return sampler(4, 2, 3).sample(0)


def test_frozen_is_nearest_centroid(tiny_encoder, episode):
    learner = FrozenCentroids(tiny_encoder, FrozenConfig(head="centroid"))
    state = learner.adapt(episode.support_texts, episode.support_labels)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    expected = torch.stack([support[labels == c].mean(0) for c in range(episode.n_way)])
    assert torch.allclose(state["prototypes"], expected, atol=1e-6)
    query = tiny_encoder.embed(episode.query_texts)
    nearest = torch.cdist(query, expected).argmin(-1)
    assert torch.equal(learner.predict(state, episode.query_texts).argmax(-1), nearest)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_meta_loss_trains_encoder_and_temperature(tiny_encoder, episode, distance):
    learner = ProtoNet(tiny_encoder, ProtoNetConfig(distance=distance))
    learner.train()
    loss = learner.meta_loss(episode)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    assert learner.log_scale.grad is not None and learner.log_scale.grad != 0
    grads = [p.grad for p in tiny_encoder.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    learner.zero_grad()


def test_protonet_fixed_temperature_and_bad_distance(tiny_encoder):
    fixed = ProtoNet(tiny_encoder, ProtoNetConfig(learn_scale=False))
    assert not fixed.log_scale.requires_grad
    with pytest.raises(MetalmError, match="distance"):
        ProtoNet(tiny_encoder, ProtoNetConfig(distance="manhattan"))


# -- the real MiniLM -----------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_frozen_beats_chance_clearly_on_banking77():
    encoder = TextEncoder.from_config(EncoderConfig())
    assert encoder.dim == 384
    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 5, seed=0)
    episodes = [sampler.sample(i) for i in range(20)]
    result = evaluate_episodes(
        FrozenCentroids(encoder, FrozenConfig()),
        episodes,
        "frozen",
        "5-way 1-shot",
        "banking77",
        timing_episodes=2,
        progress=False,
    )
    # published floor for this protocol: 87.09 ± 0.67 over 600 episodes
    assert 0.75 < result.accuracy <= 1.0


def test_ridge_logits_equal_the_primal_solution():
    torch.manual_seed(0)
    support = torch.randn(12, 5, dtype=torch.float64)
    query = torch.randn(7, 5, dtype=torch.float64)
    labels = torch.arange(4).repeat(3)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    lam = 0.3
    weight = torch.linalg.solve(support.T @ support + lam * torch.eye(5, dtype=torch.float64),
                                support.T @ onehot)  # fmt: skip
    torch.testing.assert_close(ridge_logits(support, labels, query, 4, lam), query @ weight)


@pytest.mark.parametrize("train_head", ["prototype", "ridge"])
def test_meta_loss_trains_the_encoder_with_either_head(tiny_model_dir, train_head):
    config = load_config(
        None,
        [f"model.name_or_path={tiny_model_dir}", "model.max_length=16",
         f"learner.train_head={train_head}"],
    )  # fmt: skip
    torch.manual_seed(0)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    episode = EpisodeSampler(builtin_dataset("clinc150", "train"), 4, 2, 2, seed=0).sample(0)
    loss = learner.meta_loss(episode)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in learner.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert learner.log_scale.grad is not None and learner.log_scale.grad != 0


def test_bad_train_head_settings():
    for override, message in (
        ("learner.train_head=svm", "prototype, ridge"),
        ("learner.ridge_lambda=0", "ridge_lambda must be > 0"),
    ):
        with pytest.raises(MetalmError, match=message):  # when the config is loaded
            load_config(None, [override])
