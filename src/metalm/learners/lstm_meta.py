"""`lstm_meta`: Ravi & Larochelle's (2017) LSTM meta-learner, on the task head.

A coordinate-wise LSTM, shared by every coordinate, is the inner optimizer: it reads each
coordinate's preprocessed gradient and the support loss and outputs an input gate `i_t`
(a learned step size) and a forget gate `f_t`; its cell state *is* the parameters:

    θ_t = f_t ⊙ θ_{t-1} − i_t ⊙ ∇_t

The adapted parameters are the task head (and optionally a small residual adapter on
the embeddings). The head has one row per class, and N changes between tasks, so θ_0
cannot be one fixed tensor: it is the prototype head of the support set, `2 m_c` and
`-||m_c||^2`, with a learned per-dimension scale and shift shared by every class
(`head_init: prototype`), or the learned shift alone, the same for every row
(`head_init: zero`). The LSTM and those pieces of θ_0 are the meta-parameters.

Example:
    >>> learner = LSTMMeta(encoder, LSTMMetaConfig(inner_steps=5, adapter_dim=8))
    >>> learner.meta_loss(episode).backward()     # meta-trains the LSTM and θ_0
    >>> logits = learner.predict(learner.adapt(texts, labels), queries)
    >>> logits.shape                                # a score per query and class
    torch.Size([3, 3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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
from metalm.learners.model_based import FeatureConfig, FeatureLearner
from metalm.learners.optim import Params
from metalm.models.encoder import TextEncoder

PREPROCESS_P = 10.0
KEYS = ("head.weight", "head.bias", "adapter.down", "adapter.up")
LSTMState = tuple[Tensor, Tensor, Tensor, Tensor]  # h, c of the first layer; f, i


@dataclass
class LSTMMetaConfig(FeatureConfig):
    """The LSTM meta-learner (Ravi & Larochelle 2017).

    `inner_steps` LSTM updates adapt each task in meta-training, `eval_inner_steps`
    (default: the same) at test time. `hidden`: width of the first LSTM layer that reads
    the preprocessed (gradient, loss) of each coordinate. `init_input_gate` and
    `init_forget_gate`: the gates' starting values (a step size, and nearly 1: keep the
    parameters). `head_init`: `prototype` or `zero` (see the module). `adapter_dim` > 0
    also adapts a residual bottleneck `x + up(relu(down(x)))` of that width (its initial
    weights are meta-parameters, `up` starting at zero).
    """

    name: str = "lstm_meta"
    inner_steps: int = 5
    eval_inner_steps: int | None = None
    hidden: int = 20
    init_input_gate: float = 0.05
    init_forget_gate: float = 0.99
    head_init: Literal["prototype", "zero"] = "prototype"
    adapter_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 0 or (
            self.eval_inner_steps is not None and self.eval_inner_steps < 0
        ):
            raise MetalmError("learner.inner_steps and learner.eval_inner_steps must be >= 0")
        if self.hidden < 1:
            raise MetalmError(f"learner.hidden must be >= 1, got {self.hidden}")
        if self.adapter_dim < 0:
            raise MetalmError(f"learner.adapter_dim must be >= 0, got {self.adapter_dim}")
        for key, gate in (
            ("init_input_gate", self.init_input_gate),
            ("init_forget_gate", self.init_forget_gate),
        ):
            if not 0 < gate < 1:
                raise MetalmError(f"learner.{key} must be in (0, 1), got {gate}")


def preprocess(x: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """Andrychowicz et al.'s preprocessing, [..., 2]: `(log|x| / p, sign x)` where
    `|x| >= e^-p`, else `(-1, e^p x)`."""
    big = x.abs() >= math.exp(-p)
    log = torch.where(big, x.abs().clamp(min=1e-30).log() / p, -torch.ones_like(x))
    sign = torch.where(big, x.sign(), math.exp(p) * x)
    return torch.stack([log, sign], dim=-1)


class MetaLSTMCell(nn.Module):
    """The coordinate-wise meta-learner: a plain LSTM layer over (gradient, loss), then
    the gates of the parameter cell, `f_t = σ(W_f [h_t, θ_{t-1}, f_{t-1}] + b_f)` and
    `i_t = σ(W_i [h_t, θ_{t-1}, i_{t-1}] + b_i)`.

    Example:
        >>> cell = MetaLSTMCell(20, 0.05, 0.99)
        >>> theta, state = cell(torch.ones(7), torch.tensor(0.5), torch.zeros(7), None)
        >>> theta.shape
        torch.Size([7])
    """

    def __init__(self, hidden: int, init_input_gate: float, init_forget_gate: float):
        super().__init__()
        self.lstm = nn.LSTMCell(4, hidden)
        self.forget_gate = nn.Linear(hidden + 2, 1)
        self.input_gate = nn.Linear(hidden + 2, 1)
        for gate, start in (
            (self.forget_gate, init_forget_gate),
            (self.input_gate, init_input_gate),
        ):
            nn.init.uniform_(gate.weight, -0.01, 0.01)
            nn.init.constant_(gate.bias, math.log(start / (1 - start)))

    def forward(
        self, grad: Tensor, loss: Tensor, theta: Tensor, state: LSTMState | None
    ) -> tuple[Tensor, LSTMState]:
        """One update of the flat parameters `theta` [P] given their gradient [P]."""
        x = torch.cat([preprocess(grad), preprocess(loss).expand(grad.shape[0], 2)], dim=-1)
        if state is None:
            zeros = torch.zeros_like(theta)
            h, c = self.lstm(x)
            f_prev, i_prev = zeros, zeros
        else:
            h, c, f_prev, i_prev = state
            h, c = self.lstm(x, (h, c))
        f = torch.sigmoid(self.forget_gate(torch.cat([h, theta[:, None], f_prev[:, None]], -1)))
        i = torch.sigmoid(self.input_gate(torch.cat([h, theta[:, None], i_prev[:, None]], -1)))
        f, i = f.squeeze(-1), i.squeeze(-1)
        return f * theta - i * grad, (h, c, f, i)


def flatten(params: Params) -> Tensor:
    return torch.cat([params[k].reshape(-1) for k in KEYS if k in params])


def unflatten(flat: Tensor, like: Params) -> Params:
    out, start = {}, 0
    for key in (k for k in KEYS if k in like):
        size = like[key].numel()
        out[key] = flat[start : start + size].view_as(like[key])
        start += size
    return out


def apply_adapter(params: Params, features: Tensor) -> Tensor:
    """`x + up(relu(down(x)))` with the task's adapter, or `x` without one."""
    if "adapter.down" not in params:
        return features
    hidden = torch.relu(features @ params["adapter.down"].T)
    return features + hidden @ params["adapter.up"].T


@register_learner("lstm_meta", LSTMMetaConfig)
class LSTMMeta(FeatureLearner):
    """An LSTM that learned to optimize the task head (and adapter) on the support set.

    Example:
        >>> learner = LSTMMeta(encoder, LSTMMetaConfig(inner_steps=3))
        >>> sorted(learner.adapt(["hi", "bye"], [0, 1]))
        ['head.bias', 'head.weight']
    """

    config: LSTMMetaConfig

    def __init__(self, encoder: TextEncoder, config: LSTMMetaConfig):
        super().__init__(encoder, config)
        dim = encoder.dim
        self.cell = self._to_device(
            MetaLSTMCell(config.hidden, config.init_input_gate, config.init_forget_gate)
        )
        # θ_0: shared by every class row, so it fits any N
        options = {"device": encoder.device, "dtype": self._dtype}
        theta0 = {
            "weight_scale": torch.ones(dim, **options),
            "weight_shift": torch.zeros(dim, **options),
            "bias_scale": torch.ones((), **options),
            "bias_shift": torch.zeros((), **options),
        }
        if config.adapter_dim:
            down = torch.empty(config.adapter_dim, dim, **options)
            theta0["adapter_down"] = nn.init.normal_(down, std=dim**-0.5)
            theta0["adapter_up"] = torch.zeros(dim, config.adapter_dim, **options)
        self.theta0 = nn.ParameterDict({k: nn.Parameter(v) for k, v in theta0.items()})

    # -- θ_0 and the inner loop -------------------------------------------------------
    def initial_params(self, support: Tensor, labels: Tensor, n_way: int) -> Params:
        """θ_0 for this task: the head for its N classes, and the adapter."""
        t = self.theta0
        params: Params = {}
        if "adapter_down" in t:
            params = {"adapter.down": t["adapter_down"], "adapter.up": t["adapter_up"]}
        weight = t["weight_shift"].expand(n_way, -1)
        bias = t["bias_shift"].expand(n_way)
        if self.config.head_init == "prototype":
            means = one_hot_means(apply_adapter(params, support), labels, n_way)
            prototype = prototype_head(means)
            weight = weight + prototype["head.weight"] * t["weight_scale"]
            bias = bias + t["bias_scale"] * prototype["head.bias"]
        return {"head.weight": weight, "head.bias": bias, **params}

    def support_loss(self, params: Params, support: Tensor, labels: Tensor) -> Tensor:
        features = apply_adapter(params, support)
        return head_loss(params, features, labels, self.config.logit_scale)

    def optimize(self, params: Params, support: Tensor, labels: Tensor, steps: int) -> Params:
        """`steps` LSTM updates. The gradient and loss the LSTM reads are constants (no
        second-order terms, as in the paper); the updates are differentiable w.r.t. the
        LSTM and θ_0 unless run under `no_grad`."""
        flat, state = flatten(params), None
        for _ in range(steps):
            with torch.enable_grad():
                leaf = flat.detach().requires_grad_()
                loss = self.support_loss(unflatten(leaf, params), support.detach(), labels)
                (grad,) = torch.autograd.grad(loss, leaf)
            flat, state = self.cell(grad, loss.detach(), flat, state)
        return unflatten(flat, params)

    # -- the MetaLearner interface ----------------------------------------------------
    def meta_loss(self, episode: Episode) -> Tensor:
        support, s_labels, query, q_labels = self.episode_tensors(episode)
        start = self.initial_params(support, s_labels, episode.n_way)
        adapted = self.optimize(start, support, s_labels, self.config.inner_steps)
        return self.support_loss(adapted, query, q_labels)

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        cfg = self.config
        labels, n_way = as_labels(support_labels, self.encoder.device)
        steps = cfg.inner_steps if cfg.eval_inner_steps is None else cfg.eval_inner_steps
        features = self.features(support_texts)
        with torch.no_grad():
            adapted = self.optimize(
                self.initial_params(features, labels, n_way), features, labels, steps
            )
        return {k: v.detach().contiguous() for k, v in adapted.items()}

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        query = apply_adapter(state, self.features(query_texts))
        return head_logits(state, query, self.config.logit_scale)
