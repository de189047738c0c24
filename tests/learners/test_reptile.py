"""`metalm.learners.reptile`: the Reptile meta-update."""

from __future__ import annotations

import pytest
import torch
from learner_tools import learner_for
from torch import nn

from metalm.learners.reptile import reptile_surrogate


def test_reptile_update_equals_its_formula(tiny_encoder, episodes):
    episode = episodes[0]
    learner = learner_for(
        tiny_encoder, name="reptile", adapt="last_n", last_n=1, inner_steps=3, inner_lr=0.1
    )
    meta = learner.meta_params()
    start = {k: v.detach().clone() for k, v in meta.items()}
    learner.zero_grad()
    loss = learner.meta_loss(episode)
    loss.backward()
    # θ′ by hand: 3 plain SGD steps on support + query, head from their class means
    texts = episode.support_texts + episode.query_texts
    labels = torch.tensor(episode.support_labels + episode.query_labels)
    with torch.no_grad():
        features = tiny_encoder(texts)
    fast = {k: v.clone().requires_grad_() for k, v in start.items()}
    fast |= {k: v.requires_grad_() for k, v in learner.init_head(features, labels, 3).items()}
    for _ in range(3):
        enc = {k[len("encoder.") :]: v for k, v in fast.items() if k.startswith("encoder.")}
        out = learner.logits(fast, tiny_encoder(texts, enc))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, labels), list(fast.values()))
        lrs = {k: (0.1 if k.startswith("encoder.") else learner.config.head_lr) for k in fast}
        fast = {
            k: (v - lrs[k] * g).detach().requires_grad_()
            for (k, v), g in zip(fast.items(), grads, strict=True)
        }
    distance = sum(((start[k] - fast[k]) ** 2).sum() for k in start)
    assert loss.item() == pytest.approx(0.5 * distance.item(), rel=1e-4)
    for key in start:
        assert torch.allclose(meta[key].grad, start[key] - fast[key], atol=1e-6), key
    # with plain SGD at rate ε the outer step is θ ← θ + ε (θ′ − θ)
    theta = {"w": torch.tensor([1.0, 2.0], requires_grad=True)}
    reptile_surrogate(theta, {"w": torch.tensor([3.0, 0.0])}).backward()
    torch.optim.SGD(theta.values(), lr=0.25).step()
    assert torch.allclose(theta["w"].detach(), torch.tensor([1.5, 1.5]))
    learner.zero_grad()
