"""`metalm.learners.metanet`: the hypernetwork that writes each task's head."""

from __future__ import annotations

import math
import random

import pytest
import torch
from learner_tools import meta_params, sampler, seeded_learner
from torch import nn

from metalm.learners.base import head_logits


@pytest.fixture(scope="module")
def episode():
    return sampler(3, 3).sample(0)


def shuffled(texts: list[str], labels: list[int], seed: int) -> tuple[list[str], list[int]]:
    pairs = list(zip(texts, labels, strict=True))
    random.Random(seed).shuffle(pairs)
    return [t for t, _ in pairs], [y for _, y in pairs]


# -- metanet -------------------------------------------------------------------------------
def test_metanet_is_invariant_to_support_order_and_equivariant_to_classes(tiny_encoder, episode):
    learner = seeded_learner(tiny_encoder, name="metanet", layers=2, hidden=16, film=True)
    texts, labels = episode.support_texts, episode.support_labels
    state = learner.adapt(texts, labels)
    logits = learner.predict(state, episode.query_texts)
    assert not torch.allclose(state["head.weight"][0], state["head.weight"][1])
    # the examples of each class in another order: the same head, the same predictions
    texts2, labels2 = shuffled(texts, labels, seed=1)
    assert texts2 != texts
    again = learner.adapt(texts2, labels2)
    for key, value in state.items():
        assert torch.allclose(again[key], value, atol=1e-6), key
    assert torch.allclose(learner.predict(again, episode.query_texts), logits, atol=1e-5)
    # classes renamed by a permutation: the head rows and the logits follow it
    perm = [2, 0, 1]
    renamed = learner.adapt(texts, [perm[y] for y in labels])
    assert torch.allclose(renamed["head.weight"][perm], state["head.weight"], atol=1e-6)
    assert torch.allclose(learner.predict(renamed, episode.query_texts)[:, perm], logits, atol=1e-5)
    assert not torch.allclose(learner.predict(renamed, episode.query_texts), logits)


@pytest.mark.parametrize("layers", [1, 3])
def test_metanet_trained_on_3_way_2_shot_handles_7_way_5_shot(tiny_encoder, layers):
    learner = seeded_learner(
        tiny_encoder, perturb=False, name="metanet", layers=layers, hidden=16, context=True
    )
    linears = [m for m in [*learner.phi, learner.rho] if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert learner.rho.out_features == tiny_encoder.dim + 1
    params = meta_params(learner)
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    train = sampler(3, 2, seed=1)
    for step in range(3):
        optimizer.zero_grad()
        learner.meta_loss(train.sample(step)).backward()
        optimizer.step()
    assert learner.rho.weight.abs().sum() > 0  # it did train
    big = sampler(7, 5, q=2, seed=2).sample(0)
    state = learner.adapt(big.support_texts, big.support_labels)
    assert state["head.weight"].shape == (7, tiny_encoder.dim) and state["head.bias"].shape == (7,)
    logits = learner.predict(state, big.query_texts)
    assert logits.shape == (14, 7) and torch.isfinite(logits).all()
    assert math.isfinite(learner.meta_loss(big).item())


def test_untrained_metanet_is_the_prototype_classifier(tiny_encoder, episode):
    learner = seeded_learner(tiny_encoder, perturb=False, name="metanet", film=True)
    state = learner.adapt(episode.support_texts, episode.support_labels)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    means = torch.stack([support[labels == c].mean(0) for c in range(3)])
    query = tiny_encoder.embed(episode.query_texts)
    expected = 10.0 * (query @ (2 * means).T - means.pow(2).sum(-1))
    assert torch.allclose(learner.predict(state, episode.query_texts), expected, atol=1e-5)
    assert torch.equal(state["film.scale"], torch.ones(tiny_encoder.dim))


def test_metanet_finetune_steps_are_sgd_on_the_generated_head(tiny_encoder, episode):
    spec = {"name": "metanet", "layers": 2, "hidden": 16, "inner_lr": 0.5}
    generated = seeded_learner(tiny_encoder, **spec)
    tuned = seeded_learner(tiny_encoder, **spec, finetune_steps=2)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    head = generated.adapt(episode.support_texts, episode.support_labels)
    for _ in range(2):  # by hand
        leaf = {k: v.clone().requires_grad_() for k, v in head.items()}
        loss = nn.functional.cross_entropy(head_logits(leaf, support, 10.0), labels)
        grads = torch.autograd.grad(loss, list(leaf.values()))
        head = {k: v.detach() - 0.5 * g for (k, v), g in zip(leaf.items(), grads, strict=True)}
    state = tuned.adapt(episode.support_texts, episode.support_labels)
    for key in head:
        assert torch.allclose(state[key], head[key], atol=1e-5), key
    # meta-training differentiates through the fine-tuning steps (second order)
    tuned.meta_loss(episode).backward()
    support, s_labels, query, q_labels = tuned.episode_tensors(episode)
    expected = {}
    for second_order in (True, False):
        head = tuned.generate(support, s_labels, 3)
        for _ in range(2):
            loss = nn.functional.cross_entropy(head_logits(head, support, 10.0), s_labels)
            grads = torch.autograd.grad(loss, list(head.values()), create_graph=second_order)
            head = {k: v - 0.5 * g for (k, v), g in zip(head.items(), grads, strict=True)}
        outer = nn.functional.cross_entropy(head_logits(head, query, 10.0), q_labels)
        (expected[second_order],) = torch.autograd.grad(outer, tuned.rho.weight)
    assert torch.allclose(tuned.rho.weight.grad, expected[True], atol=1e-6)
    assert not torch.allclose(expected[False], expected[True], atol=1e-4)
