"""Inner-loop optimizers as small pure `(init, update)` transforms, in optax's shape.

An `InnerOptimizer` never changes a tensor in place: `init(params)` builds its state and
`update(grads, state, params)` returns the new parameters and the new state. Every
update is made of differentiable tensor operations, so an inner loop built on one stays
differentiable for second-order MAML and runs under `torch.func.vmap`.

Example:
    >>> optimizer = sgd(0.25)
    >>> params = {"w": torch.ones(3)}
    >>> state = optimizer.init(params)
    >>> params, state = optimizer.update({"w": torch.full((3,), 2.0)}, state, params)
    >>> params["w"]
    tensor([0.5000, 0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from metalm.errors import MetalmError

Params = dict[str, Tensor]
LearningRate = float | Tensor | Mapping[str, float | Tensor]
State = TypeVar("State")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class InnerOptimizer(Generic[State]):
    """A pure optimizer on dicts of tensors.

    * `init(params) -> state`;
    * `update(grads, state, params) -> (new_params, new_state)`;
    * `penalty(params, state) -> Tensor`, or None: a term the optimizer adds to the
      inner objective (`proximal`'s pull), so that its gradient is part of the inner
      gradient, and a constant like the rest of it in a first-order inner loop.
    """

    init: Callable[[Params], State]
    update: Callable[[Params, State, Params], tuple[Params, State]]
    penalty: Callable[[Params, State], Tensor] | None = None


def _lr_for(lr: LearningRate, name: str) -> float | Tensor:
    return lr[name] if isinstance(lr, Mapping) else lr


def sgd(lr: LearningRate) -> InnerOptimizer[None]:
    """Plain SGD, `p - lr * g` for every tensor; `lr`: a float, a tensor, or a mapping
    name -> float/tensor (one rate per tensor). Stateless.

    Example:
        >>> new, _ = sgd({"w": 0.5}).update({"w": torch.ones(2)}, None, {"w": torch.ones(2)})
        >>> new["w"]
        tensor([0.5000, 0.5000])
    """

    def update(grads: Params, state: None, params: Params) -> tuple[Params, None]:
        return {k: p - _lr_for(lr, k) * grads[k] for k, p in params.items()}, state

    return InnerOptimizer(lambda _params: None, update)


def learned_rates(
    rates: Mapping[str, Tensor], rule: Callable[[LearningRate], InnerOptimizer] = sgd
) -> InnerOptimizer:
    """Meta-SGD (Li et al. 2017): `rule` (`sgd` or `adam`) with a learned rate for each
    tensor, a scalar or one rate per element. The rates are meta-parameters: the updates
    are differentiable in them, so they receive meta-gradients. `init` checks that every
    tensor has its rate.

    Example:
        >>> rates = {"w": torch.full((2,), 0.1, requires_grad=True)}
        >>> optimizer = learned_rates(rates)
        >>> new, _ = optimizer.update({"w": torch.ones(2)}, None, {"w": torch.ones(2)})
        >>> new["w"].sum().backward(); rates["w"].grad
        tensor([-1., -1.])
    """
    inner = rule(rates)

    def init(params: Params) -> Any:
        missing = sorted(set(params) - set(rates))
        if missing:
            raise MetalmError(f"no learned inner rate for {missing[:3]}")
        return inner.init(params)

    return InnerOptimizer(init, inner.update, inner.penalty)


class AdamState(NamedTuple):
    """Adam's step count and moments (empty before the first step)."""

    count: int
    m: Params
    v: Params


def adam(
    lr: LearningRate, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS
) -> InnerOptimizer[AdamState]:
    """Differentiable, bias-corrected Adam (`lr` as in `sgd`).

    The denominator is `sqrt(v_hat + eps**2)` rather than `sqrt(v_hat) + eps`: equal to
    within eps, but smooth at zero, so second-order gradients stay finite.

    Example:
        >>> optimizer = adam(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> new, state = optimizer.update({"w": torch.ones(2)}, optimizer.init(params), params)
        >>> new["w"], state.count
        (tensor([-0.1000, -0.1000]), 1)
    """
    b1, b2 = betas

    def update(grads: Params, state: AdamState, params: Params) -> tuple[Params, AdamState]:
        step, m_old, v_old = state.count + 1, state.m, state.v
        m = {
            k: b1 * m_old[k] + (1 - b1) * g if k in m_old else (1 - b1) * g
            for k, g in grads.items()
        }
        v = {
            k: b2 * v_old[k] + (1 - b2) * g * g if k in v_old else (1 - b2) * g * g
            for k, g in grads.items()
        }
        c1, c2 = 1 - b1**step, 1 - b2**step
        new = {
            k: p - _lr_for(lr, k) * (m[k] / c1) / torch.sqrt(v[k] / c2 + eps * eps)
            for k, p in params.items()
        }
        return new, AdamState(step, m, v)

    return InnerOptimizer(lambda _params: AdamState(0, {}, {}), update)


class ProximalState(NamedTuple):
    """The tensors `proximal` pulls toward, and the wrapped optimizer's state."""

    anchor: Params
    inner: Any


def proximal_penalty(params: Params, anchor: Params, strength: float) -> Tensor:
    """`strength * sum ||p - anchor||^2` over the tensors of `params`."""
    return strength * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


def proximal(
    inner: InnerOptimizer, strength: float, anchor: Params | None = None
) -> InnerOptimizer[ProximalState]:
    """`inner` on the objective plus `strength * ||p - anchor||^2`, which pulls each task
    toward `anchor` (by default the parameters `init` is given: the meta-parameters the
    task starts from). The anchor stays differentiable: meta-gradients flow through it.

    Example:
        >>> optimizer = proximal(sgd(0.1), strength=0.5)
        >>> state = optimizer.init({"w": torch.zeros(2)})
        >>> optimizer.penalty({"w": torch.ones(2)}, state)
        tensor(1.)
    """

    def init(params: Params) -> ProximalState:
        return ProximalState(dict(params) if anchor is None else anchor, inner.init(params))

    def update(grads: Params, state: ProximalState, params: Params) -> tuple[Params, ProximalState]:
        new, inner_state = inner.update(grads, state.inner, params)
        return new, ProximalState(state.anchor, inner_state)

    def penalty(params: Params, state: ProximalState) -> Tensor:
        pull = proximal_penalty(params, state.anchor, strength)
        return pull if inner.penalty is None else inner.penalty(params, state.inner) + pull

    return InnerOptimizer(init, update, penalty)


UPDATE_RULES: dict[str, Callable[[LearningRate], InnerOptimizer]] = {"sgd": sgd, "adam": adam}
"""The update rules a config may name (`learner.inner_optimizer`)."""
