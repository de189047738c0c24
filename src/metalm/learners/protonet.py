"""Embedding learners: `frozen` (no training) and `protonet` (meta-trained).

Both adapt to a task through a head on the support embeddings (`learner.head`):
`centroid` (nearest class centroid, the classic prototypical network), `logreg` (a
logistic regression fitted on the support set, see `metalm.learners.heads`) or `lpft`
(that logistic regression, then a few steps fine-tuning encoder and head together).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.label_names import LabelNameMode, named_classes, usable_names
from metalm.learners.base import (
    ENCODER_PREFIX,
    HEAD_KEYS,
    LabelNamesConfig,
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
from metalm.learners.lpft import TopBlockInputs, adapt_top_blocks
from metalm.models.encoder import TextEncoder


def prototype_logits(query: Tensor, prototypes: Tensor, distance: str, scale: Tensor) -> Tensor:
    """Logits = -distance(query, prototype) * scale; `euclidean` is squared Euclidean."""
    if distance == "euclidean":
        return -torch.cdist(query, prototypes).pow(2) * scale
    query = nn.functional.normalize(query, dim=-1)
    prototypes = nn.functional.normalize(prototypes, dim=-1)
    return query @ prototypes.T * scale


Head = Literal["centroid", "logreg", "lpft"]
HEADS: tuple[str, ...] = typing.get_args(Head)
Distance = Literal["euclidean", "cosine"]
LPFT_BATCH_SIZE = 64
LPFT_WEIGHT_DECAY = 0.01


@dataclass
class EmbeddingHeadConfig(LabelNamesConfig):
    """How an embedding learner adapts to a task (`learner.head`):

    * `centroid`: nearest class centroid (prototypes) with the learner's `distance`;
    * `logreg`: a multinomial logistic regression on the support embeddings, started
      from the prototypes; its L2 strength is `logreg_l2` (`DEFAULT_LOGREG_L2`, chosen
      on the `valid` splits: `benchmarks/logreg_l2_rule.py`), or when 0 chosen by
      leave-one-shot-out on the support set (`metalm.learners.heads.fit_logreg`);
    * `lpft`: that logistic regression (linear probe), then `lpft_steps` AdamW steps
      fine-tuning encoder (at `lpft_lr`) and head (at `lpft_head_lr`) on the support set;
      the task state then holds the adapted encoder tensors. `lpft_blocks`: 0 fine-tunes
      every weight (embeddings included); k >= 1 only the top k transformer layers, the
      support texts' hidden states below them computed once (`metalm.learners.lpft`:
      much faster). `lpft_early_stop` (needs `lpft_blocks` >= 1): the step count (at most
      `lpft_steps`, 0 included) is chosen by holding out one shot per class. On the
      `valid` splits (`benchmarks/lpft_curve.py`, full-way 5-shot, meta-trained encoders)
      no `lpft` setting beat the plain `logreg` head beyond its 95% interval (every
      weight, 10 steps: +0.71 ± 1.10 BANKING77, +0.30 ± 0.58 CLINC150, at ~10x the
      adapt time; the top layers: 3x faster, within ±0.5), so `logreg` stays the default
      head and `lpft`'s own default stays every weight, the best point estimate.

    Meta-training (`protonet`) always uses the prototype loss: the head only changes how
    a trained encoder is adapted and applied to a task.
    """

    weighs_label_names: ClassVar[bool] = True
    # names as examples: chosen on the `valid` splits (benchmarks/label_names.py)
    label_names: LabelNameMode = "example"
    head: Head = "logreg"
    logreg_l2: float = DEFAULT_LOGREG_L2
    lpft_steps: int = 10
    lpft_lr: float = 3e-5
    lpft_head_lr: float = 1e-3
    lpft_blocks: int = 0
    lpft_early_stop: bool = False
    # chosen on the `valid` splits (benchmarks/results/self_training_valid.json)
    self_train_per_class: int = 20
    self_train_weight: float = 0.25
    self_train_min_prob: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.logreg_l2 < 0:
            raise MetalmError(
                "learner.logreg_l2 must be >= 0 (0: chosen on the support set), "
                f"got {self.logreg_l2}"
            )
        if self.lpft_steps < 0:
            raise MetalmError(f"learner.lpft_steps must be >= 0, got {self.lpft_steps}")
        if self.lpft_lr < 0 or self.lpft_head_lr < 0:
            raise MetalmError("learner.lpft_lr and learner.lpft_head_lr must be >= 0")
        if self.lpft_blocks < 0:
            raise MetalmError(
                "learner.lpft_blocks must be >= 0 (0: all weights; k: the top k layers), "
                f"got {self.lpft_blocks}"
            )
        if self.lpft_early_stop and self.lpft_blocks == 0:
            raise MetalmError(
                "learner.lpft_early_stop needs learner.lpft_blocks >= 1 "
                "(early stopping runs on the top layers only)"
            )
        if self.self_train_per_class < 1 or not self.self_train_weight > 0:
            raise MetalmError(
                "learner.self_train_per_class must be >= 1 and learner.self_train_weight > 0"
            )
        if not 0 <= self.self_train_min_prob < 1:
            raise MetalmError(
                f"learner.self_train_min_prob must be in [0, 1), got {self.self_train_min_prob}"
            )


@dataclass
class FrozenConfig(EmbeddingHeadConfig):
    """A head on the pretrained embeddings (a logistic regression by default;
    `head=centroid` for the nearest centroid): the floor, no training."""

    name: str = "frozen"
    distance: Distance = "euclidean"


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
    distance: Distance = "euclidean"
    init_scale: float = 10.0
    learn_scale: bool = True
    train_head: Literal["prototype", "ridge"] = "prototype"
    ridge_lambda: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_scale <= 0:
            raise MetalmError(f"learner.init_scale must be > 0, got {self.init_scale}")
        if not self.ridge_lambda > 0:
            raise MetalmError(f"learner.ridge_lambda must be > 0, got {self.ridge_lambda}")


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
        return self._adapt(support_texts, support_labels, None)

    def adapt_named(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        label_names: Sequence[str],
    ) -> TaskState:
        """`adapt`, with the label names read as `learner.label_names` says."""
        names = self.label_texts(label_names, support_labels)
        return self._adapt(support_texts, support_labels, names)

    def adapt_unlabeled(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        label_names: Sequence[str] | None,
        unlabeled_texts: Sequence[str],
    ) -> TaskState:
        """`adapt_named` (or `adapt` without names), then one round of self-training:
        each class's `self_train_per_class` most confident texts of `unlabeled_texts`
        (those it is predicted as, with probability >= `self_train_min_prob`) join the
        support set as examples of weight `self_train_weight`, and the head is fitted
        again.

        Example:
            >>> state = learner.adapt_unlabeled(texts, labels, None, queries)
            >>> learner.predict(state, queries).shape
            torch.Size([3, 3])
        """
        names = None
        if label_names is not None:
            names = self.label_texts(label_names, support_labels)
        state = self._adapt(support_texts, support_labels, names)
        if not unlabeled_texts:
            return state
        cfg = self.config
        probs = self.predict(state, unlabeled_texts).float().softmax(-1)
        confidence, guess = probs.max(-1)
        chosen: list[int] = []
        for label in range(probs.shape[1]):
            rows = torch.nonzero((guess == label) & (confidence >= cfg.self_train_min_prob))
            rows = rows.flatten()
            best = confidence[rows].argsort(descending=True)[: cfg.self_train_per_class]
            chosen += rows[best].tolist()
        if not chosen:
            return state
        features = self.encoder.embed([unlabeled_texts[i] for i in chosen])
        pseudo = (features, guess[chosen].to(features.device), cfg.self_train_weight)
        return self._adapt(support_texts, support_labels, names, pseudo)

    def _adapt(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        names: list[str | None] | None,
        extra: tuple[Tensor, Tensor, float] | None = None,
    ) -> TaskState:
        """The task head on the support embeddings, plus the names' embeddings (as
        `learner.label_names` says) and `extra` rows (embeddings, labels, their weight)."""
        cfg = self.config
        labels, n_way = as_labels(support_labels, self.encoder.device)
        top = None  # lpft on the top layers: their inputs once, the embeddings from them
        if cfg.head == "lpft" and cfg.lpft_blocks and cfg.lpft_steps:
            top = TopBlockInputs.compute(self.encoder, support_texts, cfg.lpft_blocks)
            with torch.no_grad():
                features = top.features(range(len(support_texts))).float()
        else:
            features = self.encoder.embed(support_texts)
        rows, row_labels = [features], [labels]
        weights = [torch.ones(len(labels), device=features.device)]
        prior = None
        classes, texts = named_classes(names)
        if classes:
            name_labels = torch.tensor(classes, device=labels.device)
            embedded = self.encoder.embed(texts).to(features)
            if cfg.label_names == "prior" and cfg.head != "centroid":
                prior = features.new_zeros(n_way, features.shape[1])  # no name: plain L2
                prior[name_labels] = embedded
            else:  # the centroid's Gaussian prior on the mean counts as weighted examples
                rows.append(embedded)
                row_labels.append(name_labels)
                weights.append(torch.full((len(classes),), cfg.label_name_weight).to(features))
        if extra is not None:
            rows.append(extra[0].to(features))
            row_labels.append(extra[1])
            weights.append(torch.full((len(extra[1]),), extra[2], device=features.device))
        x, y = torch.cat(rows), torch.cat(row_labels)
        weight = torch.cat(weights) if len(rows) > 1 else None
        if cfg.head == "centroid":
            return {"prototypes": weighted_means(x, y, n_way, weight)}
        state = fit_logreg(
            x,
            y,
            n_way,
            l2=cfg.logreg_l2 or None,
            sample_weight=weight,
            prior=prior,
            prior_weight=cfg.label_name_weight,
        )
        if cfg.head == "lpft":
            head = {k: state[k].clone().requires_grad_() for k in HEAD_KEYS}
            if top is not None:
                params = adapt_top_blocks(
                    top,
                    features,
                    labels,
                    head,
                    cfg.lpft_steps,
                    cfg.lpft_lr,
                    cfg.lpft_head_lr,
                    weight_decay=LPFT_WEIGHT_DECAY,
                    batch_size=LPFT_BATCH_SIZE,
                    early_stop=cfg.lpft_early_stop,
                    l2=float(state["head.l2"]),
                )
            else:
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
        >>> logits.shape                                    # a score per query and class
        torch.Size([3, 3])
    """

    config: ProtoNetConfig

    def __init__(self, encoder: TextEncoder, config: ProtoNetConfig):
        super().__init__(encoder, config, config.init_scale, config.learn_scale)

    def meta_loss(self, episode: Episode) -> Tensor:
        """The prototype (or ridge) loss of the queries; with `learner.label_names` on,
        the names of a source that has them (not of cluster tasks: `cluster-3`) join the
        support set, so that the encoder learns to place a name near its examples."""
        cfg = self.config
        names = None
        if cfg.label_names != "off":
            names = usable_names(episode.label_names, warn=False)
        classes, name_texts = named_classes(names)
        texts = episode.support_texts + episode.query_texts + name_texts
        embeddings = self.encoder(texts)
        n_support, n_query = len(episode.support_texts), len(episode.query_texts)
        labels = torch.as_tensor(episode.support_labels, device=embeddings.device)
        support = embeddings[:n_support]
        query = embeddings[n_support : n_support + n_query]
        weights = None
        if classes:  # each name: one more support example of its class
            support = torch.cat([support, embeddings[n_support + n_query :]])
            name_labels = torch.tensor(classes, device=labels.device)
            labels = torch.cat([labels, name_labels])
            weights = torch.ones(len(labels), device=labels.device, dtype=support.dtype)
            weights[n_support:] = cfg.label_name_weight
        if cfg.train_head == "ridge":
            logits = self.log_scale.exp() * ridge_logits(
                support, labels, query, episode.n_way, cfg.ridge_lambda
            )
        else:
            prototypes = weighted_means(support, labels, episode.n_way, weights)
            logits = prototype_logits(query, prototypes, self.config.distance, self.log_scale.exp())
        targets = torch.as_tensor(episode.query_labels, device=logits.device)
        return nn.functional.cross_entropy(logits, targets)


def weighted_means(
    embeddings: Tensor, labels: Tensor, n_way: int, weights: Tensor | None = None
) -> Tensor:
    """Class means [n_way, dim] of `embeddings`, each row counting `weights[i]` (default
    1): with a class's name as a row of weight w, the posterior mean of the class under
    a Gaussian prior centred on its name.

    Example:
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1, 0])
        >>> weighted_means(x, y, 2, torch.tensor([1.0, 1.0, 3.0]))
        tensor([[0.2500, 0.7500],
                [0.0000, 1.0000]])
    """
    if weights is None:
        return one_hot_means(embeddings, labels, n_way)
    classes = torch.arange(n_way, device=labels.device)
    onehot = (labels[:, None] == classes).to(embeddings.dtype) * weights[:, None]
    return (onehot.T @ embeddings) / onehot.sum(0).unsqueeze(1)


def ridge_logits(support: Tensor, labels: Tensor, query: Tensor, n_way: int, lam: float) -> Tensor:
    """Query scores of the ridge regression of the one-hot support labels on the support
    embeddings, `Q·W` with `W = Sᵀ(S·Sᵀ + λI)⁻¹Y` (the dual form: one n×n solve, with n
    the support size), differentiable in the embeddings."""
    onehot = nn.functional.one_hot(labels, n_way).to(support.dtype)
    gram = support @ support.T
    eye = torch.eye(len(support), device=support.device, dtype=support.dtype)
    alpha = torch.linalg.solve(gram + lam * eye, onehot)
    return (query @ support.T) @ alpha
