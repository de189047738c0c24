"""`metalm.learners.functional`: pure inner loops, conjugate gradient, which parameters
adapt."""

from __future__ import annotations

import pytest
import torch
from learner_tools import quadratic
from torch import nn

from metalm.errors import MetalmError
from metalm.learners import (
    FOMAMLConfig,
    build_learner,
    inner_loop,
    select_params,
)
from metalm.learners.functional import conjugate_gradient, vmap_safe_layer_norm
from metalm.learners.optim import adam, sgd


# -- inner_loop on toy functions --------------------------------------------------------
def test_inner_loop_equals_hand_written_sgd():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.rand(4) + 0.5
    new = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, sgd(0.1))
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
    new = inner_loop(None, {"w": w, "b": b}, quadratic, batch, 1, sgd({"w": 0.5, "b": 0.0}))
    assert torch.allclose(new["w"], torch.zeros(3)) and torch.equal(new["b"], b)
    same = inner_loop(None, {"w": w, "b": b}, quadratic, batch, 0, sgd(0.1))
    assert same["w"] is w and same["b"] is b
    with pytest.raises(MetalmError, match="inner steps"):
        inner_loop(None, {"w": w}, quadratic, batch, -1, sgd(0.1))


def test_adam_inner_step_equals_formula():
    torch.manual_seed(1)
    w, b = torch.randn(4, requires_grad=True), torch.randn(2, requires_grad=True)
    target, scale = torch.randn(4), torch.ones(4)
    new = inner_loop(None, {"w": w, "b": b}, quadratic, (target, scale), 2, adam(0.01))
    b1_, b2_, eps = 0.9, 0.999, 1e-8
    g1 = 2 * (w - target)
    m, v = (1 - b1_) * g1, (1 - b2_) * g1**2
    w1 = w - 0.01 * (m / (1 - b1_)) / torch.sqrt(v / (1 - b2_) + eps**2)
    g2 = 2 * (w1 - target)
    m, v = b1_ * m + (1 - b1_) * g2, b2_ * v + (1 - b2_) * g2**2
    w2 = w1 - 0.01 * (m / (1 - b1_**2)) / torch.sqrt(v / (1 - b2_**2) + eps**2)
    assert torch.allclose(new["w"], w2, atol=1e-6)
    optimizer = adam(0.1)
    step, state = optimizer.update({"w": torch.zeros(4)}, optimizer.init({"w": w}), {"w": w})
    assert torch.equal(step["w"], w) and torch.isfinite(state.v["w"]).all()
    assert state.count == 1


def test_conjugate_gradient_solves_and_truncates():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=torch.float64)
    spd = m @ m.T + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    (x,) = conjugate_gradient(lambda v: [spd @ v[0]], [b], 5)
    assert torch.allclose(x, torch.linalg.solve(spd, b), atol=1e-8)
    (y,) = conjugate_gradient(lambda v: [-v[0]], [b], 5)  # negative curvature: first order
    assert torch.equal(y, b)


def test_vmap_safe_layer_norm_is_exact_and_scoped():
    x, w, bias = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    expected = nn.functional.layer_norm(x, (8,), w, bias, 1e-12)
    original = nn.functional.layer_norm
    with vmap_safe_layer_norm():
        assert nn.functional.layer_norm is not original
        assert torch.allclose(
            nn.functional.layer_norm(x, (8,), w, bias, 1e-12), expected, atol=1e-5
        )
    assert nn.functional.layer_norm is original


# -- which parameters adapt --------------------------------------------------------------
def test_select_params_modes(tiny_encoder):
    names = [n for n, _ in tiny_encoder.model.named_parameters()]
    everything = select_params(tiny_encoder, "all")
    assert set(everything) == {n for n in names if "pooler" not in n}
    assert select_params(tiny_encoder, "head") == {}
    last = select_params(tiny_encoder, "last_n", 1)
    assert last and all(n.startswith("encoder.layer.1.") for n in last)
    assert len(select_params(tiny_encoder, "last_n", 2)) == 2 * len(last)
    assert all(n.endswith("bias") for n in select_params(tiny_encoder, "bias"))
    with pytest.raises(MetalmError, match=r"last_n must be in 1\.\.2"):
        select_params(tiny_encoder, "last_n", 3)
    with pytest.raises(MetalmError, match="no LoRA tensors"):
        select_params(tiny_encoder, "lora")
    with pytest.raises(MetalmError, match=r"learner\.adapt must be one of"):
        select_params(tiny_encoder, "odd")


def test_embedding_tables_adapt_only_when_asked(tiny_encoder):
    tables = {
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
    }
    without = select_params(tiny_encoder, "all", embeddings=False)
    assert tables <= set(select_params(tiny_encoder, "all"))
    assert not tables & set(without)
    assert "embeddings.LayerNorm.weight" in without
    default = build_learner(tiny_encoder, FOMAMLConfig(adapt="all"))
    assert not tables & set(default.adapted_names)
    opted_in = build_learner(tiny_encoder, FOMAMLConfig(adapt="all", adapt_embeddings=True))
    assert tables <= set(opted_in.adapted_names)
