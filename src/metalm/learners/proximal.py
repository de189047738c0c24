"""Proximal meta-learning: each task's parameters are pulled toward the meta-parameters.

The inner objective is `L_support(φ) + λ·||φ − θ||²` (θ: the meta-parameters the task
starts from, i.e. the encoder tensors that adapt and the initial head). By default the
meta-gradient backpropagates through the unrolled inner loop (second order, or first
order with `first_order=true`).

`implicit=true` is iMAML (Rajeswaran et al. 2019): the inner loop runs without any
graph, and the meta-gradient is the implicit one at the adapted φ,

    dL_query/dθ = (I + H/(2λ))⁻¹ ∇_φ L_query(φ),   H = ∇²_φ L_support(φ),

solved by `cg_steps` conjugate-gradient iterations with Hessian-vector products: memory
no longer grows with the number of inner steps. It is exact for the tensors that adapt
(when the inner loop has converged); encoder tensors that do not adapt (e.g. the lower
layers with `adapt=last_n`, or all of them with `adapt=head`) get only the direct
gradient of the query loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.learners.base import head_loss, register_learner
from metalm.learners.gradient import (
    EncoderAdaptConfig,
    FeatureBatch,
    GradientLearner,
    TokenBatch,
)
from metalm.learners.optim import GradientTransformation, Params, inner_optimizer
from metalm.learners.vmap_safety import math_attention


@dataclass
class ProximalConfig(EncoderAdaptConfig):
    """Proximal inner loop with strength `prox_lambda`; `implicit` for iMAML (`cg_steps`
    conjugate-gradient iterations), else unrolled (`first_order` to cut the graph)."""

    name: str = "proximal"
    prox_lambda: float = 0.1
    implicit: bool = False
    cg_steps: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prox_lambda < 0 or (self.implicit and self.prox_lambda == 0):
            raise MetalmError(
                f"learner.prox_lambda must be >= 0 (> 0 with implicit), got {self.prox_lambda}"
            )
        if self.cg_steps < 1:
            raise MetalmError(f"learner.cg_steps must be >= 1, got {self.cg_steps}")


@register_learner("proximal", ProximalConfig)
class Proximal(GradientLearner):
    """Proximal (and, with `implicit=true`, implicit-gradient iMAML) meta-learning.

    Example:
        >>> learner = Proximal(encoder, ProximalConfig(prox_lambda=0.5, implicit=True))
        >>> learner.meta_loss(episode).backward()
        >>> any(p.grad is not None and bool(p.grad.any()) for p in learner.parameters())
        True
    """

    config: ProximalConfig

    @functools.cached_property
    def inner_optimizer(self) -> GradientTransformation:
        """The update rule after the pull toward the task's starting tensors."""
        cfg = self.config
        return inner_optimizer(
            cfg.inner_optimizer, self._inner_lrs(), cfg.prox_lambda, cfg.first_order
        )

    def meta_loss(self, episode: Episode) -> Tensor:
        if not self.config.implicit:
            return super().meta_loss(episode)
        with math_attention():
            return self._implicit_loss(episode)

    def meta_loss_batch(self, episodes) -> Tensor | None:
        return None if self.config.implicit else super().meta_loss_batch(episodes)

    def _implicit_loss(self, episode: Episode) -> Tensor:
        """A surrogate whose value is the query loss and whose gradient is iMAML's."""
        s_ids, s_mask, s_labels, q_ids, q_mask, q_labels = (
            t[0] for t in self._episode_tensors([episode])
        )
        n_way = episode.n_way
        support_fn: Any
        if self.head_only:
            features = self._features(
                torch.cat([s_ids, q_ids]), torch.cat([s_mask, q_mask]), None, False
            )
            support, query = features[: s_ids.shape[0]], features[s_ids.shape[0] :]
            anchor = self.init_head(support, s_labels, n_way)
            support_fn, batch = self._head_loss, FeatureBatch(support.detach(), s_labels)

            def query_loss(p: Params) -> Tensor:
                return head_loss(p, query, q_labels, self.config.logit_scale)

        else:
            support = self._features(s_ids, s_mask, None, False)
            anchor = {**self.meta_params(), **self.init_head(support, s_labels, n_way)}
            support_fn, batch = self._support_loss, TokenBatch(s_ids, s_mask, s_labels)

            def query_loss(p: Params) -> Tensor:
                features = self._features(q_ids, q_mask, p, False)
                return head_loss(p, features, q_labels, self.config.logit_scale)

        start = {k: v.detach() for k, v in anchor.items()}
        adapted = self._inner(start, support_fn, batch, self.config.inner_steps, True)
        phi = {k: v.detach().requires_grad_() for k, v in adapted.items()}
        names = list(phi)
        leaves = [phi[k] for k in names]
        loss = query_loss(phi)
        g_query = _grads(loss, leaves, retain_graph=True)
        g_support = _grads(support_fn(phi, batch), leaves, create_graph=True)
        scale = 1.0 / (2.0 * self.config.prox_lambda)
        used = [i for i, g in enumerate(g_support) if g.requires_grad]

        def matvec(v: list[Tensor]) -> list[Tensor]:
            hv = [torch.zeros_like(t) for t in v]
            if used:
                parts = torch.autograd.grad(
                    [g_support[i] for i in used],
                    leaves,
                    grad_outputs=[v[i] for i in used],
                    retain_graph=True,
                    allow_unused=True,
                )
                hv = [
                    torch.zeros_like(t) if h is None else h for t, h in zip(v, parts, strict=True)
                ]
            return [vi + scale * hi for vi, hi in zip(v, hv, strict=True)]

        v = conjugate_gradient(matvec, [g.detach() for g in g_query], self.config.cg_steps)
        implicit = sum((vi.detach() * anchor[k]).sum() for k, vi in zip(names, v, strict=True))
        return loss + implicit - implicit.detach()  # type: ignore[operator]


def _grads(loss: Tensor, leaves: list[Tensor], **kwargs: bool) -> list[Tensor]:
    found = torch.autograd.grad(loss, leaves, allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, found, strict=True)]


def conjugate_gradient(
    matvec: Callable[[list[Tensor]], list[Tensor]], b: list[Tensor], steps: int
) -> list[Tensor]:
    """Approximately solve `A x = b` (A symmetric, given as `matvec` over lists of
    tensors) by `steps` conjugate-gradient iterations from x = 0.

    Truncated where A shows non-positive curvature (A is then not positive definite, e.g.
    a proximal term too weak for the loss's curvature): returns the iterate so far, or
    `b` itself (the first-order answer) if that happens on the first iteration.
    """

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((a * c).sum() for a, c in zip(u, v, strict=True))  # type: ignore[return-value]

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rs = dot(r, r)
    for _ in range(steps):
        if rs <= 1e-20:
            break
        ap = matvec(p)
        curvature = dot(p, ap)
        if not curvature > 0:
            return x if any(bool(t.any()) for t in x) else [t.clone() for t in b]
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * ai for ri, ai in zip(r, ap, strict=True)]
        rs_new = dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x
