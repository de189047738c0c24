"""Reptile (Nichol et al. 2018): move the meta-parameters toward each task's adapted ones.

It fits the ordinary outer loop through a surrogate loss: for a task adapted from θ to
θ′ (first-order, on all of the episode's texts), `meta_loss` returns

    0.5 * Σ ||θ − stopgrad(θ′)||²

whose gradient is exactly θ − θ′. The trainer's optimizer then steps against it, i.e.
toward θ′; averaged over a meta-batch this is batched Reptile. `train.lr` plays the role
of Reptile's step size ε (with AdamW the step is Adam-normalised rather than plain
ε·(θ′ − θ)). The logged loss is that half squared distance, not a query loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metalm.errors import MetalmError
from metalm.learners.adapted_params import AdaptMode
from metalm.learners.base import register_learner
from metalm.learners.gradient import EncoderAdaptConfig, GradientLearner, TokenBatch


@dataclass
class ReptileConfig(EncoderAdaptConfig):
    """Reptile: `inner_steps` first-order steps on the episode's support and query texts;
    `adapt` must name encoder tensors (the head is task-specific, not meta-learned)."""

    name: str = "reptile"
    adapt: AdaptMode = "all"
    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.first_order:
            raise MetalmError("learner.first_order: Reptile is first order by definition")
        if self.adapt == "head":
            raise MetalmError(
                f"learner {self.name!r} must adapt encoder tensors; set learner.adapt"
            )


@register_learner("reptile", ReptileConfig)
class Reptile(GradientLearner):
    """Reptile over the encoder tensors chosen by `adapt`.

    Example:
        >>> learner = Reptile(encoder, ReptileConfig(inner_steps=5))
        >>> learner.meta_loss(episode).backward()   # .grad of each tensor is θ − θ′
        >>> any(p.grad is not None and bool(p.grad.any()) for p in learner.parameters())
        True
    """

    encodes_support_with_query = True

    def _task_loss(
        self,
        s_ids: Tensor,
        s_mask: Tensor,
        s_labels: Tensor,
        q_ids: Tensor,
        q_mask: Tensor,
        q_labels: Tensor,
        *,
        n_way: int,
        vectorized: bool,
    ) -> Tensor:
        ids, mask = torch.cat([s_ids, q_ids]), torch.cat([s_mask, q_mask])
        labels = torch.cat([s_labels, q_labels])
        meta = self.meta_params()
        with torch.no_grad():
            features = self._features(ids, mask, None, vectorized)
        start = {k: v.detach() for k, v in meta.items()} | self.init_head(features, labels, n_way)
        batch = TokenBatch(ids, mask, labels, vectorized)
        adapted = self._inner(start, self._support_loss, batch, self.config.inner_steps, True)
        return reptile_surrogate(meta, adapted)


def reptile_surrogate(meta: dict[str, Tensor], adapted: dict[str, Tensor]) -> Tensor:
    """`0.5 * Σ ||θ − stopgrad(θ′)||²` over the tensors of `meta`: its gradient is θ − θ′."""
    return 0.5 * sum(((p - adapted[k].detach()) ** 2).sum() for k, p in meta.items())
