"""MAML, FOMAML, ANIL and Meta-SGD: one registration each over `GradientLearner`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from metalm.errors import MetalmError
from metalm.learners.base import HEAD_KEYS, register_learner
from metalm.learners.gradient import EncoderAdaptConfig, GradientConfig, GradientLearner
from metalm.models.encoder import TextEncoder


@dataclass
class MAMLConfig(EncoderAdaptConfig):
    """MAML (Finn et al. 2017): second-order meta-gradients through the inner loop."""

    name: str = "maml"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.first_order:
            raise MetalmError("learner.first_order=true is first-order MAML: learner.name=fomaml")


@dataclass
class FOMAMLConfig(EncoderAdaptConfig):
    """First-order MAML: the inner gradients are treated as constants."""

    name: str = "fomaml"
    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.first_order:
            raise MetalmError("learner.first_order=false is second-order MAML: learner.name=maml")


@dataclass
class ANILConfig(GradientConfig):
    """ANIL (Raghu et al. 2020): the inner loop adapts the head only, on encoder features
    computed once per episode; the outer loop meta-trains the encoder."""

    name: str = "anil"


@dataclass
class MetaSGDConfig(EncoderAdaptConfig):
    """Meta-SGD (Li et al. 2017): inner learning rates are meta-parameters.

    `lr_shape`: one rate per tensor (`tensor`) or per element (`element`), starting at
    `inner_lr` (encoder) and `head_lr` (head). `lr_meta_lr`: the outer (AdamW) rate of
    the learned rates, which are not weight-decayed.
    """

    name: str = "metasgd"
    lr_shape: Literal["tensor", "element"] = "tensor"
    lr_meta_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()


@register_learner("maml", MAMLConfig)
class MAML(GradientLearner):
    """MAML with second-order meta-gradients.

    Example:
        >>> learner = MAML(encoder, MAMLConfig(adapt="last_n", last_n=1, inner_steps=3))
        >>> learner.meta_loss(episode).backward()          # meta-training
        >>> logits = learner.predict(learner.adapt(texts, labels), queries)
        >>> logits.shape                                    # a score per query and class
        torch.Size([3, 3])
    """


@register_learner("fomaml", FOMAMLConfig)
class FOMAML(GradientLearner):
    """First-order MAML: no second-order terms, much less memory.

    Example:
        >>> learner = FOMAML(encoder, FOMAMLConfig(adapt="all"))
        >>> learner.predict(learner.adapt(texts, labels), queries).shape
        torch.Size([3, 3])
    """


@register_learner("anil", ANILConfig)
class ANIL(GradientLearner):
    """Almost No Inner Loop: the head adapts, the encoder is meta-trained; evaluation
    reads cached embeddings, so it is as fast as a linear probe.

    Example:
        >>> learner = ANIL(encoder, ANILConfig(inner_steps=10, head_lr=0.5))
        >>> learner.predict(learner.adapt(texts, labels), queries).shape
        torch.Size([3, 3])
    """

    config: ANILConfig


@register_learner("metasgd", MetaSGDConfig)
class MetaSGD(GradientLearner):
    """Meta-SGD: learned per-tensor or per-element inner learning rates.

    Example:
        >>> learner = MetaSGD(encoder, MetaSGDConfig(lr_shape="element"))
        >>> sorted(learner.inner_lrs)[:1]   # the last 2 blocks (here: all 2), no embeddings
        ['encoder__encoder__layer__0__attention__output__LayerNorm__bias']
    """

    config: MetaSGDConfig

    def __init__(self, encoder: TextEncoder, config: MetaSGDConfig):
        super().__init__(encoder, config)
        shapes = {k: tuple(v.shape) for k, v in self.meta_params().items()}
        shapes.update({"head.weight": (1, encoder.dim), "head.bias": ()})
        rates = {}
        for name, shape in shapes.items():
            start = config.head_lr if name in HEAD_KEYS else config.inner_lr
            size = shape if config.lr_shape == "element" else ()
            rates[_key(name)] = nn.Parameter(
                torch.full(size, float(start), device=encoder.device, dtype=self._dtype)
            )
        self.inner_lrs = nn.ParameterDict(rates)

    def _inner_lrs(self) -> dict[str, Any]:
        return {name: self.inner_lrs[_key(name)] for name in [*self.meta_params(), *HEAD_KEYS]}

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        rates = {id(p) for p in self.inner_lrs.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in rates]
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
            {
                "params": list(self.inner_lrs.parameters()),
                "lr": self.config.lr_meta_lr,
                "weight_decay": 0.0,
            },
        ]


def _key(name: str) -> str:
    return name.replace(".", "__")
