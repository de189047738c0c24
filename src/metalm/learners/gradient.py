"""The shared base of the gradient-based learners: typed configs, the task head,
inner loops on the support set, and meta-losses looped or vmapped over a meta-batch.

Every learner built on `GradientLearner` adapts a task by a few gradient steps on its
support set (the inner loop, `inner_loops.inner_loop`, on a dict of tensors: the model
is never changed) with its inner optimizer (`optim.inner_optimizer`, built once from the
config), and is meta-trained through that adaptation (the outer loop, `MetaTrainer`).

The task head is task-specific, not a meta-parameter: N-way tasks change their label
order every episode. It starts at zero or at the support set's class means
(`head_init=prototype`, as Proto-MAML / LEOPARD), computed *with* gradient so that the
meta-gradient flows through it. Logits are `logit_scale * (W x + b)`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError, first_line
from metalm.learners.adapted_params import AdaptMode, select_params
from metalm.learners.base import (
    ENCODER_PREFIX,
    HEAD_KEYS,
    LabelNamesConfig,
    MetaLearner,
    TaskState,
    as_labels,
    encoder_params,
    head_logits,
    head_loss,
    one_hot_means,
    prototype_head,
)
from metalm.learners.heads import DEFAULT_LOGREG_L2, fit_logreg
from metalm.learners.inner_loops import LossFn, inner_loop
from metalm.learners.optim import GradientTransformation, Params, inner_optimizer
from metalm.learners.vmap_safety import attention_mask_4d, math_attention, vmap_safe_layer_norm
from metalm.models.encoder import FORWARD_TOKENS, TextEncoder, length_groups


class TokenBatch(NamedTuple):
    """A support set as token tensors (ids and mask [n, L], labels [n]); `vectorized`:
    inside `vmap` (a ready 4D attention mask, no length grouping)."""

    ids: Tensor
    mask: Tensor
    labels: Tensor
    vectorized: bool = False


class FeatureBatch(NamedTuple):
    """A support set as embeddings [n, dim] and labels [n] (head-only inner loops)."""

    features: Tensor
    labels: Tensor


@dataclass
class GradientConfig(LabelNamesConfig):
    """Shared by the gradient-based learners.

    `inner_steps` gradient steps adapt each task during meta-training, and
    `eval_inner_steps` (default: the same) at test time. `head_lr`: inner learning rate
    of the task head; `head_init`: `prototype` or `zero`; `eval_head_init`: the head a
    task starts from at test time (default: `head_init`), which may also be `logreg`
    (the logistic-regression fit of `learner.head=logreg`, then the inner steps from
    there); `inner_optimizer`: `sgd` or `adam` (differentiable). `first_order`: the
    inner gradients are constants to the outer loop (no second-order terms; FOMAML).
    `vectorize`: adapt the tasks of a meta-batch in one `torch.func.vmap` call when
    their shapes agree, instead of one by one. Off by default: on MiniLM it is no
    faster overall (0.78-1.22x by learner) and takes 2-3.6x the memory
    (`python benchmarks/vmap_vs_loop.py`); it pays off on small models.
    """

    name: str = "anil"
    inner_steps: int = 5
    eval_inner_steps: int | None = None
    head_lr: float = 0.05
    head_init: Literal["prototype", "zero"] = "prototype"
    eval_head_init: Literal["prototype", "zero", "logreg"] | None = None
    logit_scale: float = 10.0
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    first_order: bool = False
    vectorize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_steps < 0 or (
            self.eval_inner_steps is not None and self.eval_inner_steps < 0
        ):
            raise MetalmError("learner.inner_steps and learner.eval_inner_steps must be >= 0")
        if self.logit_scale <= 0:
            raise MetalmError(f"learner.logit_scale must be > 0, got {self.logit_scale}")


@dataclass
class EncoderAdaptConfig(GradientConfig):
    """A gradient learner whose inner loop also adapts encoder tensors.

    `adapt`: `all`, `head` (the head only: ANIL), `last_n` (the last `last_n` blocks),
    `bias` (every bias, BitFit) or `lora` (rank-`lora_r` LoRA adapters on the
    `lora_targets` modules, through PEFT). `inner_lr`: inner rate of those tensors.
    `adapt_embeddings`: also adapt the embedding tables (off: their dense gradient over
    the whole vocabulary doubles the cost of a FOMAML step; `benchmarks/maml_speed.py`).
    `eval_adapt`: what adapts at test time; null: the same tensors as in meta-training;
    `head`: the head only, on embeddings computed once (as fast as ANIL's adapt).
    """

    adapt: AdaptMode = "last_n"
    eval_adapt: Literal["head"] | None = None
    last_n: int = 2
    adapt_embeddings: bool = False
    inner_lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapt == "lora" and self.lora_r < 1:
            raise MetalmError(f"learner.lora_r must be >= 1, got {self.lora_r}")


def wrap_lora(encoder: TextEncoder, config: EncoderAdaptConfig) -> None:
    """Inject PEFT LoRA adapters into `encoder.model` (once). LoRA's B starts at zero, so
    the encoder computes exactly what it did. All weights stay meta-trainable."""
    if any("lora_" in n for n, _ in encoder.model.named_parameters()):
        return
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MetalmError("learner.adapt=lora needs PEFT: pip install peft") from None
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(lora, encoder.model)
    except ValueError as err:
        raise MetalmError(
            f"cannot add LoRA to {list(config.lora_targets)}: {first_line(err)}; "
            "set learner.lora_targets to the encoder's attention module names"
        ) from None
    for parameter in encoder.model.parameters():
        parameter.requires_grad_(True)  # PEFT freezes the base; the outer loop trains it


class GradientLearner(MetaLearner):
    """Shared machinery: the task head, inner loops, meta-losses looped or vmapped.

    Subclasses may learn rates (`_inner_lrs`), compose another `inner_optimizer` or
    replace `_task_loss`. The config's values were checked when it was built
    (`__post_init__`), `first_order` included.
    """

    config: GradientConfig
    encodes_support_with_query: ClassVar[bool] = False  # one padded batch of both sets

    def __init__(self, encoder: TextEncoder, config: GradientConfig):
        super().__init__(encoder, config)
        self.adapted_names: list[str] = []
        if isinstance(config, EncoderAdaptConfig):  # else the head only (ANIL)
            if config.adapt == "lora":
                wrap_lora(encoder, config)
            chosen = select_params(
                encoder, config.adapt, config.last_n, embeddings=config.adapt_embeddings
            )
            self.adapted_names = sorted(chosen)

    # -- pieces ----------------------------------------------------------------------
    @property
    def head_only(self) -> bool:
        return not self.adapted_names

    @property
    def first_order(self) -> bool:
        return self.config.first_order

    @functools.cached_property
    def inner_optimizer(self) -> GradientTransformation:
        """`learner.inner_optimizer` at the inner rates (`_inner_lrs`), built once."""
        return inner_optimizer(self.config.inner_optimizer, self._inner_lrs())

    def meta_params(self) -> Params:
        """The live encoder tensors that adapt, keyed `encoder.<name>`."""
        named = dict(self.encoder.model.named_parameters())
        return {ENCODER_PREFIX + n: named[n] for n in self.adapted_names}

    def _inner_lrs(self) -> dict[str, Any]:
        """The inner rate of each tensor that adapts (`encoder.<name>` and the head)."""
        lrs: dict[str, Any] = {}
        if isinstance(self.config, EncoderAdaptConfig):
            lrs = dict.fromkeys(
                (ENCODER_PREFIX + n for n in self.adapted_names), self.config.inner_lr
            )
        lrs.update(dict.fromkeys(HEAD_KEYS, self.config.head_lr))
        return lrs

    def _features(
        self, ids: Tensor, mask: Tensor, params: Params | None, vectorized: bool
    ) -> Tensor:
        """Pooled embeddings of token tensors, with `params` (prefixed) swapped in.
        Outside `vmap`, rows of similar length are encoded together, each group cut to
        its own width (as `TextEncoder.forward` does)."""
        if not vectorized:
            lengths = mask.sum(1).tolist()
            groups = length_groups(lengths, FORWARD_TOKENS)
            if len(groups) > 1:
                parts = []
                for group in groups:
                    rows = torch.tensor(group, device=ids.device)
                    width = max(lengths[i] for i in group)
                    parts.append(
                        self._padded_features(ids[rows, :width], mask[rows, :width], params, False)
                    )
                order = torch.tensor([i for g in groups for i in g], device=ids.device)
                return torch.cat(parts)[torch.argsort(order)]
        return self._padded_features(ids, mask, params, vectorized)

    def _padded_features(
        self, ids: Tensor, mask: Tensor, params: Params | None, vectorized: bool
    ) -> Tensor:
        model = self.encoder.model
        swapped = encoder_params(params or {})
        kwargs = {
            "input_ids": ids,
            "attention_mask": attention_mask_4d(model, mask) if vectorized else mask,
        }
        if swapped:
            out = torch.func.functional_call(model, swapped, args=(), kwargs=kwargs)
        else:
            out = model(**kwargs)
        return self.encoder.pool(out.last_hidden_state, mask)

    def logits(self, params: Params, features: Tensor) -> Tensor:
        return head_logits(params, features, self.config.logit_scale)

    def init_head(
        self, features: Tensor, labels: Tensor, n_way: int, kind: str | None = None
    ) -> Params:
        """Zero head, the prototype head `2 m_c`, `-||m_c||^2` (with gradient), or (at
        test time) the logistic-regression fit; `kind` defaults to `head_init`."""
        kind = kind or self.config.head_init
        if kind == "logreg":  # fitted for logits W x + b: divided by the logit scale
            fit = fit_logreg(features, labels, n_way, l2=DEFAULT_LOGREG_L2)
            scale = self.config.logit_scale
            return {k: (fit[k] / scale).to(features.dtype) for k in HEAD_KEYS}
        if kind == "zero":
            dim = features.shape[-1]
            return {
                "head.weight": features.new_zeros(n_way, dim),
                "head.bias": features.new_zeros(n_way),
            }
        return prototype_head(one_hot_means(features, labels, n_way))

    def _head_loss(self, params: Params, batch: FeatureBatch) -> Tensor:
        return head_loss(params, batch.features, batch.labels, self.config.logit_scale)

    def _support_loss(self, params: Params, batch: TokenBatch) -> Tensor:
        features = self._features(batch.ids, batch.mask, params, batch.vectorized)
        return head_loss(params, features, batch.labels, self.config.logit_scale)

    def _inner(
        self, params: Params, loss_fn: LossFn, batch: Any, steps: int, first_order: bool
    ) -> Params:
        return inner_loop(params, loss_fn, batch, steps, self.inner_optimizer, first_order)

    # -- meta-training ---------------------------------------------------------------
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
        """The outer loss of one task: adapt on the support set, cross-entropy on the query."""
        steps = self.config.inner_steps
        if self.head_only:  # ANIL: encoder features once, the inner loop on the head only
            features = self._features(
                torch.cat([s_ids, q_ids]), torch.cat([s_mask, q_mask]), None, vectorized
            )
            support, query = features[: s_ids.shape[0]], features[s_ids.shape[0] :]
            head = self.init_head(support, s_labels, n_way)
            adapted = self._inner(
                head, self._head_loss, FeatureBatch(support, s_labels), steps, self.first_order
            )
            return head_loss(adapted, query, q_labels, self.config.logit_scale)
        if self.config.head_init == "prototype":
            support = self._features(s_ids, s_mask, None, vectorized)
        else:
            support = torch.empty(0, self.encoder.dim, device=s_ids.device, dtype=self._dtype)
        params = {**self.meta_params(), **self.init_head(support, s_labels, n_way)}
        batch = TokenBatch(s_ids, s_mask, s_labels, vectorized)
        adapted = self._inner(params, self._support_loss, batch, steps, self.first_order)
        query = self._features(q_ids, q_mask, adapted, vectorized)
        return head_loss(adapted, query, q_labels, self.config.logit_scale)

    def _tokens(
        self, groups: Sequence[Sequence[str]], shared_width: bool = True
    ) -> list[tuple[Tensor, Tensor]]:
        """Token ids and masks of each group of texts, all padded to one width
        (`shared_width`, needed to stack them) or each group to its own."""
        batches = [self.encoder.tokenize(list(texts)) for texts in groups]
        if not shared_width:
            return [(b["input_ids"], b["attention_mask"]) for b in batches]
        width = max(b["input_ids"].shape[1] for b in batches)
        pad = self.encoder.tokenizer.pad_token_id or 0
        out = []
        for b in batches:
            extra = width - b["input_ids"].shape[1]
            ids = nn.functional.pad(b["input_ids"], (0, extra), value=pad)
            out.append((ids, nn.functional.pad(b["attention_mask"], (0, extra))))
        return out

    def _episode_tensors(
        self, episodes: Sequence[Episode], shared_width: bool = True
    ) -> tuple[Tensor, ...]:
        """[B, ...] tensors (support ids, mask, labels, query ids, mask, labels)."""
        device = self.encoder.device
        tokens = self._tokens(
            [ep.support_texts for ep in episodes] + [ep.query_texts for ep in episodes],
            shared_width,
        )
        support, query = tokens[: len(episodes)], tokens[len(episodes) :]

        def labels(name: str) -> Tensor:
            return torch.tensor(
                [getattr(ep, name) for ep in episodes], dtype=torch.long, device=device
            )

        return (
            torch.stack([ids for ids, _ in support]),
            torch.stack([mask for _, mask in support]),
            labels("support_labels"),
            torch.stack([ids for ids, _ in query]),
            torch.stack([mask for _, mask in query]),
            labels("query_labels"),
        )

    @property
    def _shared_width(self) -> bool:
        return self.head_only or self.encodes_support_with_query

    def _second_order_through_encoder(self) -> bool:
        return not self.first_order and not self.head_only

    def meta_loss(self, episode: Episode) -> Tensor:
        # one task: support and query padded to their own widths (ANIL encodes them together)
        tensors = [t[0] for t in self._episode_tensors([episode], shared_width=self._shared_width)]
        fn = functools.partial(self._task_loss, n_way=episode.n_way, vectorized=False)
        if self._second_order_through_encoder():
            with math_attention():
                return fn(*tensors)
        return fn(*tensors)

    def meta_loss_batch(self, episodes: Sequence[Episode]) -> Tensor | None:
        """Mean outer loss of equal-shaped episodes in one `vmap` call (None otherwise:
        `vectorize` off, one episode, or shapes that differ)."""
        shapes = {(ep.n_way, len(ep.support_texts), len(ep.query_texts)) for ep in episodes}
        if not self.config.vectorize or len(episodes) < 2 or len(shapes) != 1:
            return None
        tensors = self._episode_tensors(episodes)
        fn = functools.partial(self._task_loss, n_way=episodes[0].n_way, vectorized=True)
        with math_attention(), vmap_safe_layer_norm():
            return torch.func.vmap(fn, randomness="different")(*tensors).mean()

    # -- test time -------------------------------------------------------------------
    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        """Inner loop on the support set; returns the adapted head and encoder tensors."""
        cfg = self.config
        device = self.encoder.device
        labels, n_way = as_labels(support_labels, device)
        steps = cfg.inner_steps if cfg.eval_inner_steps is None else cfg.eval_inner_steps
        # cached during evaluation
        features = self.encoder.embed(support_texts).to(device=device, dtype=self._dtype)
        head = self.init_head(features, labels, n_way, cfg.eval_head_init)
        with torch.enable_grad():
            if self.head_only or getattr(cfg, "eval_adapt", None) == "head":
                batch = FeatureBatch(features, labels)
                adapted = self._inner(head, self._head_loss, batch, steps, True)
            else:
                params = {k: v.detach() for k, v in self.meta_params().items()} | head
                ((ids, mask),) = self._tokens([support_texts])
                support = TokenBatch(ids, mask, labels)
                adapted = self._inner(params, self._support_loss, support, steps, True)
        return {k: v.detach() for k, v in adapted.items()}

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        features = self.encoder.embed(query_texts, params=encoder_params(state))
        head = state["head.weight"]
        return self.logits(state, features.to(device=head.device, dtype=head.dtype))
