"""Hypergradient descent on the learning rate (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent").

After a step θ_t = θ_{t-1} − α·u_{t-1} (u: the optimizer's update direction per unit of
learning rate, e.g. the gradient for SGD, m̂/(√v̂+ε) plus weight decay for AdamW), the
loss gradient with respect to α is ∂f(θ_t)/∂α = −g_t·u_{t-1}; gradient descent on α
gives α_t = α_{t-1} + β·g_t·u_{t-1}. The direction u is measured, not derived, as
(θ_before − θ_after)/α, so any optimizer whose step is linear in its learning rate works
(SGD, Adam, AdamW). The rate that moves is the scheduler's base rate of each parameter
group; the warm-up/decay schedule still multiplies it.

`rule="additive"` is that update. Its scale is g·u, which grows with the number of
parameters: on MiniLM (22.7M) β=1e-6 drove the rate to 0 in one step, where it stays
(u = 0). `rule="multiplicative"` (the default; the normalised variant in the same paper)
uses only the direction: α_t = α_{t-1}·(1 + β·cos(g_t, u_{t-1})), so β is a relative
change per step (β=0.01: at most ±1%) whatever the model's size, and α stays positive.

Example:
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> optimizer = torch.optim.SGD([w], lr=0.1)
    >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    >>> hyper = HypergradientLR(optimizer, scheduler, beta=0.01)
    >>> for _ in range(2):
    ...     optimizer.zero_grad(); (w**2).sum().backward()
    ...     hyper.before_step(); optimizer.step(); hyper.after_step(); scheduler.step()
    >>> round(optimizer.param_groups[0]["lr"], 4)     # two steps in the same direction: up 1%
    0.101
"""

from __future__ import annotations

import torch

from metalm.errors import MetalmError

RULES = ("additive", "multiplicative")


def check_hypergradient(beta: float, rule: str, names: tuple[str, str] = ("beta", "rule")) -> None:
    """The valid step sizes and rules (`names`: how the caller calls beta and the rule,
    e.g. `train.hypergradient_lr`), or a MetalmError saying what is valid."""
    if beta < 0:
        raise MetalmError(f"{names[0]} must be >= 0, got {beta}")
    if rule not in RULES:
        raise MetalmError(f"{names[1]} must be 'additive' or 'multiplicative', got {rule!r}")
    if rule == "multiplicative" and beta >= 1:
        raise MetalmError(
            f"{names[0]} must be < 1 with the multiplicative rule "
            f"(a relative change per step), got {beta}"
        )


class HypergradientLR:
    """Moves each parameter group's base learning rate along its hypergradient."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        beta: float = 0.01,
        min_lr: float = 0.0,
        rule: str = "multiplicative",
    ):
        check_hypergradient(beta, rule)
        self.rule = rule
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
                pairs = [
                    (p.grad, u)
                    for p, u in zip(group["params"], directions, strict=True)
                    if p.grad is not None
                ]
                h = sum(float((g * u).sum()) for g, u in pairs)  # = −∂f/∂α
                self.last_hypergradients.append(h)
                factor = self._factor(i)
                if self.scheduler is not None:
                    base = self.scheduler.base_lrs[i]
                    # the effective rate is base·factor: ∂f/∂base = factor·∂f/∂α
                    new_base = self._move(base, factor * h, pairs)
                    self.scheduler.base_lrs[i] = new_base
                    group["lr"] = new_base * factor
                else:
                    group["lr"] = self._move(group["lr"], h, pairs)
        self.lrs_used = [g["lr"] for g in groups]
        self._before = [[p.detach().clone() for p in g["params"]] for g in groups]

    def _move(self, rate: float, h: float, pairs: list) -> float:
        if self.rule == "additive":
            return max(self.min_lr, rate + self.beta * h)
        norm_g = sum(float(g.pow(2).sum()) for g, _ in pairs) ** 0.5
        norm_u = sum(float(u.pow(2).sum()) for _, u in pairs) ** 0.5
        cosine = h / (norm_g * norm_u) if norm_g > 0 and norm_u > 0 else 0.0
        return max(self.min_lr, rate * (1.0 + self.beta * cosine))

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
