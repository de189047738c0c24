"""`metalm.learners.optim`: inner-loop optimizers as gradient transformations that
compose (`chain`, `apply_updates`), reproducing the hand-written rules bitwise."""

from __future__ import annotations

import pytest
import torch

from metalm.errors import MetalmError
from metalm.learners import inner_loop
from metalm.learners.optim import (
    adam,
    add_proximal,
    apply_updates,
    chain,
    inner_optimizer,
    scale_by_adam,
    scale_by_learning_rate,
    sgd,
    stop_gradient,
)


def loss_fn(params, batch):
    x, y = batch
    logits = x @ params["w"].T + params["b"]
    return torch.nn.functional.cross_entropy(logits, y) + (params["b"] ** 4).sum()


def reference_loop(params, batch, steps, lr, first_order, rule, lam):
    """SGD or Adam (`sqrt(v_hat + eps^2)`), with the gradient of the proximal term
    `lam * ||p - start||^2` added to the loss's (a constant too when first order)."""
    start, (b1, b2), eps = dict(params), (0.9, 0.999), 1e-8
    gradient, m, v = torch.func.grad(loss_fn), {}, {}
    for step in range(1, steps + 1):
        if first_order:
            with torch.no_grad():
                grads = gradient(params, batch)
        else:
            grads = gradient(params, batch)
        if lam:
            pull = {k: lam * (2 * (p - start[k])) for k, p in params.items()}
            if first_order:
                pull = {k: t.detach() for k, t in pull.items()}
            grads = {k: g + pull[k] for k, g in grads.items()}
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
            optimizer = inner_optimizer(rule, rates, lam, first_order)
            new = inner_loop(params, loss_fn, batch, 3, optimizer, first_order)
        outer = loss_fn(new, (x.flip(0), batch[1]))
        leaves = [*meta.values(), *rates.values()]
        results.append((new, torch.autograd.grad(outer, leaves)))
    (ref, ref_grads), (got, got_grads) = results
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, got_grads, strict=True))


def test_transformations_are_pure_and_compose():
    params = {"w": torch.ones(2), "b": torch.zeros(1)}
    optimizer = chain(
        add_proximal(0.5), scale_by_adam(), scale_by_learning_rate({"w": 0.1, "b": 0.2})
    )
    state = optimizer.init(params)
    grads = {"w": torch.ones(2), "b": -torch.ones(1)}
    updates, after = optimizer.update(grads, state, params)
    new = apply_updates(params, updates)
    assert torch.equal(params["w"], torch.ones(2))  # nothing changed in place
    assert state[1].count == 0 and after[1].count == 1
    assert after[0].anchor["w"] is params["w"]  # the pull is toward the starting tensors
    # the pull is the gradient of 0.5 * ||p - anchor||^2: zero at the anchor, then 2 * 0.5 * Δ
    pulled, _ = add_proximal(0.5).update({"w": torch.zeros(2)}, after[0], {"w": 3 * torch.ones(2)})
    assert torch.equal(pulled["w"], torch.full((2,), 2.0))
    assert torch.equal(new["w"], torch.full((2,), 0.9))  # Adam's first step: the rate
    assert sgd(0.1).update({"w": torch.ones(1)}, None, {})[0]["w"].item() == pytest.approx(-0.1)
    with pytest.raises(MetalmError, match="no inner learning rate"):
        scale_by_learning_rate({"w": torch.ones(())}).init(params)
    with pytest.raises(MetalmError, match="no inner learning rate"):
        adam({"w": torch.ones(())}).init(params)
    with pytest.raises(MetalmError, match="inner optimizer must be one of sgd, adam"):
        inner_optimizer("rmsprop", 0.1)


def test_stop_gradient_makes_the_pull_a_constant():
    anchor = torch.zeros(2, requires_grad=True)
    p = anchor * 2 + 1  # depends on the anchor
    for first_order in (False, True):
        parts = [add_proximal(1.0, {"w": anchor}), *([stop_gradient()] if first_order else [])]
        optimizer = chain(*parts)
        updates, _ = optimizer.update({"w": torch.zeros(2)}, optimizer.init({"w": p}), {"w": p})
        assert updates["w"].requires_grad is not first_order


def test_inner_loop_runs_under_vmap():
    targets = torch.randn(4, 3, dtype=torch.float64)
    start = {"w": torch.zeros(3, dtype=torch.float64)}

    def fit(target):
        def loss(p, _b):
            return ((p["w"] - target) ** 2).sum()

        optimizer = inner_optimizer("adam", 0.1, proximal=0.3)
        return inner_loop(start, loss, None, 3, optimizer)["w"]

    batched = torch.func.vmap(fit)(targets)
    looped = torch.stack([fit(t) for t in targets])
    assert torch.allclose(batched, looped, rtol=1e-12, atol=1e-14)
