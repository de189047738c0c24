"""`metalm.learners.proximal`: the proximal term and its implicit meta-gradient."""

from __future__ import annotations

import pytest
import torch
from learner_tools import learner_for, quadratic

from metalm.learners import inner_loop
from metalm.learners.optim import inner_optimizer, sgd
from metalm.learners.proximal import conjugate_gradient


def test_proximal_term_changes_adapted_params_as_the_formula_says():
    torch.manual_seed(2)
    w, b = torch.randn(4), torch.randn(2)
    target, scale, lr, lam = torch.randn(4), torch.rand(4) + 0.5, 0.1, 0.7
    new = inner_loop(
        {"w": w, "b": b}, quadratic, (target, scale), 2, inner_optimizer("sgd", lr, lam)
    )
    # step 1: the penalty's gradient is zero at the anchor; step 2: 2 * lam * (p1 - p0)
    w1, b1 = w - lr * 2 * scale * (w - target), b - lr * 3 * b**2
    w2 = w1 - lr * (2 * scale * (w1 - target) + 2 * lam * (w1 - w))
    b2 = b1 - lr * (3 * b1**2 + 2 * lam * (b1 - b))
    assert torch.allclose(new["w"], w2) and torch.allclose(new["b"], b2)
    plain = inner_loop({"w": w, "b": b}, quadratic, (target, scale), 2, sgd(lr))
    assert (new["w"] - w).norm() < (plain["w"] - w).norm()  # pulled toward the anchor


def test_proximal_learner_adapts_closer_to_the_meta_parameters(tiny_encoder, episodes):
    episode = episodes[0]
    spec = {"adapt": "bias", "inner_steps": 3, "inner_lr": 0.5}
    plain = learner_for(tiny_encoder, name="proximal", prox_lambda=0.0, **spec)
    maml = learner_for(tiny_encoder, name="maml", **spec)
    strong = learner_for(tiny_encoder, name="proximal", prox_lambda=0.5, **spec)
    a = plain.adapt(episode.support_texts, episode.support_labels)
    b = maml.adapt(episode.support_texts, episode.support_labels)
    c = strong.adapt(episode.support_texts, episode.support_labels)
    meta = {k: v.detach() for k, v in plain.meta_params().items()}
    assert all(torch.allclose(a[k], b[k]) for k in a)  # λ = 0 is MAML's inner loop

    def distance(state):
        return sum((state[k] - meta[k]).norm() ** 2 for k in meta)

    assert distance(c) < distance(a)


@pytest.mark.slow
def test_implicit_gradient_matches_the_unrolled_one_at_convergence(fresh_encoder, episodes):
    fresh_encoder.model.double()
    # a strong pull and small steps: the 60-step inner loop converges to its fixed point,
    # where the unrolled second-order gradient equals the implicit one
    spec = {"name": "proximal", "adapt": "bias", "head_init": "zero", "prox_lambda": 10.0}
    spec |= {"inner_steps": 60, "head_lr": 0.02, "inner_lr": 0.02}
    flat = {}
    for kind, extra in (
        ("unrolled", {}),
        ("implicit", {"implicit": True, "cg_steps": 20}),
        ("first_order", {"first_order": True}),
    ):
        learner = learner_for(fresh_encoder, **spec, **extra)
        meta = learner.meta_params()
        learner.meta_loss(episodes[0]).backward()
        flat[kind] = torch.cat([p.grad.flatten() for p in meta.values()])
        learner.zero_grad()
    scale = flat["unrolled"].norm()
    assert (flat["implicit"] - flat["unrolled"]).norm() < 1e-6 * scale
    assert (flat["first_order"] - flat["unrolled"]).norm() > 0.1 * scale  # not trivially equal
    implicit = learner_for(fresh_encoder, **spec, implicit=True, vectorize=True)
    assert implicit.meta_loss_batch(episodes) is None  # iMAML loops over episodes


def test_conjugate_gradient_solves_and_truncates():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=torch.float64)
    spd = m @ m.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    (x,) = conjugate_gradient(lambda v: [spd @ v[0]], [b], 5)
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-8)
    (y,) = conjugate_gradient(lambda v: [-v[0]], [b], 5)  # negative curvature: first order
    assert torch.equal(y, b)
