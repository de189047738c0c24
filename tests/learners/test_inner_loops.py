"""`metalm.learners.inner_loops`: the pure inner loop against hand-written steps."""

from __future__ import annotations

import pytest
import torch
from learner_tools import quadratic

from metalm.errors import MetalmError
from metalm.learners import inner_loop
from metalm.learners.optim import adam, sgd


def test_inner_loop_equals_hand_written_sgd():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.rand(4) + 0.5
    new = inner_loop({"w": w, "b": b}, quadratic, (target, scale), 2, sgd(0.1))
    w1, b1 = w - 0.1 * 2 * scale * (w - target), b - 0.1 * 3 * b**2
    w2, b2 = w1 - 0.1 * 2 * scale * (w1 - target), b1 - 0.1 * 3 * b1**2
    assert torch.allclose(new["w"], w2) and torch.allclose(new["b"], b2)
    # second order by default: the result is differentiable like the hand-written one
    (g_auto,) = torch.autograd.grad(new["b"].sum(), b)
    (g_hand,) = torch.autograd.grad(b2.sum(), b)
    assert torch.allclose(g_auto, g_hand)


def test_inner_loop_per_tensor_rates_and_zero_steps():
    w, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    batch = (torch.zeros(3), torch.ones(3))
    new = inner_loop({"w": w, "b": b}, quadratic, batch, 1, sgd({"w": 0.5, "b": 0.0}))
    assert torch.allclose(new["w"], torch.zeros(3)) and torch.equal(new["b"], b)
    same = inner_loop({"w": w, "b": b}, quadratic, batch, 0, sgd(0.1))
    assert same["w"] is w and same["b"] is b
    with pytest.raises(MetalmError, match="inner steps"):
        inner_loop({"w": w}, quadratic, batch, -1, sgd(0.1))


def test_adam_inner_step_equals_formula():
    torch.manual_seed(1)
    w, b = torch.randn(4, requires_grad=True), torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.ones(4)
    new = inner_loop({"w": w, "b": b}, quadratic, (target, scale), 2, adam(0.01))
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    g1 = 2 * (w - target)
    m, v = (1 - b1_) * g1, (1 - b2_) * g1**2
    w1 = w - 0.01 * (m / (1 - b1_)) / torch.sqrt(v / (1 - b2_) + eps**2)
    g2 = 2 * (w1 - target)
    m, v = b1_ * m + (1 - b1_) * g2, b2_ * v + (1 - b2_) * g2**2
    w2 = w1 - 0.01 * (m / (1 - b1_**2)) / torch.sqrt(v / (1 - b2_**2) + eps**2)
    assert torch.allclose(new["w"], w2, atol=1e-6)
    optimizer = adam(0.1)
    step, (_, state) = optimizer.update({"w": torch.zeros(4)}, optimizer.init({"w": w}), {"w": w})
    assert not step["w"].any() and torch.isfinite(state.v["w"]).all()  # a zero step, no NaN
    assert state.count == 1
