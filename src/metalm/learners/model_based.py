"""Shared pieces of the model-based learners (`metanet`, `lstm_meta`).

Both read encoder embeddings (computed once per episode, with no gradient unless
`train_encoder` is set), produce a task head from a small meta-network, and train that
meta-network at its own outer rate `meta_lr`.

Example:
    >>> net = mlp(384, 64, 385, layers=2)   # Linear(384, 64), ReLU, Linear(64, 385)
    >>> [type(layer).__name__ for layer in net], net[-1].out_features
    (['Linear', 'ReLU', 'Linear'], 385)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.learners.base import LabelNamesConfig, MetaLearner

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass
class FeatureConfig(LabelNamesConfig):
    """Options common to the model-based learners.

    `train_encoder`: also meta-train the encoder (at `train.lr`); off by default, so the
    embeddings are computed without gradients and meta-training is cheap on a CPU.
    `meta_lr`: the outer (AdamW) rate of the meta-network, which is not weight-decayed.
    `logit_scale`: logits are `logit_scale * (x @ W.T + b)` on normalized embeddings.
    """

    name: str = "metanet"
    train_encoder: bool = False
    meta_lr: float = 1e-3
    logit_scale: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(meta_lr=self.meta_lr, logit_scale=self.logit_scale)


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """`layers` linear layers with ReLU between them; `layers=1` is one linear layer."""
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    modules: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        if i:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(a, b))
    return nn.Sequential(*modules)


def check_positive(**values: float) -> None:
    """A MetalmError naming the first of `values` (`learner.<key>`) that is not > 0."""
    for key, value in values.items():
        if not value > 0:
            raise MetalmError(f"learner.{key} must be > 0, got {value}")


class FeatureLearner(MetaLearner):
    """A learner whose task head is computed from embeddings by meta-parameters."""

    config: FeatureConfig

    def _to_device(self, module: ModuleT) -> ModuleT:
        return module.to(device=self.encoder.device, dtype=self._dtype)

    def features(self, texts: Sequence[str], *, grad: bool = False) -> Tensor:
        """Embeddings [len(texts), dim] on the encoder's device; with gradients only if
        `grad` and `train_encoder` are both set."""
        if grad and self.config.train_encoder:
            out = self.encoder(texts)
        else:
            out = self.encoder.embed(texts)
        return out.to(device=self.encoder.device, dtype=self._dtype)

    def episode_tensors(self, episode: Episode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Support features, support labels, query features, query labels (one encoder
        call for support and query)."""
        device = self.encoder.device
        both = self.features(episode.support_texts + episode.query_texts, grad=True)
        n = len(episode.support_texts)
        s_labels = torch.as_tensor(episode.support_labels, dtype=torch.long, device=device)
        q_labels = torch.as_tensor(episode.query_labels, dtype=torch.long, device=device)
        return both[:n], s_labels, both[n:], q_labels

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The meta-network at `meta_lr` without weight decay; the encoder (only with
        `train_encoder`) at `lr` with `weight_decay`."""
        encoder = {id(p) for p in self.encoder.parameters()}
        meta = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder]
        groups = [{"params": meta, "lr": self.config.meta_lr, "weight_decay": 0.0}]
        if self.config.train_encoder:
            trained = [p for p in self.encoder.parameters() if p.requires_grad]
            groups.append({"params": trained, "lr": lr, "weight_decay": weight_decay})
        return groups
