"""Hypergradient descent on the learning rate (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent").

After a step θ_t = θ_{t-1} − α·u_{t-1} (u: the optimizer's update direction per unit of
learning rate, e.g. the gradient for SGD, m̂/(√v̂+ε) plus weight decay for AdamW), the
loss gradient with respect to α is ∂f(θ_t)/∂α = −g_t·u_{t-1}; gradient descent on α
gives α_t = α_{t-1} + β·g_t·u_{t-1}. The direction u is measured, not derived, as
(θ_before − θ_after)/α, so any optimizer whose step is linear in its learning rate works
(SGD, Adam, AdamW). The rate that moves is the scheduler's base rate of each parameter
group; the warm-up/decay schedule still multiplies it.

Example:
    >>> hyper = HypergradientLR(optimizer, scheduler, beta=1e-6)
    >>> loss.backward(); hyper.before_step(); optimizer.step(); hyper.after_step()
"""

from __future__ import annotations

import torch


class HypergradientLR:
    """Moves each parameter group's base learning rate along its hypergradient."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        beta: float = 1e-6,
        min_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.beta = beta
        self.min_lr = min_lr
        self._before: list[list[torch.Tensor]] | None = None
        self._directions: list[list[torch.Tensor]] | None = None
        self.lrs_used: list[float] = []
        self.last_hypergradients: list[float] = []

    def _factor(self, i: int) -> float:
        if self.scheduler is None:
            return 1.0
        base = self.scheduler.base_lrs[i]
        return self.optimizer.param_groups[i]["lr"] / base if base else 1.0

    def before_step(self) -> None:
        """Call after backward (and clipping), before `optimizer.step()`."""
        groups = self.optimizer.param_groups
        if self._directions is not None:
            self.last_hypergradients = []
            for i, (group, directions) in enumerate(zip(groups, self._directions, strict=True)):
                h = sum(
                    float((p.grad * u).sum())
                    for p, u in zip(group["params"], directions, strict=True)
                    if p.grad is not None
                )  # = −∂f/∂α
                self.last_hypergradients.append(h)
                factor = self._factor(i)
                if self.scheduler is not None:
                    base = self.scheduler.base_lrs[i]
                    # the effective rate is base·factor: ∂f/∂base = factor·∂f/∂α
                    new_base = max(self.min_lr, base + self.beta * factor * h)
                    self.scheduler.base_lrs[i] = new_base
                    group["lr"] = new_base * factor
                else:
                    group["lr"] = max(self.min_lr, group["lr"] + self.beta * h)
        self.lrs_used = [g["lr"] for g in groups]
        self._before = [[p.detach().clone() for p in g["params"]] for g in groups]

    def after_step(self) -> None:
        """Call right after `optimizer.step()`: records the update direction."""
        if self._before is None:
            return
        self._directions = [
            [
                (b - p.detach()) / lr if lr > 0 else torch.zeros_like(b)
                for b, p in zip(before, g["params"], strict=True)
            ]
            for before, g, lr in zip(
                self._before, self.optimizer.param_groups, self.lrs_used, strict=True
            )
        ]
        self._before = None
