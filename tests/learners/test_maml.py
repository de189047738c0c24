"""`metalm.learners.maml`: MAML's second-order and FOMAML's first-order meta-gradients,
Meta-SGD's learned rates."""

from __future__ import annotations

import math

import pytest
import torch
from learner_tools import learner_for
from torch import nn

from metalm.learners import inner_loop
from metalm.learners.optim import sgd


def grads_of(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in params.items()}


def test_first_order_carries_no_second_order_terms():
    # inner: 0.5 * a * w^2 -> w' = (1 - lr a) w ; outer: sum(c * w')
    a, c, lr = torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]), 0.1
    for first_order, expected in ((False, c * (1 - lr * a)), (True, c)):
        w = torch.tensor([0.5, -0.2], requires_grad=True)
        new = inner_loop(
            {"w": w},
            lambda p, _b: 0.5 * (a * p["w"] ** 2).sum(),
            None,
            3,
            sgd(lr),
            first_order,
        )
        (grad,) = torch.autograd.grad((c * new["w"]).sum(), w)
        factor = 1 if first_order else (1 - lr * a) ** 2  # two more steps
        assert torch.allclose(grad, expected * factor)
        if first_order:
            assert new["w"].grad_fn is not None  # identity path kept
            assert torch.allclose(new["w"], w * (1 - lr * a) ** 3)


# -- learners on the tiny model ------------------------------------------------------------
def test_zero_inner_steps_gives_the_plain_query_loss(tiny_encoder, episodes):
    episode = episodes[0]
    for name in ("maml", "anil"):
        learner = learner_for(tiny_encoder, name=name, inner_steps=0, logit_scale=7.0)
        with torch.no_grad():
            support = tiny_encoder(episode.support_texts)
            query = tiny_encoder(episode.query_texts)
            means = torch.stack(
                [support[torch.tensor(episode.support_labels) == c].mean(0) for c in range(3)]
            )
            logits = 7.0 * (query @ (2 * means).T - means.pow(2).sum(-1))  # prototype head
            expected = nn.functional.cross_entropy(logits, torch.tensor(episode.query_labels))
            assert torch.allclose(learner.meta_loss(episode), expected, atol=1e-5), name
    zero = learner_for(tiny_encoder, name="maml", inner_steps=0, head_init="zero")
    assert zero.meta_loss(episode).item() == pytest.approx(math.log(3))


def test_fomaml_meta_gradient_is_the_query_gradient_at_the_adapted_params(tiny_encoder, episodes):
    episode = episodes[0]
    learner = learner_for(
        tiny_encoder, name="fomaml", adapt="last_n", last_n=1, head_init="zero", inner_steps=2
    )
    meta = learner.meta_params()
    learner.zero_grad()
    learner.meta_loss(episode).backward()
    got = grads_of(meta)
    learner.zero_grad()
    # the same adaptation, then the plain query gradient w.r.t. the adapted tensors
    state = learner.adapt(episode.support_texts, episode.support_labels)
    adapted = {k: state[k].clone().requires_grad_() for k in meta}
    ids, mask = learner._tokens([episode.query_texts])[0]
    features = learner._features(ids, mask, adapted, False)
    loss = nn.functional.cross_entropy(
        learner.logits(state, features), torch.tensor(episode.query_labels)
    )
    expected = dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values())), strict=True))
    for key in meta:
        assert torch.allclose(got[key], expected[key], rtol=1e-4, atol=1e-6), key


def test_second_order_meta_gradient_matches_finite_differences(fresh_encoder, episodes):
    episode = episodes[0]
    fresh_encoder.model.double()
    # an inner rate big enough that the second-order terms matter
    spec = {"adapt": "last_n", "last_n": 1, "inner_steps": 2, "inner_lr": 0.5}
    learner = learner_for(fresh_encoder, name="maml", **spec)
    meta = learner.meta_params()
    learner.meta_loss(episode).backward()
    torch.manual_seed(0)
    direction = {k: torch.randn_like(p) for k, p in meta.items()}
    analytic = sum((meta[k].grad * d).sum() for k, d in direction.items()).item()

    def loss_at(sign: float) -> float:
        with torch.no_grad():
            for k, p in meta.items():
                p.add_(sign * 1e-6 * direction[k])
        value = learner.meta_loss(episode).item()
        with torch.no_grad():
            for k, p in meta.items():
                p.sub_(sign * 1e-6 * direction[k])
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / 2e-6
    assert analytic == pytest.approx(numeric, rel=1e-5)
    # and the first-order gradient differs from it: it lacks those terms
    fomaml = learner_for(fresh_encoder, name="fomaml", **spec)
    learner.zero_grad()
    fomaml.meta_loss(episode).backward()
    first = sum((meta[k].grad * d).sum() for k, d in direction.items()).item()
    assert abs(first - numeric) > 1e-3 * abs(numeric)


def test_metasgd_learning_rates_receive_gradients_and_change(tiny_encoder, episodes):
    learner = learner_for(tiny_encoder, name="metasgd", adapt="last_n", last_n=1, inner_steps=2)
    rates = dict(learner.inner_lrs.items())
    assert set(rates) >= {"head__weight", "head__bias"} and len(rates) > 2
    before = {k: v.detach().clone() for k, v in rates.items()}
    groups = learner.optimizer_groups(1e-5, 0.01)
    assert groups[1]["lr"] == learner.config.lr_meta_lr and groups[1]["weight_decay"] == 0
    optimizer = torch.optim.AdamW(groups)
    learner.meta_loss(episodes[0]).backward()
    for key, rate in rates.items():
        assert rate.grad is not None and rate.grad.abs().sum() > 0, key
    optimizer.step()
    optimizer.zero_grad()
    for key, rate in rates.items():
        if "key__bias" not in key:  # attention key biases have exactly zero gradient
            assert not torch.equal(rate.detach(), before[key]), key
    element = learner_for(tiny_encoder, name="metasgd", adapt="bias", lr_shape="element")
    weight = tiny_encoder.model.get_parameter("encoder.layer.0.output.dense.bias")
    assert (
        element.inner_lrs["encoder__encoder__layer__0__output__dense__bias"].shape == weight.shape
    )
