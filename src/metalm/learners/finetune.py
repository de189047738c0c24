"""Transfer learning: for each new task, fine-tune the pretrained encoder and a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metalm.errors import MetalmError
from metalm.learners.base import (
    ENCODER_PREFIX,
    LabelNamesConfig,
    MetaLearner,
    TaskState,
    as_labels,
    encoder_params,
    head_logits,
    head_loss,
    one_hot_means,
    prototype_head,
    register_learner,
)
from metalm.models.encoder import TextEncoder


@dataclass
class FinetuneConfig(LabelNamesConfig):
    """Per-task fine-tuning on the support set, then predict.

    Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): `head_steps` AdamW steps
    train the head alone on frozen embeddings (cheap), then `steps` steps train encoder
    and head together. `train_encoder=False` keeps the encoder frozen throughout: the
    `steps` of the second phase then train the head alone as well, so the head gets
    `head_steps + steps` steps on the frozen embeddings and no encoder tensor adapts.
    Each step takes `batch_size` support texts drawn with the seed `seed`.
    `head_init`: `zero` (classic) or `prototype` (weights from class means).
    """

    name: str = "finetune"
    head_steps: int = 300
    steps: int = 20
    lr: float = 3e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    batch_size: int = 64
    train_encoder: bool = True
    head_init: Literal["zero", "prototype"] = "zero"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_steps < 0 or self.steps < 0:
            raise MetalmError("learner.head_steps and learner.steps must be >= 0")


def init_head(features: Tensor, labels: Tensor, n_way: int, how: str) -> tuple[Tensor, Tensor]:
    """A linear head [n_way, dim] and bias [n_way]: zeros, or from the class means."""
    if how == "zero":
        return features.new_zeros(n_way, features.shape[1]), features.new_zeros(n_way)
    if how == "prototype":
        head = prototype_head(one_hot_means(features, labels, n_way))
        return head["head.weight"], head["head.bias"]
    raise MetalmError(f"learner.head_init must be 'zero' or 'prototype', got {how!r}")


@register_learner("finetune", FinetuneConfig)
class Finetune(MetaLearner):
    """The transfer-learning baseline; never changes the model it was given.

    Example:
        >>> learner = Finetune(encoder, FinetuneConfig(head_steps=20, steps=5))
        >>> logits = learner.predict(learner.adapt(texts, labels), queries)
        >>> logits.shape                                    # a score per query and class
        torch.Size([3, 3])
    """

    meta_trainable = False
    config: FinetuneConfig

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        cfg = self.config
        labels, n_way = as_labels(support_labels, self.encoder.device)
        frozen = self.encoder.embed(support_texts)
        weight, bias = init_head(frozen, labels, n_way, cfg.head_init)
        head = {"head.weight": weight.requires_grad_(), "head.bias": bias.requires_grad_()}
        generator = torch.Generator().manual_seed(cfg.seed)
        head_optimizer = torch.optim.AdamW(
            head.values(), lr=cfg.head_lr, weight_decay=cfg.weight_decay
        )
        head_steps = cfg.head_steps + (0 if cfg.train_encoder else cfg.steps)
        with torch.enable_grad():
            for _ in range(head_steps):
                rows = torch.randperm(len(support_texts), generator=generator)[: cfg.batch_size]
                _step(head_optimizer, head_loss(head, frozen[rows], labels[rows]))
        encoder_params = finetune_encoder(
            self.encoder,
            support_texts,
            labels,
            head,
            generator,
            steps=cfg.steps if cfg.train_encoder else 0,
            lr=cfg.lr,
            head_lr=cfg.head_lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
        )
        state = {k: v.detach() for k, v in head.items()}
        state.update({ENCODER_PREFIX + k: v.detach() for k, v in encoder_params.items()})
        return state

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        features = self.encoder.embed(query_texts, params=encoder_params(state))
        return head_logits(state, features)


def finetune_encoder(
    encoder: TextEncoder,
    texts: Sequence[str],
    labels: Tensor,
    head: dict[str, Tensor],
    generator: torch.Generator,
    steps: int,
    lr: float,
    head_lr: float,
    weight_decay: float = 0.01,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Fine-tune encoder and task head together on a support set for `steps` AdamW steps
    (mini-batches of `batch_size` rows drawn with `generator`; encoder at `lr`, head at
    `head_lr`), on fast copies of the encoder weights: the encoder itself is untouched.

    `head` (`{"head.weight", "head.bias"}`, leaf tensors with `requires_grad`) is
    updated in place; returns the adapted encoder tensors by parameter name (empty when
    `steps` is 0). Dropout is off (eval mode) throughout, as at prediction time.
    """
    if steps == 0:
        return {}
    params = {
        name: p.detach().clone().requires_grad_() for name, p in encoder.model.named_parameters()
    }
    optimizer = torch.optim.AdamW(
        [
            {"params": list(head.values()), "lr": head_lr},
            {"params": list(params.values()), "lr": lr},
        ],
        weight_decay=weight_decay,
    )
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                rows = torch.randperm(len(texts), generator=generator)[:batch_size]
                features = encoder([texts[i] for i in rows], params)
                _step(optimizer, head_loss(head, features, labels[rows]))
    finally:
        encoder.train(was_training)
    return params


def _step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
