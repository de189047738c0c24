"""The inner loop: a few steps of a gradient transformation on a dict of tensors.

Nothing here changes a module: the loop takes a dict of tensors and hands back a new
dict (as optax does), so meta-parameters can never be overwritten by an adaptation. The
update rule is a `GradientTransformation` from `metalm.learners.optim`.

Example:
    >>> from metalm.learners.optim import sgd
    >>> params = {"w": torch.zeros(3, requires_grad=True)}
    >>> loss_fn = lambda p, batch: ((p["w"] - batch) ** 2).sum()
    >>> new = inner_loop(params, loss_fn, torch.ones(3), steps=1, optimizer=sgd(0.25))
    >>> new["w"]
    tensor([0.5000, 0.5000, 0.5000], grad_fn=<AddBackward0>)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from metalm.errors import MetalmError
from metalm.learners.optim import GradientTransformation, Params, apply_updates

LossFn = Callable[[Params, Any], Tensor]


def inner_loop(
    params: Params,
    loss_fn: LossFn,
    batch: Any,
    steps: int,
    optimizer: GradientTransformation,
    first_order: bool = False,
) -> Params:
    """Adapt `params` by `steps` steps of `optimizer` on `loss_fn(params, batch)`.

    A pure function: returns new tensors (use `torch.func.functional_call` in `loss_fn`
    to run a module with them).

    * second order by default: the result stays differentiable w.r.t. `params` (and
      anything the loss or the optimizer closes over, e.g. Meta-SGD's learned rates)
      through every inner gradient, as MAML needs;
    * `first_order=True` computes each inner gradient without an outer graph, so the
      result depends on `params` only through the identity path (FOMAML);
    * `optimizer`: a `GradientTransformation` (see `metalm.learners.optim`).

    Inside `torch.func.vmap` it adapts one task per batch entry.
    """
    if steps < 0:
        raise MetalmError(f"inner steps must be >= 0, got {steps}")
    gradient = torch.func.grad(loss_fn)
    params = dict(params)
    state = optimizer.init(params)
    for _ in range(steps):
        if first_order:
            with torch.no_grad():  # no outer graph: the inner gradient is a constant
                grads = gradient(params, batch)
        else:
            grads = gradient(params, batch)
        updates, state = optimizer.update(grads, state, params)
        params = apply_updates(params, updates)
    return params
