"""Nearest-centroid learners: `frozen` (no training) and `protonet` (meta-trained)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.learners.base import (
    LearnerConfig,
    MetaLearner,
    TaskState,
    as_labels,
    one_hot_means,
    register_learner,
)
from metalm.models.encoder import TextEncoder


def prototype_logits(query: Tensor, prototypes: Tensor, distance: str, scale: Tensor) -> Tensor:
    """Logits = -distance(query, prototype) * scale; `euclidean` is squared Euclidean."""
    if distance == "euclidean":
        return -torch.cdist(query, prototypes).pow(2) * scale
    query = nn.functional.normalize(query, dim=-1)
    prototypes = nn.functional.normalize(prototypes, dim=-1)
    return query @ prototypes.T * scale


@dataclass
class FrozenConfig(LearnerConfig):
    """Nearest class centroid on the pretrained embeddings: the floor, no training."""

    name: str = "frozen"
    distance: str = "euclidean"


@dataclass
class ProtoNetConfig(LearnerConfig):
    """Prototypical networks: the encoder is meta-trained with the prototype loss.

    `distance`: `euclidean` (squared) or `cosine`; logits are scaled by a temperature
    that starts at `init_scale` and is learned when `learn_scale` is set.
    """

    name: str = "protonet"
    distance: str = "euclidean"
    init_scale: float = 10.0
    learn_scale: bool = True


class _CentroidLearner(MetaLearner):
    config: FrozenConfig | ProtoNetConfig

    def __init__(self, encoder: TextEncoder, config: FrozenConfig | ProtoNetConfig):
        super().__init__(encoder, config)
        if config.distance not in ("euclidean", "cosine"):
            raise MetalmError(
                f"learner.distance must be 'euclidean' or 'cosine', got {config.distance!r}"
            )
        init = getattr(config, "init_scale", 1.0)
        if init <= 0:
            raise MetalmError(f"learner.init_scale must be > 0, got {init}")
        learn = getattr(config, "learn_scale", False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)), requires_grad=learn)

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        labels, n_way = as_labels(support_labels, self.encoder.device)
        prototypes = one_hot_means(self.encoder.embed(support_texts), labels, n_way)
        return {"prototypes": prototypes}

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        query = self.encoder.embed(query_texts)
        return prototype_logits(
            query, state["prototypes"], self.config.distance, self.log_scale.exp().detach()
        )


@register_learner("frozen", FrozenConfig)
class FrozenCentroids(_CentroidLearner):
    """Nearest centroid on frozen pretrained embeddings.

    Example:
        >>> learner = FrozenCentroids(encoder, FrozenConfig())
        >>> state = learner.adapt(["hi", "bye"], [0, 1])
        >>> learner.predict(state, ["hello"]).argmax(-1)
        tensor([0])
    """

    meta_trainable = False


@register_learner("protonet", ProtoNetConfig)
class ProtoNet(_CentroidLearner):
    """Prototypical networks (Snell et al. 2017) over a fine-tuned encoder.

    Example:
        >>> learner = ProtoNet(encoder, ProtoNetConfig())
        >>> loss = learner.meta_loss(episode)   # meta-training
        >>> logits = learner.predict(learner.adapt(texts, labels), queries)
    """

    def meta_loss(self, episode: Episode) -> Tensor:
        texts = episode.support_texts + episode.query_texts
        embeddings = self.encoder(texts)
        n_support = len(episode.support_texts)
        labels = torch.as_tensor(episode.support_labels, device=embeddings.device)
        prototypes = one_hot_means(embeddings[:n_support], labels, episode.n_way)
        logits = prototype_logits(
            embeddings[n_support:], prototypes, self.config.distance, self.log_scale.exp()
        )
        targets = torch.as_tensor(episode.query_labels, device=logits.device)
        return nn.functional.cross_entropy(logits, targets)
