"""Transfer learning: for each new task, fine-tune the pretrained encoder and a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError
from metalm.learners.base import (
    LearnerConfig,
    MetaLearner,
    TaskState,
    as_labels,
    one_hot_means,
    register_learner,
)

ENCODER_PREFIX = "encoder."


@dataclass
class FinetuneConfig(LearnerConfig):
    """Per-task fine-tuning on the support set, then predict.

    `train_encoder=False` trains the linear head alone on frozen embeddings.
    `head_init`: `zero` (classic) or `prototype` (weights from class means).
    """

    name: str = "finetune"
    steps: int = 30
    lr: float = 3e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    batch_size: int = 64
    train_encoder: bool = True
    head_init: str = "zero"
    seed: int = 0


def init_head(features: Tensor, labels: Tensor, n_way: int, how: str) -> tuple[Tensor, Tensor]:
    """A linear head [n_way, dim] and bias [n_way]: zeros, or from the class means."""
    if how == "zero":
        return features.new_zeros(n_way, features.shape[1]), features.new_zeros(n_way)
    if how == "prototype":
        means = one_hot_means(features, labels, n_way)
        return 2 * means, -means.pow(2).sum(-1)
    raise MetalmError(f"learner.head_init must be 'zero' or 'prototype', got {how!r}")


@register_learner("finetune", FinetuneConfig)
class Finetune(MetaLearner):
    """The transfer-learning baseline; never changes the model it was given.

    Example:
        >>> learner = Finetune(encoder, FinetuneConfig(steps=10))
        >>> logits = learner.predict(learner.adapt(texts, labels), queries)
    """

    meta_trainable = False
    config: FinetuneConfig

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        cfg = self.config
        labels, n_way = as_labels(support_labels, torch.device("cpu"))
        start = self.encoder.embed(support_texts)
        weight, bias = init_head(start, labels, n_way, cfg.head_init)
        head = {"head.weight": weight.requires_grad_(), "head.bias": bias.requires_grad_()}
        groups = [{"params": list(head.values()), "lr": cfg.head_lr}]
        encoder_params: dict[str, Tensor] = {}
        if cfg.train_encoder:
            encoder_params = {
                name: p.detach().clone().requires_grad_()
                for name, p in self.encoder.model.named_parameters()
            }
            groups.append({"params": list(encoder_params.values()), "lr": cfg.lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed)
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.enable_grad():
                for _ in range(cfg.steps):
                    rows = torch.randperm(len(support_texts), generator=generator)[: cfg.batch_size]
                    if cfg.train_encoder:
                        features = self.encoder([support_texts[i] for i in rows], encoder_params)
                    else:
                        features = start[rows]
                    logits = features @ head["head.weight"].T + head["head.bias"]
                    loss = nn.functional.cross_entropy(logits, labels[rows])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        finally:
            self.encoder.train(was_training)
        state = {k: v.detach() for k, v in head.items()}
        state.update({ENCODER_PREFIX + k: v.detach() for k, v in encoder_params.items()})
        return state

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        params = {
            k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
        }
        features = self.encoder.embed(query_texts, params=params or None)
        return features @ state["head.weight"].T + state["head.bias"]
