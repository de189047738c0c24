"""In-context learners on a causal LM: `icl` (no training) and `metaicl` (meta-trained).

A task's support set becomes a prompt of demonstrations (seeded order, label names as
words); each query is scored against every label, `direct` (mean log P(label | prompt,
query)) or `channel` (mean log P(query | prompt, label)), optionally calibrated. The
prompt's key/value cache is computed once per task and reused (`PromptScorer`).

`metaicl` (MetaICL, Min et al. 2022) meta-trains the LM on episodes rendered the same
way: each query after the support demonstrations, the loss on the correct label's tokens
(`loss=lm`; in `channel` scoring, on the query's tokens after its label) or a
cross-entropy over every label's score (`loss=choice`). It updates LoRA adapters (PEFT)
by default, or every weight (`lora=false`).

Example:
    >>> lm = build_model(EncoderConfig(kind="causal", name_or_path=tiny_llama))  # default: SmolLM2
    >>> learner = build_learner(lm, ICLConfig(scoring="channel"))
    >>> state = learner.adapt_named(["lost my card", "balance?"], [0, 1], ["lost card", "balance"])
    >>> learner.predict(state, ["someone took my card"]).shape   # a score per label
    torch.Size([1, 2])
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from metalm.data.episodes import Episode
from metalm.errors import MetalmError, first_line
from metalm.label_names import verbalize
from metalm.learners.base import LearnerConfig, MetaLearner, TaskState, as_labels, register_learner
from metalm.models.causal import CausalLM
from metalm.models.prompting import (
    CHANNEL_TEMPLATE,
    PromptScorer,
    PromptTemplate,
    Segment,
    build_prefix,
)

PROMPT_KEY = "prompt.json"  # the task state: the prompt and label words, as UTF-8 bytes
CACHED_PROMPTS = 2  # prefix caches kept between predict calls (the task being served)
TRAIN_CHUNK = 1 << 30  # a training episode runs in one pass: its prompt is encoded once


@dataclass
class ICLConfig(LearnerConfig):
    """In-context learning with a causal LM (`model.kind=causal`).

    `scoring`: `direct` or `channel`; `calibrate`: subtract the scores of the content-free
    query "N/A" (direct only). `demo_template` (with `{text}` and `{label}`) and
    `query_template` (with `{text}` for direct scoring, `{label}` for channel) replace the
    scoring's default templates when set. `seed`: the order of the
    demonstrations. `max_prompt_tokens`: the longest prompt allowed (0: the model's
    context length); a task whose demonstrations do not fit is refused with an error.
    """

    name: str = "icl"
    scoring: Literal["direct", "channel"] = "direct"
    calibrate: bool = False
    demo_template: str = ""
    query_template: str = ""
    seed: int = 0
    max_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibrate and self.scoring != "direct":
            raise MetalmError("learner.calibrate works with scoring=direct only")
        if self.max_prompt_tokens < 0:
            raise MetalmError(
                f"learner.max_prompt_tokens must be >= 0, got {self.max_prompt_tokens}"
            )
        template = self.template()
        # direct scoring writes the query's text before the label, channel the label first
        query_needs = ("{label}",) if self.scoring == "channel" else ("{text}",)
        for key, needed in (
            ("demo_template", ("{text}", "{label}")),
            ("query_template", query_needs),
        ):
            missing = [k for k in needed if k not in getattr(template, key.split("_")[0])]
            if missing:
                raise MetalmError(
                    f"learner.{key} must contain {' and '.join(missing)} (scoring={self.scoring})"
                )

    def template(self) -> PromptTemplate:
        """The prompt template: the scoring's default, or the configured one."""
        base = CHANNEL_TEMPLATE if self.scoring == "channel" else PromptTemplate()
        return PromptTemplate(
            demo=self.demo_template or base.demo, query=self.query_template or base.query
        )


@dataclass
class MetaICLConfig(ICLConfig):
    """MetaICL: the LM meta-trained to learn from its prompt (see the module docstring).

    `lora`: train LoRA adapters of rank `lora_r` (scale `lora_alpha / lora_r`) on
    `lora_targets` (`all-linear` or module names joined by `,`) instead of every weight.
    `loss`: `lm` (the target tokens, as in the paper) or `choice` (softmax over labels).
    """

    name: str = "metaicl"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "all-linear"
    loss: Literal["lm", "choice"] = "lm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_r < 1:
            raise MetalmError(f"learner.lora_r must be >= 1, got {self.lora_r}")


def encode_prompt(prefix: str, labels: Sequence[str]) -> Tensor:
    """A task's prompt and label words as a uint8 tensor (task states hold tensors)."""
    data = json.dumps({"prefix": prefix, "labels": list(labels)}).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_prompt(state: TaskState) -> tuple[str, list[str]]:
    if PROMPT_KEY not in state:
        raise MetalmError("this task state was not made by an in-context learner")
    data = json.loads(bytes(state[PROMPT_KEY].cpu().tolist()).decode("utf-8"))
    return data["prefix"], data["labels"]


@register_learner("icl", ICLConfig)
class ICL(MetaLearner):
    """In-context learning: the support set as demonstrations in the prompt.

    Example:
        >>> learner = ICL(lm, ICLConfig())
        >>> state = learner.adapt_named(texts, labels, ["weather", "alarm", "music"])
        >>> learner.predict(state, ["will it rain"]).shape
        torch.Size([1, 3])
    """

    meta_trainable = False
    model_kind = "causal"
    config: ICLConfig
    encoder: CausalLM

    def __init__(self, encoder: CausalLM, config: ICLConfig):
        super().__init__(encoder, config)
        self.template = config.template()
        self._caches: OrderedDict[str, object] = OrderedDict()

    @property
    def scorer(self) -> PromptScorer:
        return PromptScorer(self.encoder.model, self.encoder.tokenizer, self.template)

    def prompt_limit(self) -> int:
        return self.config.max_prompt_tokens or self.encoder.context_length

    def prefix(self, texts: Sequence[str], labels: Sequence[int], names: Sequence[str]) -> str:
        """The demonstrations of a support set (labels as the words of their names)."""
        return build_prefix(texts, [names[y] for y in labels], self.template, self.config.seed)

    def adapt(self, support_texts: Sequence[str], support_labels: Sequence[int]) -> TaskState:
        """Without label names the labels are written `class 0`, `class 1`, ...: give
        the names through `adapt_named` (the classifier and evaluation do)."""
        _, n_way = as_labels(support_labels, torch.device("cpu"))
        return self.adapt_named(support_texts, support_labels, [f"class {i}" for i in range(n_way)])

    def adapt_named(
        self,
        support_texts: Sequence[str],
        support_labels: Sequence[int],
        label_names: Sequence[str],
    ) -> TaskState:
        _, n_way = as_labels(support_labels, torch.device("cpu"))
        if len(label_names) != n_way:
            raise MetalmError(f"{n_way} classes but {len(label_names)} label names")
        words = [verbalize(name) for name in label_names]
        if len(set(words)) != len(words) or not all(words):
            raise MetalmError(f"label names must be distinct words once written out: {words}")
        prefix = self.prefix(support_texts, support_labels, words)
        tokens = len(self.scorer.ids(prefix))
        longest = max(self.encoder.token_counts(list(support_texts))) + 32
        if tokens + longest > self.prompt_limit():
            raise MetalmError(
                f"the prompt of {len(support_texts)} demonstrations has {tokens} tokens, more "
                f"than fit in {self.prompt_limit()} (the model's context or "
                "learner.max_prompt_tokens) with a query: give fewer examples per class or "
                "fewer classes, or use an embedding learner (frozen, protonet) for this task"
            )
        if not (self.training and self.meta_trainable):
            self._prefix_cache(self.scorer, prefix)  # the prompt is encoded here, once
        return {PROMPT_KEY: encode_prompt(prefix, words)}

    @torch.no_grad()
    def predict(self, state: TaskState, query_texts: Sequence[str]) -> Tensor:
        """Scores [len(query_texts), N]: mean log-probabilities (softmax for probabilities)."""
        prefix, labels = decode_prompt(state)
        scorer = self.scorer
        cache = self._prefix_cache(scorer, prefix)
        if self.config.scoring == "channel":
            scores = scorer.score_channel(prefix, query_texts, labels, cache=cache)
        else:
            scores = scorer.score(
                prefix, query_texts, labels, calibrate=self.config.calibrate, cache=cache
            )
        return scores.to(self.encoder.device)

    def _prefix_cache(self, scorer: PromptScorer, prefix: str) -> object:
        """The prompt's key/value cache, kept for the last few prompts (a served task
        answers every request from it). Cleared whenever the weights may change: a
        meta-trainable learner in training mode keeps none."""
        if self.training and self.meta_trainable:
            self._caches.clear()
            return scorer.prefix_cache(scorer.ids(prefix))
        if prefix not in self._caches:
            self._caches[prefix] = scorer.prefix_cache(scorer.ids(prefix))
            while len(self._caches) > CACHED_PROMPTS:
                self._caches.popitem(last=False)
        self._caches.move_to_end(prefix)
        return self._caches[prefix]

    def train(self, mode: bool = True) -> ICL:
        self._caches.clear()
        return super().train(mode)


@register_learner("metaicl", MetaICLConfig)
class MetaICL(ICL):
    """MetaICL: meta-train the LM (LoRA adapters by default) to learn in context.

    Example:
        >>> learner = MetaICL(lm, MetaICLConfig())
        >>> loss = learner.meta_loss(episode)        # through MetaTrainer
        >>> loss.ndim, bool(loss > 0)                # one mean cross-entropy
        (0, True)
    """

    meta_trainable = True
    config: MetaICLConfig

    def __init__(self, encoder: CausalLM, config: MetaICLConfig):
        super().__init__(encoder, config)
        # checkpoints then hold the adapters only, not the frozen LM (540 MB for SmolLM2)
        self.trainable_weights_only = config.lora
        if config.lora:
            add_lora(encoder.model, config)
        else:
            encoder.model.requires_grad_(True)

    def meta_loss(self, episode: Episode) -> Tensor:
        words = [verbalize(name) for name in episode.label_names]
        # a fresh demonstration order per episode (seeded by its texts): no order to memorise
        seed = zlib.crc32("\n".join(episode.support_texts).encode("utf-8"))
        prefix = build_prefix(
            episode.support_texts, [words[y] for y in episode.support_labels], self.template, seed
        )
        scorer = self.scorer
        prefix_ids = scorer.ids(prefix)
        targets = torch.as_tensor(episode.query_labels)

        def logprobs(segments: list[Segment]) -> list[Tensor]:
            return scorer.target_logprobs(prefix_ids, segments, chunk_tokens=TRAIN_CHUNK)

        if self.config.scoring == "direct":
            context = [scorer.ids(self.template.query.format(text=q)) for q in episode.query_texts]
            labels = [scorer.ids(self.template.label_prefix + w) for w in words]
            if self.config.loss == "lm":
                pairs = zip(context, targets.tolist(), strict=True)
                return -torch.cat(logprobs([Segment(c, [labels[y]]) for c, y in pairs])).mean()
            scores = torch.stack(logprobs([Segment(c, labels) for c in context]))
        else:
            queries = [scorer.ids(self.template.label_prefix + q) for q in episode.query_texts]
            contexts = [scorer.ids(self.template.query.format(label=w)) for w in words]
            if self.config.loss == "lm":
                pairs = zip(queries, targets.tolist(), strict=True)
                return -torch.cat(logprobs([Segment(contexts[y], [q]) for q, y in pairs])).mean()
            scores = torch.stack(logprobs([Segment(c, queries) for c in contexts])).T
        return nn.functional.cross_entropy(scores, targets.to(scores.device))


def add_lora(model: nn.Module, config: MetaICLConfig) -> None:
    """LoRA adapters (PEFT) on `config.lora_targets`, in place; every other weight frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MetalmError("learner.lora needs PEFT: pip install peft") from None
    targets = config.lora_targets
    modules: str | list[str] = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=modules
    )
    model.requires_grad_(False)
    try:
        inject_adapter_in_model(lora, model)
    except ValueError as err:
        raise MetalmError(f"learner.lora_targets={targets!r}: {first_line(err)}") from None
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
