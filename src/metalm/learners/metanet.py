"""`metanet`: a hypernetwork writes each task's classifier head from its support set.

Per class, a permutation-invariant set encoder (DeepSets: an MLP on each support
embedding, a mean over the class's K examples, then a linear layer) outputs the class's
weight row and bias. Classes are handled independently, apart from a task context that
is itself a mean over classes, so the learner takes any N and K at test time, and
permuting the classes permutes the logits.

Example:
    >>> learner = MetaNet(encoder, MetaNetConfig(layers=2, film=True))
    >>> loss = learner.meta_loss(episode)                 # meta-training
    >>> state = learner.adapt(texts, labels)              # head.weight [N, dim], head.bias [N]
    >>> logits = learner.predict(state, queries)
    >>> state["head.weight"].shape, logits.shape
    (torch.Size([3, 32]), torch.Size([3, 3]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.learners.base import (
    TaskState,
    as_labels,
    head_logits,
    head_loss,
    one_hot_means,
    prototype_head,
    register_learner,
)
from metalm.learners.inner_loops import inner_loop
from metalm.learners.model_based import (
    FeatureConfig,
    FeatureLearner,
    check_positive,
    mlp,
)
from metalm.learners.optim import Params, sgd
from metalm.models.encoder import TextEncoder


@dataclass
class MetaNetConfig(FeatureConfig):
    """A meta-network that generates the task head (Munkhdalai & Yu 2017, Qiao et al. 2018).

    `layers`: linear layers of each meta-network: 1 = one linear layer on the class mean
    (a "one-layer meta-network"), more = an MLP on each example, a mean, then a linear
    layer, `hidden` wide. `context`: each example is also read relative to the task's
    centre (the mean of the class means); it only matters with `layers >= 2` (a linear
    function of a term shared by all classes cancels in the softmax). `residual`: the
    generated weights are added to the prototype head (`2 m_c`, `-||m_c||^2`), and the
    last layer starts at zero, so an untrained metanet is a prototype classifier.
    `film`: also generate a FiLM scale and shift of the embeddings from the mean class
    embedding (the identity at first). `finetune_steps` SGD steps at rate `inner_lr` then
    refine the generated head on the support set (differentiably during meta-training).
    """

    name: str = "metanet"
    layers: int = 2
    hidden: int = 256
    context: bool = True
    residual: bool = True
    film: bool = False
    finetune_steps: int = 0
    inner_lr: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers < 1:
            raise MetalmError(f"learner.layers must be >= 1, got {self.layers}")
        if self.hidden < 1:
            raise MetalmError(f"learner.hidden must be >= 1, got {self.hidden}")
        if self.finetune_steps < 0:
            raise MetalmError(f"learner.finetune_steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_steps:
            check_positive(inner_lr=self.inner_lr)


@register_learner("metanet", MetaNetConfig)
class MetaNet(FeatureLearner):
    """Generated classifier heads: `adapt` is one forward pass of the meta-network.

    Example:
        >>> learner = MetaNet(encoder, MetaNetConfig(layers=1))
        >>> learner.adapt(["hi", "bye"], [0, 1])["head.weight"].shape   # [N, encoder.dim]
        torch.Size([2, 32])
    """

    config: MetaNetConfig

    def __init__(self, encoder: TextEncoder, config: MetaNetConfig):
        super().__init__(encoder, config)
        dim = encoder.dim
        width = 2 * dim if config.context else dim
        # phi: per example (empty for one layer); rho: after the class mean, -> [w_c, b_c]
        self.phi = self._to_device(
            mlp(width, config.hidden, config.hidden, config.layers - 1)
            if config.layers > 1
            else nn.Sequential()
        )
        rho_in = config.hidden if config.layers > 1 else width
        self.rho = self._to_device(nn.Linear(rho_in, dim + 1))
        if config.residual:
            nn.init.zeros_(self.rho.weight)
            nn.init.zeros_(self.rho.bias)
        self.film_net: nn.Sequential | None = None
        if config.film:
            self.film_net = self._to_device(mlp(dim, config.hidden, 2 * dim, config.layers))
            last = self.film_net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    # -- the meta-network ---------------------------------------------------------------
    def film(self, support: Tensor, labels: Tensor, n_way: int) -> TaskState:
        """FiLM scale and shift [dim] from the mean class embedding (empty without `film`)."""
        if self.film_net is None:
            return {}
        task = one_hot_means(support, labels, n_way).mean(0)
        scale, shift = self.film_net(task).chunk(2)
        return {"film.scale": 1 + scale, "film.shift": shift}

    @staticmethod
    def modulate(state: TaskState, features: Tensor) -> Tensor:
        if "film.scale" not in state:
            return features
        return features * state["film.scale"] + state["film.shift"]

    def generate(self, support: Tensor, labels: Tensor, n_way: int) -> Params:
        """The head {`head.weight` [N, dim], `head.bias` [N]} for (modulated) support
        features: each class from its own examples and the task centre only."""
        means = one_hot_means(support, labels, n_way)
        inputs = support
        if self.config.context:
            inputs = torch.cat([support, support - means.mean(0)], dim=-1)
        out = self.rho(one_hot_means(self.phi(inputs), labels, n_way))
        weight, bias = out[:, :-1], out[:, -1]
        if self.config.residual:
            prototype = prototype_head(means)
            weight, bias = weight + prototype["head.weight"], bias + prototype["head.bias"]
        return {"head.weight": weight, "head.bias": bias}

    def _head_loss(self, head: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        features, labels = batch
        return head_loss(head, features, labels, self.config.logit_scale)

    def task_state(
        self, support: Tensor, labels: Tensor, n_way: int, differentiable: bool
    ) -> TaskState:
        """FiLM, generated head, then the optional fine-tuning steps."""
        state = self.film(support, labels, n_way)
        support = self.modulate(state, support)
        head = self.generate(support, labels, n_way)
        cfg = self.config
        if cfg.finetune_steps:  # torch.func.grad works under an outer no_grad too
            head = inner_loop(
                head,
                self._head_loss,
                (support, labels),
                cfg.finetune_steps,
                sgd(cfg.inner_lr),
                first_order=not differentiable,
            )
        return {**state, **head}

    # -- the MetaLearner interface ------------------------------------------------------
    def meta_loss(self, episode: Episode) -> Tensor:
        support, s_labels, query, q_labels = self.episode_tensors(episode)
        state = self.task_state(support, s_labels, episode.n_way, differentiable=True)
        return head_loss(state, self.modulate(state, query), q_labels, self.config.logit_scale)

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        labels, n_way = as_labels(support_labels, self.encoder.device)
        features = self.features(support_texts)
        with torch.no_grad():
            state = self.task_state(features, labels, n_way, differentiable=False)
        return {k: v.detach().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        query = self.modulate(state, self.features(query_texts))
        return head_logits(state, query, self.config.logit_scale)
