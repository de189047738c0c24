"""In-context scoring with a causal LM: a task's support set becomes a prompt of
demonstrations, and each query is scored against every label by the LM's log-probability
of the label's tokens (`direct`, length-normalised) or of its own tokens given the label
(`channel`).

The demonstration prefix runs once per task; its key/value cache is then reused for every
query and label. The continuations (a query's context, then each label after it) are
packed into one sequence whose attention mask lets each label see only the prefix, its own
context and its own tokens, so a whole chunk of queries costs one forward pass and the
prefix is never copied per label.

Example:
    >>> from metalm.models.causal import load_causal_lm
    >>> model, tokenizer = load_causal_lm(tiny_llama)   # default: the shipped SmolLM2-135M
    >>> scorer = PromptScorer(model, tokenizer)
    >>> prefix = build_prefix(["my card is lost", "what's my balance"], ["lost card", "balance"])
    >>> scorer.score(prefix, ["someone took my card"], ["lost card", "balance"]).shape
    torch.Size([1, 2])
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

# tokens of continuations run in one forward pass (bounds the attention mask's size)
PACK_TOKENS = 512


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


@dataclass
class Segment:
    """A context (token ids) followed, each on its own, by several targets to score."""

    context: list[int]
    targets: list[list[int]]


@dataclass
class Packed:
    """Segments laid out as one sequence: ids, positions after the prefix, which token
    may attend to which, and for every target token the index that predicts it."""

    ids: list[int]
    positions: list[int]
    allowed: Tensor  # bool [T, T]
    predictors: list[list[list[int]]]  # [segment][target] -> indices into ids
    targets: list[list[list[int]]]  # [segment][target] -> token ids


def pack(segments: Sequence[Segment], offset: int) -> Packed:
    """Lay `segments` out in one sequence after `offset` prefix tokens: a target sees
    the prefix, its segment's context and its own earlier tokens, nothing else, and its
    positions continue the context's, exactly as if it were scored alone."""
    ids: list[int] = []
    positions: list[int] = []
    groups: list[tuple[int, int]] = []  # (segment, -1 for context or target index)
    predictors: list[list[list[int]]] = []
    for s, segment in enumerate(segments):
        if not segment.context:
            raise MetalmError("every scored continuation needs a context of at least one token")
        ids += segment.context
        positions += [offset + i for i in range(len(segment.context))]
        groups += [(s, -1)] * len(segment.context)
        last_context = len(ids) - 1
        rows = []
        for j, target in enumerate(segment.targets):
            if not target:
                raise MetalmError("every label (and channel query) needs at least one token")
            first = len(ids)
            ids += target
            positions += [offset + len(segment.context) + k for k in range(len(target))]
            groups += [(s, j)] * len(target)
            rows.append([last_context] + [first + k for k in range(len(target) - 1)])
        predictors.append(rows)
    segment_of = torch.tensor([g[0] for g in groups])
    group_of = torch.tensor([g[1] for g in groups])
    index = torch.arange(len(ids))
    allowed = (
        (segment_of[:, None] == segment_of[None, :])
        & (index[None, :] <= index[:, None])
        & ((group_of[None, :] == -1) | (group_of[None, :] == group_of[:, None]))
    )
    return Packed(ids, positions, allowed, predictors, [list(s.targets) for s in segments])


def chunks(segments: Sequence[Segment], budget: int | None = None) -> list[list[Segment]]:
    """Consecutive runs of segments of at most `budget` tokens each (default
    `PACK_TOKENS`; a longer segment runs alone)."""
    budget = PACK_TOKENS if budget is None else budget
    out: list[list[Segment]] = [[]]
    used = 0
    for segment in segments:
        size = len(segment.context) + sum(len(t) for t in segment.targets)
        if out[-1] and used + size > budget:
            out.append([])
            used = 0
        out[-1].append(segment)
        used += size
    return [c for c in out if c]


class PromptScorer:
    """Mean log-probabilities of label (or query) tokens after a prompt, batched.

    `score` (direct: log P(label | prefix, query)) and `score_channel` (log P(query |
    prefix, label)) run without gradients; `target_logprobs` is the differentiable core
    both use, also the training loss of `metaicl`.
    """

    def __init__(self, model: nn.Module, tokenizer, template: PromptTemplate = PromptTemplate()):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        if decoder is None or head is None:
            raise MetalmError(f"{type(model).__name__}: not a decoder with an output head")
        self.decoder, self.head = decoder, head
        # the key/value cache's argument name: `cache` since transformers 5.2x, before
        # `past_key_values` (an unknown keyword would be swallowed silently by **kwargs)
        parameters = inspect.signature(decoder.forward).parameters
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def ids(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def prefix_cache(self, prefix_ids: Sequence[int]) -> object:
        """The key/value cache after the prefix (run once per task; for scoring without
        gradients: training runs the prompt and its continuations in one pass)."""
        ids = torch.tensor([list(prefix_ids)], device=self.device)
        out = self.decoder(input_ids=ids, use_cache=True)
        return out[self._cache_name]

    def _hidden(self, prefix_ids: Sequence[int], cache: object, packed: Packed) -> Tensor:
        """Last hidden states [T, dim] of the packed continuations, from a copy of
        `cache` or (None) running the prefix in the same pass."""
        n_prefix, n_tail = len(prefix_ids), len(packed.ids)
        dtype = next(self.decoder.parameters()).dtype
        blocked = torch.finfo(dtype).min
        tail = torch.tensor(packed.positions)
        if cache is not None:
            ids, positions = packed.ids, tail
            allowed = torch.cat([torch.ones(n_tail, n_prefix, dtype=torch.bool), packed.allowed], 1)
        else:
            ids = list(prefix_ids) + packed.ids
            positions = torch.cat([torch.arange(n_prefix), tail])
            top = torch.cat(
                [
                    torch.ones(n_prefix, n_prefix, dtype=torch.bool).tril(),
                    torch.zeros(n_prefix, n_tail, dtype=torch.bool),
                ],
                1,
            )
            bottom = torch.cat([torch.ones(n_tail, n_prefix, dtype=torch.bool), packed.allowed], 1)
            allowed = torch.cat([top, bottom], 0)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, blocked)
        kwargs = {self._cache_name: copy.deepcopy(cache)} if cache is not None else {}
        out = self.decoder(
            input_ids=torch.tensor([ids], device=self.device),
            attention_mask=mask[None, None].to(self.device),
            position_ids=positions[None].to(self.device),
            use_cache=cache is not None,
            **kwargs,
        )
        return out.last_hidden_state[0, -n_tail:]

    def target_logprobs(
        self,
        prefix_ids: Sequence[int],
        segments: Sequence[Segment],
        cache: object = None,
        chunk_tokens: int | None = None,
    ) -> list[Tensor]:
        """For each segment, the mean log-probability of each of its targets' tokens
        (a tensor [len(targets)]), after the prefix and the segment's context;
        differentiable unless run under `torch.no_grad`. Segments run in passes of about
        `chunk_tokens` tokens (default `PACK_TOKENS`)."""
        out: list[Tensor] = []
        for chunk in chunks(segments, chunk_tokens):
            packed = pack(chunk, len(prefix_ids))
            hidden = self._hidden(prefix_ids, cache, packed)
            where = [i for rows in packed.predictors for row in rows for i in row]
            tokens = [t for targets in packed.targets for target in targets for t in target]
            logits = self.head(hidden[where])
            if logits.dtype in (torch.float16, torch.bfloat16):  # soft-max in float32 at least
                logits = logits.float()
            logprobs = logits.log_softmax(-1)
            picked = logprobs.gather(1, torch.tensor(tokens, device=hidden.device)[:, None])[:, 0]
            start = 0
            for targets in packed.targets:
                means = []
                for target in targets:
                    means.append(picked[start : start + len(target)].mean())
                    start += len(target)
                out.append(torch.stack(means))
        return out

    def _label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        label_ids = [self.ids(self.template.label_prefix + label) for label in labels]
        if any(not ids for ids in label_ids):
            raise MetalmError("every label needs at least one token; check the label names")
        return label_ids

    @torch.no_grad()
    def score(
        self,
        prefix: str,
        queries: Sequence[str],
        labels: Sequence[str],
        use_cache: bool = True,
        calibrate: bool = False,
        cache: object = None,
    ) -> Tensor:
        """Direct scores, shape [len(queries), len(labels)] (higher is likelier). With
        `use_cache`, the prefix runs once (or `cache`, its cache from `prefix_cache`, is
        reused); without, each query's pass runs the whole prompt again (the reference it
        must equal). `calibrate`: subtract each label's score for the content-free input
        "N/A" (contextual calibration, Zhao et al. 2021)."""
        label_ids = self._label_ids(labels)
        prefix_ids = self.ids(prefix)
        rows = [*queries, "N/A"] if calibrate else list(queries)
        segments = [Segment(self.ids(self.template.query.format(text=q)), label_ids) for q in rows]
        out = self._run(prefix_ids, segments, use_cache, cache)
        return out[:-1] - out[-1] if calibrate else out

    @torch.no_grad()
    def score_channel(
        self,
        prefix: str,
        queries: Sequence[str],
        labels: Sequence[str],
        use_cache: bool = True,
        cache: object = None,
    ) -> Tensor:
        """`channel` scores, shape [len(queries), len(labels)]: mean log P(query | label)
        after a prefix built with the scorer's template (Min et al. 2022), whose `query`
        names the `{label}` (as `CHANNEL_TEMPLATE`); the cache is reused as in `score`."""
        if "{label}" not in self.template.query:
            raise MetalmError(
                "channel scoring writes the label before the query: build the PromptScorer "
                "with a template whose query contains {label} (e.g. CHANNEL_TEMPLATE)"
            )
        prefix_ids = self.ids(prefix)
        targets = [self.ids(self.template.label_prefix + q) for q in queries]
        if any(not ids for ids in targets):
            raise MetalmError("every query needs at least one token")
        segments = [
            Segment(self.ids(self.template.query.format(label=label)), targets) for label in labels
        ]
        return self._run(prefix_ids, segments, use_cache, cache).T.contiguous()

    def _run(
        self, prefix_ids: list[int], segments: list[Segment], use_cache: bool, cache: object
    ) -> Tensor:
        if not segments:
            return torch.empty(0, 0)
        if use_cache:
            cache = cache if cache is not None else self.prefix_cache(prefix_ids)
            rows = self.target_logprobs(prefix_ids, segments, cache)
        else:  # the prefix again for every segment: what the cache saves
            rows = [self.target_logprobs(prefix_ids, [s])[0] for s in segments]
        return torch.stack(rows).cpu()
