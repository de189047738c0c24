"""In-context scoring with a causal LM: a task's support set becomes a prompt of
demonstrations, and each query is scored against every label by the LM's log-probability
of the label's tokens (`direct`, length-normalised). The demonstration prefix is run once
per task and its key/value cache reused for every query and label.

Example:
    >>> model, tokenizer = load_causal_lm()
    >>> scorer = DirectScorer(model, tokenizer)
    >>> prefix = build_prefix(["my card is lost", "what's my balance"], ["lost card", "balance"])
    >>> scorer.score(prefix, ["someone took my card"], ["lost card", "balance"]).argmax(-1)
    tensor([0])
"""

from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalm.errors import MetalmError


@dataclass(frozen=True)
class PromptTemplate:
    """How one example is written: `demo` for a support example, `query` for the text to
    classify (the label's tokens follow it, after `label_prefix`)."""

    demo: str = "Input: {text}\nIntent: {label}\n\n"
    query: str = "Input: {text}\nIntent:"
    label_prefix: str = " "


# `channel` scoring reads the other way: the label first, then the text it explains
CHANNEL_TEMPLATE = PromptTemplate(
    demo="Intent: {label}\nInput: {text}\n\n", query="Intent: {label}\nInput:"
)


def verbalize(class_name: str) -> str:
    """A label as words: `card_arrival` → `card arrival`."""
    return " ".join(str(class_name).replace("_", " ").replace("-", " ").split())


def build_prefix(
    texts: Sequence[str],
    labels: Sequence[str],
    template: PromptTemplate = PromptTemplate(),
    seed: int = 0,
) -> str:
    """The demonstrations of a support set in a seeded random order."""
    if len(texts) != len(labels) or not texts:
        raise MetalmError(f"need as many labels as texts, got {len(texts)} and {len(labels)}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return "".join(template.demo.format(text=texts[i], label=labels[i]) for i in order)


class DirectScorer:
    """log P(label | prefix, query) / label tokens, for every query and label."""

    def __init__(self, model: nn.Module, tokenizer, template: PromptTemplate = PromptTemplate()):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        # the key/value cache's argument name: `cache` since transformers 5.2x, before
        # `past_key_values` (an unknown keyword would be swallowed silently by **kwargs)
        parameters = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    def _forward(self, ids: Tensor, cache: object = None) -> tuple[Tensor, object]:
        """Logits and the key/value cache after `ids`, continuing `cache`."""
        out = self.model(ids, use_cache=True, **{self._cache_name: cache})
        return out.logits, out[self._cache_name]

    def _ids(self, text: str) -> Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids.to(next(self.model.parameters()).device)

    def _mean_logprob(
        self, prefix_ids: Tensor, prefix_cache: object, context: Tensor, target: Tensor
    ) -> float:
        """Mean log-probability of `target`'s tokens after prefix + `context`: from a copy
        of the prefix's cache, or (`prefix_cache` None) running the whole prompt."""
        tail = torch.cat([context, target], dim=1)
        if prefix_cache is not None:
            logits = self._forward(tail, copy.deepcopy(prefix_cache))[0]
        else:
            logits = self.model(torch.cat([prefix_ids, tail], dim=1)).logits
            logits = logits[:, prefix_ids.shape[1] :]
        # the target's tokens are predicted from the positions just before them
        predicted = logits[0, context.shape[1] - 1 : -1].log_softmax(-1)
        return float(predicted.gather(1, target[0].unsqueeze(1)).mean())

    @torch.no_grad()
    def score(
        self,
        prefix: str,
        queries: Sequence[str],
        labels: Sequence[str],
        use_cache: bool = True,
        calibrate: bool = False,
    ) -> Tensor:
        """Scores, shape [len(queries), len(labels)] (higher is likelier). With
        `use_cache`, the prefix runs once and its cache is copied for each query; without,
        every (query, label) pair runs the whole prompt (the reference it must equal).
        `calibrate`: subtract each label's score for the content-free input "N/A"
        (contextual calibration, Zhao et al. 2021)."""
        label_ids = [self._ids(self.template.label_prefix + label) for label in labels]
        if any(ids.shape[1] == 0 for ids in label_ids):
            raise MetalmError("every label needs at least one token; check the label names")
        prefix_ids = self._ids(prefix)
        prefix_cache = self._forward(prefix_ids)[1] if use_cache else None
        rows = [*queries, "N/A"] if calibrate else list(queries)
        out = torch.empty(len(rows), len(labels))
        for q, query in enumerate(rows):
            context = self._ids(self.template.query.format(text=query))
            for j, target in enumerate(label_ids):
                out[q, j] = self._mean_logprob(prefix_ids, prefix_cache, context, target)
        return out[:-1] - out[-1] if calibrate else out

    @torch.no_grad()
    def score_channel(
        self, prefix: str, queries: Sequence[str], labels: Sequence[str], use_cache: bool = True
    ) -> Tensor:
        """`channel` scores, shape [len(queries), len(labels)]: mean log P(query | label)
        after a prefix built with `CHANNEL_TEMPLATE` (Min et al. 2022); the cache is reused
        as in `score`."""
        prefix_ids = self._ids(prefix)
        prefix_cache = self._forward(prefix_ids)[1] if use_cache else None
        targets = [self._ids(self.template.label_prefix + q) for q in queries]
        if any(ids.shape[1] == 0 for ids in targets):
            raise MetalmError("every query needs at least one token")
        out = torch.empty(len(queries), len(labels))
        for j, label in enumerate(labels):
            context = self._ids(CHANNEL_TEMPLATE.query.format(label=label))
            for q, target in enumerate(targets):
                out[q, j] = self._mean_logprob(prefix_ids, prefix_cache, context, target)
        return out
