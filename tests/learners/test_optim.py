"""`metalm.learners.optim`: inner-loop optimizers as pure `(init, update)` transforms."""

from __future__ import annotations

import pytest
import torch

from metalm.errors import MetalmError
from metalm.learners import inner_loop
from metalm.learners.optim import adam, learned_rates, proximal, proximal_penalty, sgd


def loss_fn(_model, params, batch):
    x, y = batch
    logits = x @ params["w"].T + params["b"]
    return torch.nn.functional.cross_entropy(logits, y) + (params["b"] ** 4).sum()


def reference_loop(params, batch, steps, lr, first_order, rule, lam):
    """SGD or Adam (`sqrt(v_hat + eps^2)`), the proximal term inside the objective."""
    start, (b1, b2), eps = dict(params), (0.9, 0.999), 1e-8

    def objective(p):
        loss = loss_fn(None, p, batch)
        return loss + proximal_penalty(p, start, lam) if lam else loss

    gradient, m, v = torch.func.grad(objective), {}, {}
    for step in range(1, steps + 1):
        if first_order:
            with torch.no_grad():
                grads = gradient(params)
        else:
            grads = gradient(params)
        if rule == "sgd":
            params = {k: p - lr[k] * grads[k] for k, p in params.items()}
            continue
        m = {k: b1 * m[k] + (1 - b1) * g if k in m else (1 - b1) * g for k, g in grads.items()}
        v = {
            k: b2 * v[k] + (1 - b2) * g * g if k in v else (1 - b2) * g * g
            for k, g in grads.items()
        }
        c1, c2 = 1 - b1**step, 1 - b2**step
        params = {
            k: p - lr[k] * (m[k] / c1) / torch.sqrt(v[k] / c2 + eps * eps)
            for k, p in params.items()
        }
    return params


@pytest.mark.parametrize("rule", ["sgd", "adam"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transforms_reproduce_the_hand_written_rule_bitwise(rule, lam, first_order, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=generator, dtype=dtype)
    batch = (x, torch.tensor([0, 1, 2, 0, 1, 2]))
    results = []
    for build in ("reference", "transform"):
        meta = {
            "w": torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=dtype),
            "b": torch.randn(3, generator=torch.Generator().manual_seed(2), dtype=dtype),
        }
        meta = {k: t.requires_grad_() for k, t in meta.items()}
        rates = {k: torch.full((), 0.3, dtype=dtype, requires_grad=True) for k in meta}
        params = {k: 1.5 * t for k, t in meta.items()}  # not leaves: like a prototype head
        if build == "reference":
            new = reference_loop(params, batch, 3, rates, first_order, rule, lam)
        else:
            optimizer = learned_rates(rates, sgd if rule == "sgd" else adam)
            optimizer = proximal(optimizer, lam) if lam else optimizer
            new = inner_loop(None, params, loss_fn, batch, 3, optimizer, first_order)
        outer = loss_fn(None, new, (x.flip(0), batch[1]))
        leaves = [*meta.values(), *rates.values()]
        results.append((new, torch.autograd.grad(outer, leaves)))
    (ref, ref_grads), (got, got_grads) = results
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, got_grads, strict=True))


def test_optimizers_are_pure_and_compose():
    params = {"w": torch.ones(2), "b": torch.zeros(1)}
    optimizer = proximal(adam({"w": 0.1, "b": 0.2}), 0.5)
    state = optimizer.init(params)
    grads = {"w": torch.ones(2), "b": -torch.ones(1)}
    new, after = optimizer.update(grads, state, params)
    assert torch.equal(params["w"], torch.ones(2))  # nothing changed in place
    assert state.inner.count == 0 and after.inner.count == 1
    assert after.anchor["w"] is params["w"]  # the pull is toward the starting tensors
    assert optimizer.penalty is not None
    assert torch.equal(optimizer.penalty(new, after), proximal_penalty(new, params, 0.5))
    assert sgd(0.1).penalty is None
    with pytest.raises(MetalmError, match="no learned inner rate"):
        learned_rates({"w": torch.ones(())}).init(params)


def test_inner_loop_runs_under_vmap():
    targets = torch.randn(4, 3, dtype=torch.float64)
    start = {"w": torch.zeros(3, dtype=torch.float64)}

    def fit(target):
        def loss(_m, p, _b):
            return ((p["w"] - target) ** 2).sum()

        optimizer = proximal(adam(0.1), 0.3)
        return inner_loop(None, start, loss, None, 3, optimizer)["w"]

    batched = torch.func.vmap(fit)(targets)
    looped = torch.stack([fit(t) for t in targets])
    assert torch.allclose(batched, looped, rtol=1e-12, atol=1e-14)
