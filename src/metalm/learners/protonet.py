"""Embedding learners: `frozen` (no training) and `protonet` (meta-trained).

Both adapt to a task through a head on the support embeddings (`learner.head`):
`centroid` (nearest class centroid, the classic prototypical network), `logreg` (a
logistic regression fitted on the support set, see `metalm.learners.heads`) or `lpft`
(that logistic regression, then a few steps fine-tuning encoder and head together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.learners.base import (
    ENCODER_PREFIX,
    HEAD_KEYS,
    LearnerConfig,
    MetaLearner,
    TaskState,
    as_labels,
    encoder_params,
    head_logits,
    one_hot_means,
    register_learner,
)
from metalm.learners.finetune import finetune_encoder
from metalm.learners.heads import DEFAULT_LOGREG_L2, fit_logreg
from metalm.models.encoder import TextEncoder


def prototype_logits(query: Tensor, prototypes: Tensor, distance: str, scale: Tensor) -> Tensor:
    """Logits = -distance(query, prototype) * scale; `euclidean` is squared Euclidean."""
    if distance == "euclidean":
        return -torch.cdist(query, prototypes).pow(2) * scale
    query = nn.functional.normalize(query, dim=-1)
    prototypes = nn.functional.normalize(prototypes, dim=-1)
    return query @ prototypes.T * scale


HEADS = ("centroid", "logreg", "lpft")
TRAIN_HEADS = ("prototype", "ridge")
DISTANCES = ("euclidean", "cosine")
LPFT_BATCH_SIZE = 64
LPFT_WEIGHT_DECAY = 0.01


@dataclass
class EmbeddingHeadConfig(LearnerConfig):
    """How an embedding learner adapts to a task (`learner.head`):

    * `centroid`: nearest class centroid (prototypes) with the learner's `distance`;
    * `logreg`: a multinomial logistic regression on the support embeddings, started
      from the prototypes; its L2 strength is `logreg_l2` (`DEFAULT_LOGREG_L2`, chosen
      on the `valid` splits: `benchmarks/logreg_l2_rule.py`), or when 0 chosen by
      leave-one-shot-out on the support set (`metalm.learners.heads.fit_logreg`);
    * `lpft`: that logistic regression (linear probe), then `lpft_steps` AdamW steps
      fine-tuning encoder (at `lpft_lr`) and head (at `lpft_head_lr`) on the support set;
      the task state then holds the adapted encoder tensors.

    Meta-training (`protonet`) always uses the prototype loss: the head only changes how
    a trained encoder is adapted and applied to a task.
    """

    head: str = "logreg"
    logreg_l2: float = DEFAULT_LOGREG_L2
    lpft_steps: int = 10
    lpft_lr: float = 3e-5
    lpft_head_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise MetalmError(f"learner.head must be one of {', '.join(HEADS)}; got {self.head!r}")
        if self.logreg_l2 < 0:
            raise MetalmError(
                "learner.logreg_l2 must be >= 0 (0: chosen on the support set), "
                f"got {self.logreg_l2}"
            )
        if self.lpft_steps < 0:
            raise MetalmError(f"learner.lpft_steps must be >= 0, got {self.lpft_steps}")
        if self.lpft_lr < 0 or self.lpft_head_lr < 0:
            raise MetalmError("learner.lpft_lr and learner.lpft_head_lr must be >= 0")


@dataclass
class FrozenConfig(EmbeddingHeadConfig):
    """A head on the pretrained embeddings (a logistic regression by default;
    `head=centroid` for the nearest centroid): the floor, no training."""

    name: str = "frozen"
    distance: str = "euclidean"

    def __post_init__(self) -> None:
        check_distance(self.distance)
        super().__post_init__()


@dataclass
class ProtoNetConfig(EmbeddingHeadConfig):
    """Prototypical networks: the encoder is meta-trained with the prototype loss.

    `distance`: `euclidean` (squared) or `cosine`; logits are scaled by a temperature
    that starts at `init_scale` and is learned when `learn_scale` is set.
    `train_head`: the head inside the meta-training loss: `prototype` (the prototype
    loss), or `ridge`, a ridge regression onto the one-hot labels solved in closed form
    on each episode's support set (R2-D2, Bertinetto et al. 2019) with L2 strength
    `ridge_lambda`, closer to the linear head used at test time (`head=logreg`).
    """

    name: str = "protonet"
    distance: str = "euclidean"
    init_scale: float = 10.0
    learn_scale: bool = True
    train_head: str = "prototype"
    ridge_lambda: float = 1.0

    def __post_init__(self) -> None:
        check_distance(self.distance)
        if self.init_scale <= 0:
            raise MetalmError(f"learner.init_scale must be > 0, got {self.init_scale}")
        super().__post_init__()
        if self.train_head not in TRAIN_HEADS:
            raise MetalmError(
                f"learner.train_head must be one of {', '.join(TRAIN_HEADS)}; "
                f"got {self.train_head!r}"
            )
        if not self.ridge_lambda > 0:
            raise MetalmError(f"learner.ridge_lambda must be > 0, got {self.ridge_lambda}")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise MetalmError(f"learner.distance must be 'euclidean' or 'cosine', got {distance!r}")


class _CentroidLearner(MetaLearner):
    """`adapt`/`predict` through `learner.head`; logits of the centroid head are scaled
    by `exp(log_scale)`, a temperature that starts at `init_scale` (1 for `frozen`)."""

    config: FrozenConfig | ProtoNetConfig

    def __init__(
        self,
        encoder: TextEncoder,
        config: FrozenConfig | ProtoNetConfig,
        init_scale: float = 1.0,
        learn_scale: bool = False,
    ):
        super().__init__(encoder, config)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn_scale)

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        cfg = self.config
        labels, n_way = as_labels(support_labels, self.encoder.device)
        features = self.encoder.embed(support_texts)
        if cfg.head == "centroid":
            return {"prototypes": one_hot_means(features, labels, n_way)}
        state = fit_logreg(features, labels, n_way, l2=cfg.logreg_l2 or None)
        if cfg.head == "lpft":
            head = {k: state[k].clone().requires_grad_() for k in HEAD_KEYS}
            params = finetune_encoder(
                self.encoder,
                list(support_texts),
                labels,
                head,
                torch.Generator().manual_seed(0),
                steps=cfg.lpft_steps,
                lr=cfg.lpft_lr,
                head_lr=cfg.lpft_head_lr,
                weight_decay=LPFT_WEIGHT_DECAY,
                batch_size=LPFT_BATCH_SIZE,
            )
            state.update({k: v.detach() for k, v in head.items()})
            state.update({ENCODER_PREFIX + k: v.detach() for k, v in params.items()})
        return state

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        """Logits of the head the task state holds: prototypes or a linear head (with
        the adapted encoder tensors, if any)."""
        if "prototypes" in state:
            query = self.encoder.embed(query_texts)
            return prototype_logits(
                query, state["prototypes"], self.config.distance, self.log_scale.exp().detach()
            )
        features = self.encoder.embed(query_texts, params=encoder_params(state))
        return head_logits(state, features)


@register_learner("frozen", FrozenConfig)
class FrozenCentroids(_CentroidLearner):
    """Nearest centroid (or another `learner.head`) on frozen pretrained embeddings.

    Example:
        >>> learner = FrozenCentroids(encoder, FrozenConfig())
        >>> state = learner.adapt(["hi", "bye"], [0, 1])
        >>> learner.predict(state, ["bye", "hi"]).argmax(-1)
        tensor([1, 0])
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

    config: ProtoNetConfig

    def __init__(self, encoder: TextEncoder, config: ProtoNetConfig):
        super().__init__(encoder, config, config.init_scale, config.learn_scale)

    def meta_loss(self, episode: Episode) -> Tensor:
        texts = episode.support_texts + episode.query_texts
        embeddings = self.encoder(texts)
        n_support = len(episode.support_texts)
        labels = torch.as_tensor(episode.support_labels, device=embeddings.device)
        support, query = embeddings[:n_support], embeddings[n_support:]
        if self.config.train_head == "ridge":
            logits = self.log_scale.exp() * ridge_logits(
                support, labels, query, episode.n_way, self.config.ridge_lambda
            )
        else:
            prototypes = one_hot_means(support, labels, episode.n_way)
            logits = prototype_logits(query, prototypes, self.config.distance, self.log_scale.exp())
        targets = torch.as_tensor(episode.query_labels, device=logits.device)
        return nn.functional.cross_entropy(logits, targets)


def ridge_logits(support: Tensor, labels: Tensor, query: Tensor, n_way: int, lam: float) -> Tensor:
    """Query scores of the ridge regression of the one-hot support labels on the support
    embeddings, `Q·W` with `W = Sᵀ(S·Sᵀ + λI)⁻¹Y` (the dual form: one n×n solve, with n
    the support size), differentiable in the embeddings."""
    onehot = nn.functional.one_hot(labels, n_way).to(support.dtype)
    gram = support @ support.T
    eye = torch.eye(len(support), device=support.device, dtype=support.dtype)
    alpha = torch.linalg.solve(gram + lam * eye, onehot)
    return (query @ support.T) @ alpha
