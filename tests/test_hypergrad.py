"""Tests for hypergradient descent on the learning rate (`train.hypergradient_lr`): the
rate moves the way ∂loss/∂lr says, with SGD and AdamW, and inside MetaTrainer."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import tiny_overrides

from metalm.config import load_config
from metalm.errors import MetalmError
from metalm.hypergrad import HypergradientLR
from metalm.runs.recipe import run


def _descend(
    optimizer_class, lr: float, beta: float, steps: int = 5, scheduler=False, rule="additive"
):
    """Minimise 0.5·x² from x=1; returns the rates used and the hypergradients."""
    x = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = optimizer_class([x], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0) if scheduler else None
    hyper = HypergradientLR(optimizer, sched, beta=beta, rule=rule)
    rates, hypergrads = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * x.pow(2)).sum().backward()
        hyper.before_step()
        rates.append(hyper.lrs_used[0])
        hypergrads.append(list(hyper.last_hypergradients))
        optimizer.step()
        hyper.after_step()
        if sched is not None:
            sched.step()
    return rates, hypergrads


def test_sgd_small_rate_grows_large_rate_shrinks():
    # too small a step: successive gradients agree (g_t·g_{t-1} > 0), so the rate grows
    rates, h = _descend(torch.optim.SGD, lr=0.1, beta=0.5)
    assert all(b > a for a, b in itertools.pairwise(rates))
    # the exact update of Baydin et al.: lr_1 = lr_0 + β·g_1·g_0 with g_0 = 1, g_1 = 0.9
    assert rates[1] == pytest.approx(0.1 + 0.5 * 0.9 * 1.0)
    # overshooting (lr > 1 flips the sign of x): gradients disagree, so the rate shrinks
    rates, h = _descend(torch.optim.SGD, lr=1.5, beta=0.1)
    assert h[1][0] < 0 and rates[1] < rates[0]
    assert rates[1] == pytest.approx(1.5 + 0.1 * (-0.5) * 1.0)


def test_multiplicative_rule_is_relative_and_stays_positive():
    # agreeing gradients (cos = +1): the rate grows by exactly the factor 1 + β
    rates, _ = _descend(torch.optim.SGD, lr=0.1, beta=0.5, rule="multiplicative")
    assert rates[1] == pytest.approx(0.1 * 1.5)
    # overshooting (cos = −1): it shrinks by 1 − β, and never to zero, however many steps
    rates, _ = _descend(torch.optim.SGD, lr=1.5, beta=0.1, steps=40, rule="multiplicative")
    assert rates[1] == pytest.approx(1.5 * 0.9)
    assert all(r > 0 for r in rates)
    # the additive rule with a β too large for the gradient scale hits the floor and stays
    rates, _ = _descend(torch.optim.SGD, lr=1.5, beta=100.0, rule="additive")
    assert rates[1] == 0.0 and rates[-1] == 0.0


def test_adamw_variant_and_scheduler_base_rate():
    rates, _ = _descend(torch.optim.AdamW, lr=0.01, beta=1e-3, scheduler=True)
    assert rates[-1] > rates[0]  # far from the minimum, the Adam steps agree: grow
    x = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.AdamW([x], lr=0.01, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    hyper = HypergradientLR(optimizer, sched, beta=1e-3, rule="additive")
    for _ in range(3):
        optimizer.zero_grad()
        (0.5 * x.pow(2)).sum().backward()
        hyper.before_step()
        optimizer.step()
        hyper.after_step()
        sched.step()
    # the schedule's factor still applies on top of the moved base rate
    assert sched.base_lrs[0] > 0.01
    assert optimizer.param_groups[0]["lr"] == pytest.approx(sched.base_lrs[0] * 0.5)


@pytest.mark.slow
def test_trainer_option_moves_logged_rate(tiny_model_dir, tmp_path):
    extra = {"train.schedule": "constant", "train.warmup_steps": 0, "train.steps": 4}
    fixed = run(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "a", **extra)))
    extra["train.hypergradient_lr"] = 0.05  # the multiplicative rule: at most ±5% a step
    moved = run(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "b", **extra)))
    assert fixed.train["steps"] == moved.train["steps"] == 4

    def rates(out):
        log = (out / "run" / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["lr"] for line in log]

    assert set(rates(tmp_path / "a")) == {1e-3}
    moving = rates(tmp_path / "b")
    assert moving[0] == 1e-3 and any(r != 1e-3 for r in moving[1:])
    assert all(1e-3 * 0.95**i <= r <= 1e-3 * 1.05**i + 1e-12 for i, r in enumerate(moving))
    with pytest.raises(MetalmError, match="hypergradient_lr must be >= 0"):
        run(
            load_config(
                None,
                tiny_overrides(tiny_model_dir, tmp_path / "c", **{"train.hypergradient_lr": -1}),
            )
        )
    with pytest.raises(MetalmError, match="must be < 1 with the multiplicative rule"):
        run(
            load_config(
                None,
                tiny_overrides(tiny_model_dir, tmp_path / "e", **{"train.hypergradient_lr": 2}),
            )
        )
    with pytest.raises(MetalmError, match="hypergradient_rule must be"):
        run(
            load_config(
                None,
                tiny_overrides(
                    tiny_model_dir, tmp_path / "d", **{"train.hypergradient_rule": "fancy"}
                ),
            )
        )
