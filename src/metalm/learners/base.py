"""The interface every learner implements, its registry, and the task-head helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from metalm.choices import check_choices
from metalm.data.episodes import Episode
from metalm.errors import MetalmError
from metalm.label_names import LabelNameMode, named_classes, usable_names
from metalm.models.encoder import TextEncoder

if TYPE_CHECKING:
    from metalm.models.causal import CausalLM

TaskState = dict[str, Tensor]
"""What `adapt` learns about one task: prototypes, fast weights, ... (safetensors-ready)."""


@dataclass
class LearnerConfig:
    """Base of every learner's typed config; `name` picks the learner. Its choice
    fields (`Literal[...]`) are checked here, for every learner."""

    name: str = "protonet"

    def __post_init__(self) -> None:
        check_choices(self, "learner")


@dataclass
class LabelNamesConfig(LearnerConfig):
    """The label-name options of the learners that read embeddings.

    `label_names`: `off`; `example`: each class's name, as words (`card_arrival` →
    "card arrival"), is one more support example of its class, counting
    `label_name_weight` examples where the head weighs its examples (`frozen`,
    `protonet`: centroid and logistic-regression heads, and in `protonet`'s
    meta-training loss) and one elsewhere; `prior` (`frozen`, `protonet`): the
    logistic regression's L2 penalty also pulls each class's weights towards the
    prototype head of its name, `label_name_weight` times as strongly (the centroid
    head, a Gaussian prior on the class mean, counts the name as `label_name_weight`
    examples, as `example` does). A name that is an id (`0`, `w2`, `class_3`: see
    `metalm.label_names`) is left out; when most of a task's names are, the
    option is off for that task, with a warning.
    """

    label_names: LabelNameMode = "off"
    label_name_weight: float = 1.0
    weighs_label_names: ClassVar[bool] = False  # the learner honours the weight and `prior`

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.label_name_weight > 0:
            raise MetalmError(
                f"learner.label_name_weight must be > 0, got {self.label_name_weight}"
            )
        if not self.weighs_label_names and (
            self.label_names == "prior" or self.label_name_weight != 1.0
        ):
            raise MetalmError(
                f"learner {self.name!r} adds each label name once, as a support example: "
                "use learner.label_names=example with label_name_weight=1 (`prior` and "
                "other weights work with frozen and protonet)"
            )


class MetaLearner(nn.Module, ABC):
    """A few-shot learner: `adapt` to a support set, then `predict` query logits.

    Meta-trainable learners also define `meta_loss(episode)`, the outer objective.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[LearnerConfig]]
    meta_trainable: ClassVar[bool] = True
    model_kind: ClassVar[str] = "encoder"  # the `model.kind` it runs on

    def __init__(self, encoder: TextEncoder, config: LearnerConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config

    @abstractmethod
    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        """Learn a task from its labeled support texts (labels 0..N-1)."""

    def adapt_named(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        label_names: Sequence[str],
    ) -> TaskState:
        """`adapt`, given also the name of each label: in-context learners write them in
        their prompt; with `learner.label_names=example`, each name (as words) is one
        more support example of its class; otherwise the names are not read."""
        names = self.label_texts(label_names, support_labels)
        if names is None:
            return self.adapt(support_texts, support_labels)
        classes, texts = named_classes(names)
        return self.adapt(list(support_texts) + texts, list(support_labels) + classes)

    def adapt_unlabeled(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        label_names: Sequence[str] | None,
        unlabeled_texts: Sequence[str],
    ) -> TaskState:
        """`adapt`, then self-training on texts without labels (`frozen`, `protonet`)."""
        raise MetalmError(
            f"learner {self.name!r} does not self-train on unlabeled texts; adapt without "
            "them, or use a frozen or protonet model"
        )

    def label_texts(
        self, label_names: Sequence[str], support_labels: Sequence[int]
    ) -> list[str | None] | None:
        """The label names as texts to embed when `learner.label_names` is on (None for
        a name that is an id), or None when it is off or most names are ids (with a
        warning: see `metalm.label_names.usable_names`)."""
        if getattr(self.config, "label_names", "off") == "off":
            return None
        n_way = max(support_labels, default=-1) + 1
        if len(label_names) != n_way:
            raise MetalmError(f"{n_way} classes but {len(label_names)} label names")
        return usable_names(label_names)

    @abstractmethod
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        """Logits [len(query_texts), N] for the task described by `state`."""

    @property
    def _dtype(self) -> torch.dtype:
        """The encoder's floating-point type (task heads and meta-networks follow it)."""
        return next(self.encoder.model.parameters()).dtype

    def meta_loss(self, episode: Episode) -> Tensor:
        """The outer-loop loss on one episode (meta-trainable learners only)."""
        raise MetalmError(f"learner {self.name!r} is not meta-trained; set train.steps=0")

    def meta_loss_batch(self, episodes: Sequence[Episode]) -> Tensor | None:
        """The mean outer loss of a whole meta-batch in one call (e.g. `vmap`), or None
        to have the trainer call `meta_loss` per episode (the default)."""
        return None

    def optimizer_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups of the outer optimizer: by default one group of every
        trainable parameter; a learner may give some meta-parameters their own rate."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


LEARNERS: dict[str, type[MetaLearner]] = {}


def register_learner(
    name: str, config_class: type[LearnerConfig]
) -> Callable[[type[MetaLearner]], type[MetaLearner]]:
    """Class decorator: the one place a learner and its config are registered."""

    def wrap(cls: type[MetaLearner]) -> type[MetaLearner]:
        if name in LEARNERS:
            raise ValueError(f"learner {name!r} is registered twice")
        if config_class.name != name:  # the default name picks this learner back
            raise ValueError(f"{config_class.__name__}.name is {config_class.name!r}, not {name!r}")
        cls.name = name
        cls.config_class = config_class
        LEARNERS[name] = cls
        return cls

    return wrap


def learner_class(name: str) -> type[MetaLearner]:
    if name not in LEARNERS:
        raise MetalmError(f"unknown learner {name!r}; valid learners are {sorted(LEARNERS)}")
    return LEARNERS[name]


def method_label(config: LearnerConfig) -> str:
    """The name a learner config goes by in reports: `config.name`, or `name/head` when
    its task head (`learner.head`, where it has one) is not its config class's default,
    so that e.g. `frozen` and `frozen/logreg` stay apart.

    Example:
        >>> from metalm.learners.protonet import FrozenConfig
        >>> method_label(FrozenConfig()), method_label(FrozenConfig(head="centroid"))
        ('frozen', 'frozen/centroid')
    """
    head = getattr(config, "head", None)
    default = next((f.default for f in fields(config) if f.name == "head"), MISSING)
    if head is None or head == default:
        return config.name
    return f"{config.name}/{head}"


def model_kind_of(model: nn.Module) -> str:
    """`causal` for a causal LM, else `encoder`."""
    from metalm.models.causal import CausalLM

    return "causal" if isinstance(model, CausalLM) else "encoder"


def build_learner(encoder: TextEncoder | CausalLM, config: LearnerConfig) -> MetaLearner:
    """The learner named by `config.name`, over `encoder` (a sentence encoder, or a
    causal LM for the in-context learners)."""
    cls = learner_class(config.name)
    if cls.model_kind != model_kind_of(encoder):
        raise MetalmError(
            f"learner {config.name!r} runs on model.kind={cls.model_kind}, but the model is "
            f"model.kind={model_kind_of(encoder)}; set model.kind={cls.model_kind}"
        )
    return cls(encoder, config).to(encoder.device)


# -- task heads and task states, shared by the learners ---------------------------------
HEAD_KEYS = ("head.weight", "head.bias")
ENCODER_PREFIX = "encoder."
"""Task states and inner-loop parameters key adapted encoder tensors `encoder.<name>`."""


def head_logits(head: dict[str, Tensor], features: Tensor, scale: float = 1.0) -> Tensor:
    """`scale * (features @ W.T + b)` with a task head `{"head.weight", "head.bias"}`, in
    the features' precision (a logistic-regression head is fitted in float32)."""
    weight, bias = head["head.weight"], head["head.bias"]
    if weight.dtype != features.dtype:
        weight, bias = weight.to(features.dtype), bias.to(features.dtype)
    return scale * (features @ weight.T + bias)


def head_loss(
    head: dict[str, Tensor], features: Tensor, labels: Tensor, scale: float = 1.0
) -> Tensor:
    """Cross-entropy of the logits `head_logits(head, features, scale)` against `labels`."""
    return nn.functional.cross_entropy(head_logits(head, features, scale), labels)


def prototype_head(means: Tensor) -> dict[str, Tensor]:
    """The linear form of the squared-Euclidean nearest-centroid classifier on the class
    means `means` [N, dim]: `head.weight` = 2m, `head.bias` = −‖m‖² (Proto-MAML's
    start), so `x·Wᵀ + b = ‖x‖² − ‖x − m‖²` ranks classes as the nearest centroid does.

    Example:
        >>> prototype_head(torch.tensor([[1.0, 2.0]]))
        {'head.weight': tensor([[2., 4.]]), 'head.bias': tensor([-5.])}
    """
    return {"head.weight": 2 * means, "head.bias": -means.pow(2).sum(-1)}


def encoder_params(state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """The adapted encoder tensors of a task state or inner-loop parameters (keys
    `encoder.<name>`), by parameter name; None when there are none (the encoder as is).

    Example:
        >>> encoder_params({"encoder.bias": torch.zeros(1), "head.bias": torch.zeros(2)})
        {'bias': tensor([0.])}
    """
    params = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    return params or None


def one_hot_means(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means (prototypes) [n_way, dim] of `embeddings` grouped by `labels`. The
    one-hot is a comparison, not `one_hot`, so that it also works under `vmap`."""
    classes = torch.arange(n_way, device=labels.device)
    onehot = (labels[:, None] == classes).to(embeddings.dtype)
    return (onehot.T @ embeddings) / onehot.sum(0).unsqueeze(1)


def as_labels(labels: Sequence[int], device: torch.device) -> tuple[Tensor, int]:
    tensor = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    if tensor.numel() == 0:
        raise MetalmError("the support set is empty; give at least one example per class")
    n_way = int(tensor.max()) + 1
    missing = sorted(set(range(n_way)) - set(tensor.tolist()))
    if missing:
        raise MetalmError(f"support labels must cover 0..{n_way - 1}; missing {missing[:5]}")
    return tensor, n_way
