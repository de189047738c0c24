"""Inner-loop optimizers as gradient transformations, in optax's shape.

A `GradientTransformation` is a pair of pure functions: `init(params) -> state` and
`update(updates, state, params) -> (updates, state)`, which turns the gradients it is
given into updates. `chain(...)` composes transformations (each one's output is the
next one's input) and `apply_updates(params, updates)` adds the updates to the
parameters. No tensor is changed in place and every step is a differentiable tensor
operation, so an inner loop built on them stays differentiable for second-order MAML
(and Meta-SGD's learned rates get meta-gradients) and runs under `torch.func.vmap`.

The learners' optimizers are chains of these: `scale_by_adam()` (or nothing, for SGD),
then `scale_by_learning_rate(rates)` (a rate per tensor, learned for Meta-SGD), with
`add_proximal(λ)` in front for the proximal learners and `stop_gradient()` after it when
first order (see `inner_optimizer`).

Example:
    >>> optimizer = chain(scale_by_adam(), scale_by_learning_rate(0.1))
    >>> params = {"w": torch.zeros(2)}
    >>> updates, state = optimizer.update({"w": torch.ones(2)}, optimizer.init(params), params)
    >>> apply_updates(params, updates)["w"]
    tensor([-0.1000, -0.1000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metalm.errors import MetalmError

Params = dict[str, Tensor]
Updates = dict[str, Tensor]  # gradients going in, steps to add coming out
LearningRate = float | Tensor | Mapping[str, float | Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class GradientTransformation(NamedTuple):
    """`init(params) -> state`; `update(updates, state, params) -> (updates, state)`."""

    init: Callable[[Params], Any]
    update: Callable[[Updates, Any, Params], tuple[Updates, Any]]


def apply_updates(params: Params, updates: Updates) -> Params:
    """`params + updates`, tensor by tensor (new tensors; the old ones are left alone)."""
    return {k: p + updates[k] for k, p in params.items()}


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """The transformations applied in turn; the state is the tuple of their states.

    Example:
        >>> step = chain(scale_by_learning_rate(0.5), scale_by_learning_rate(2.0))
        >>> step.update({"w": torch.ones(1)}, step.init({}), {})[0]["w"]
        tensor([1.])
    """

    def init(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: tuple, params: Params) -> tuple[Updates, tuple]:
        states = []
        for transform, inner in zip(transforms, state, strict=True):
            updates, inner = transform.update(updates, inner, params)
            states.append(inner)
        return updates, tuple(states)

    return GradientTransformation(init, update)


def scale_by_learning_rate(lr: LearningRate) -> GradientTransformation:
    """`-lr * u` for every tensor (a step down the gradient); `lr`: a float, a tensor,
    or a mapping name -> float/tensor (one rate per tensor: Meta-SGD's learned rates,
    which then receive meta-gradients). With a mapping, `init` checks that every tensor
    has its rate. Stateless.

    Example:
        >>> rates = {"w": torch.full((2,), 0.1, requires_grad=True)}
        >>> step = scale_by_learning_rate(rates)
        >>> updates, _ = step.update({"w": torch.ones(2)}, step.init({"w": torch.ones(2)}), {})
        >>> updates["w"].sum().backward(); rates["w"].grad
        tensor([-1., -1.])
    """

    def rate(name: str) -> float | Tensor:
        return lr[name] if isinstance(lr, Mapping) else lr

    def update(updates: Updates, state: None, params: Params) -> tuple[Updates, None]:
        return {k: -rate(k) * u for k, u in updates.items()}, state

    return GradientTransformation(_check_rates(lr).init, update)


def _check_rates(lr: LearningRate) -> GradientTransformation:
    """Nothing to the updates; `init` checks that a mapping of rates covers every tensor."""

    def init(params: Params) -> None:
        missing = sorted(set(params) - set(lr)) if isinstance(lr, Mapping) else []
        if missing:
            raise MetalmError(f"no inner learning rate for {missing[:3]}")

    return GradientTransformation(init, lambda updates, state, _params: (updates, state))


class AdamState(NamedTuple):
    """Adam's step count and moments (empty before the first step)."""

    count: int
    m: Params
    v: Params


def scale_by_adam(
    betas: tuple[float, float] = ADAM_BETAS,
    eps: float = ADAM_EPS,
    lr: LearningRate | None = None,
) -> GradientTransformation:
    """Bias-corrected Adam directions `m_hat / sqrt(v_hat + eps**2)` (follow it with
    `scale_by_learning_rate`), or with `lr` the steps `-(lr * m_hat) / sqrt(...)` (what
    `adam(lr)` uses: the rate multiplies before the division, the float order of
    metalm's rule before these transforms, so meta-gradients stay bitwise the same).
    The denominator is smooth at zero, unlike `sqrt(v_hat) + eps` (equal to within
    eps), so second-order gradients stay finite.

    Example:
        >>> adam = scale_by_adam()
        >>> updates, state = adam.update({"w": torch.full((2,), 3.0)}, adam.init({}), {})
        >>> updates["w"].round(decimals=4), state.count   # ~1: the sign, for a first step
        (tensor([1., 1.]), 1)
    """
    b1, b2 = betas

    def update(updates: Updates, state: AdamState, params: Params) -> tuple[Updates, AdamState]:
        step, m_old, v_old = state.count + 1, state.m, state.v
        m = {
            k: b1 * m_old[k] + (1 - b1) * g if k in m_old else (1 - b1) * g
            for k, g in updates.items()
        }
        v = {
            k: b2 * v_old[k] + (1 - b2) * g * g if k in v_old else (1 - b2) * g * g
            for k, g in updates.items()
        }
        c1, c2 = 1 - b1**step, 1 - b2**step
        if lr is None:
            steps = {k: (m[k] / c1) / torch.sqrt(v[k] / c2 + eps * eps) for k in updates}
        else:
            steps = {
                k: -(rate(k) * (m[k] / c1)) / torch.sqrt(v[k] / c2 + eps * eps) for k in updates
            }
        return steps, AdamState(step, m, v)

    def rate(name: str) -> float | Tensor:
        return lr[name] if isinstance(lr, Mapping) else lr  # type: ignore[index,return-value]

    return GradientTransformation(lambda _params: AdamState(0, {}, {}), update)


class ProximalState(NamedTuple):
    """The tensors `add_proximal` pulls toward."""

    anchor: Params


def add_proximal(strength: float, anchor: Params | None = None) -> GradientTransformation:
    """Add the gradient of `strength * ||p - anchor||^2`, `2 * strength * (p - anchor)`,
    to the gradient: each task is pulled toward `anchor` (by default the parameters
    `init` is given: the meta-parameters the task starts from). The anchor stays
    differentiable: meta-gradients flow through it.

    Example:
        >>> pull = add_proximal(0.5)
        >>> state = pull.init({"w": torch.zeros(2)})
        >>> pull.update({"w": torch.zeros(2)}, state, {"w": torch.ones(2)})[0]["w"]
        tensor([1., 1.])
    """

    def init(params: Params) -> ProximalState:
        return ProximalState(dict(params) if anchor is None else anchor)

    def update(
        updates: Updates, state: ProximalState, params: Params
    ) -> tuple[Updates, ProximalState]:
        pulled = {k: u + strength * (2 * (params[k] - state.anchor[k])) for k, u in updates.items()}
        return pulled, state

    return GradientTransformation(init, update)


def stop_gradient() -> GradientTransformation:
    """The updates as constants to the outer loop (first-order: the inner gradient,
    whatever was added to it, carries no meta-gradient)."""
    return GradientTransformation(
        lambda _params: None, lambda updates, state, _params: (_detach(updates), state)
    )


def _detach(updates: Updates) -> Updates:
    return {k: u.detach() for k, u in updates.items()}


def sgd(lr: LearningRate) -> GradientTransformation:
    """Plain SGD, `p - lr * g` (`lr` as in `scale_by_learning_rate`).

    Example:
        >>> step = sgd({"w": 0.5})
        >>> updates, _ = step.update({"w": torch.ones(2)}, step.init({"w": torch.ones(2)}), {})
        >>> apply_updates({"w": torch.ones(2)}, updates)["w"]
        tensor([0.5000, 0.5000])
    """
    return scale_by_learning_rate(lr)


def adam(
    lr: LearningRate, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS
) -> GradientTransformation:
    """Differentiable, bias-corrected Adam (`scale_by_adam` with the rates folded in;
    `init` checks a mapping of rates as `scale_by_learning_rate` does)."""
    return chain(_check_rates(lr), scale_by_adam(betas, eps, lr))


UPDATE_RULES: dict[str, Callable[[LearningRate], GradientTransformation]] = {
    "sgd": sgd,
    "adam": adam,
}
"""The update rules a config may name (`learner.inner_optimizer`)."""


def inner_optimizer(
    rule: str, rates: LearningRate, proximal: float = 0.0, first_order: bool = False
) -> GradientTransformation:
    """A learner's inner optimizer: `rule` (`sgd` or `adam`) at `rates`, after the
    proximal pull of strength `proximal` (if > 0), which is a constant to the outer
    loop when `first_order` (as the inner gradient itself is).

    Example:
        >>> step = inner_optimizer("sgd", 0.1, proximal=0.5)
        >>> state = step.init({"w": torch.zeros(1)})
        >>> step.update({"w": torch.zeros(1)}, state, {"w": torch.ones(1)})[0]["w"]
        tensor([-0.1000])
    """
    if rule not in UPDATE_RULES:
        raise MetalmError(f"inner optimizer must be one of {', '.join(UPDATE_RULES)}; got {rule!r}")
    if not proximal:
        return UPDATE_RULES[rule](rates)
    pull = [add_proximal(proximal), *([stop_gradient()] if first_order else [])]
    return chain(*pull, UPDATE_RULES[rule](rates))
