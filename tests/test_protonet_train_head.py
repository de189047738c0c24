"""protonet's meta-training head: the prototype loss or a closed-form ridge regression."""

from __future__ import annotations

import pytest
import torch

from metalm.config import load_config
from metalm.data import EpisodeSampler, builtin_dataset
from metalm.errors import MetalmError
from metalm.learners import build_learner
from metalm.learners.protonet import ridge_logits
from metalm.models.encoder import TextEncoder


def test_ridge_logits_equal_the_primal_solution():
    torch.manual_seed(0)
    support = torch.randn(12, 5, dtype=torch.float64)
    query = torch.randn(7, 5, dtype=torch.float64)
    labels = torch.arange(4).repeat(3)
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    lam = 0.3
    weight = torch.linalg.solve(support.T @ support + lam * torch.eye(5, dtype=torch.float64),
                                support.T @ onehot)  # fmt: skip
    torch.testing.assert_close(ridge_logits(support, labels, query, 4, lam), query @ weight)


@pytest.mark.parametrize("train_head", ["prototype", "ridge"])
def test_meta_loss_trains_the_encoder_with_either_head(tiny_model_dir, train_head):
    config = load_config(
        None,
        [f"model.name_or_path={tiny_model_dir}", "model.max_length=16",
         f"learner.train_head={train_head}"],
    )  # fmt: skip
    torch.manual_seed(0)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    episode = EpisodeSampler(builtin_dataset("clinc150", "train"), 4, 2, 2, seed=0).sample(0)
    loss = learner.meta_loss(episode)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in learner.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert learner.log_scale.grad is not None and learner.log_scale.grad != 0


def test_bad_train_head_settings():
    for override, message in (
        ("learner.train_head=svm", "prototype, ridge"),
        ("learner.ridge_lambda=0", "ridge_lambda must be > 0"),
    ):
        with pytest.raises(MetalmError, match=message):  # when the config is loaded
            load_config(None, [override])
