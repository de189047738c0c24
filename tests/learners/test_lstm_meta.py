"""`metalm.learners.lstm_meta`: the LSTM meta-learner (Ravi & Larochelle 2017)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_overrides
from learner_tools import meta_params, sampler, seeded_learner

from metalm.config import load_config
from metalm.learners import build_learner
from metalm.learners.lstm_meta import MetaLSTMCell, preprocess
from metalm.models import TextEncoder
from metalm.tasks import build_pools
from metalm.trainer import MetaTrainer


@pytest.fixture(scope="module")
def episode():
    return sampler(3, 3).sample(0)


def set_gates(cell: MetaLSTMCell, forget: float, step: float) -> None:
    with torch.no_grad():
        for gate, value in ((cell.forget_gate, forget), (cell.input_gate, step)):
            gate.weight.zero_()
            gate.bias.fill_(math.log(value / (1 - value)))


# -- lstm_meta -------------------------------------------------------------------------------
def test_preprocessing_follows_the_paper():
    got = preprocess(torch.tensor([1e-5, 2.0, -3.0]))
    expected = torch.tensor(
        [[-1.0, math.exp(10) * 1e-5], [math.log(2) / 10, 1.0], [math.log(3) / 10, -1.0]]
    )
    assert torch.allclose(got, expected, atol=1e-6)


def test_lstm_update_with_hand_set_gates_equals_the_formula(tiny_encoder, episode):
    cell = MetaLSTMCell(4, 0.05, 0.99)
    set_gates(cell, 0.9, 0.2)
    theta, grad = torch.randn(6), torch.randn(6)
    new, (_, _, f, i) = cell(grad, torch.tensor(1.3), theta, None)
    assert torch.allclose(new, 0.9 * theta - 0.2 * grad)
    assert torch.allclose(f, torch.full((6,), 0.9)) and torch.allclose(i, torch.full((6,), 0.2))
    # the learner's inner loop: two updates θ_t = f θ_{t-1} - i ∇L(θ_{t-1}) from θ_0
    learner = seeded_learner(tiny_encoder, name="lstm_meta", inner_steps=2, adapter_dim=3)
    set_gates(learner.cell, 0.9, 0.2)
    support = tiny_encoder.embed(episode.support_texts)
    labels = torch.tensor(episode.support_labels)
    with torch.no_grad():
        params = {k: v.clone() for k, v in learner.initial_params(support, labels, 3).items()}
    for _ in range(2):
        leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = learner.support_loss(leaf, support, labels)
        grads = torch.autograd.grad(loss, list(leaf.values()))
        params = {
            k: 0.9 * v.detach() - 0.2 * g for (k, v), g in zip(leaf.items(), grads, strict=True)
        }
    state = learner.adapt(episode.support_texts, episode.support_labels)
    assert set(state) == {"head.weight", "head.bias", "adapter.down", "adapter.up"}
    for key in params:
        assert torch.allclose(state[key], params[key], atol=1e-6), key
    assert not torch.allclose(state["adapter.up"], torch.zeros_like(state["adapter.up"]))


def test_lstm_meta_head_fits_any_n_from_one_shared_init(tiny_encoder):
    learner = seeded_learner(tiny_encoder, name="lstm_meta", inner_steps=1, head_init="zero")
    for n_way in (2, 6):
        ep = sampler(n_way, 2, seed=n_way).sample(0)
        state = learner.adapt(ep.support_texts, ep.support_labels)
        assert state["head.weight"].shape == (n_way, tiny_encoder.dim)
        assert learner.predict(state, ep.query_texts).shape == (2 * n_way, n_way)


def test_lstm_meta_parameters_get_gradients_and_change_in_training(tiny_model_dir, tmp_path):
    extra = {"learner.name": "lstm_meta", "learner.adapter_dim": 4, "learner.inner_steps": 2}
    config = load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra))
    torch.manual_seed(0)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    params = meta_params(learner)
    assert any(n.startswith("cell.lstm.") for n in params) and any("theta0" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    encoder_before = {n: p.detach().clone() for n, p in learner.encoder.named_parameters()}
    train = build_pools(config.data, []).sampler("train", config.episode, 0)
    learner.meta_loss(train.sample(0)).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in learner.encoder.parameters())  # frozen: no graph
    learner.zero_grad()
    trainer = MetaTrainer(learner, train, None, config.train, tmp_path / "run", progress=False)
    (group,) = trainer.optimizer.param_groups  # the meta-parameters only, at meta_lr
    assert group["initial_lr"] == learner.config.meta_lr and group["weight_decay"] == 0.0
    for step in range(3):
        trainer._step(step)
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), name
    for name, p in learner.encoder.named_parameters():
        assert torch.equal(p.detach(), encoder_before[name]), name
