"""Meta-training tasks from texts without labels.

* Instance tasks (SimCSE/UMTRA-style): N texts, each its own class; the support and
  query examples are two views of the same text, made by word dropout (and by the
  encoder's own dropout in learners that train it).
* Cluster tasks (CACTUs-style): k-means pseudo-classes over the current embeddings,
  re-clustered every `refresh_every` steps; episodes are drawn from the clusters as
  from labeled classes.
* Neighbour tasks (nearest-neighbour contrastive learning, as in CLNN): N anchor texts,
  each its own class, whose query is one of the anchor's `neighbours` nearest texts
  under the current embeddings (recomputed every `refresh_every` steps).

Example:
    >>> texts = [f"ticket number {i} about topic {i % 7}" for i in range(100)]
    >>> tasks = InstanceTaskSampler(texts, n_way=8, seed=0)
    >>> episode = tasks.sample(0)
    >>> episode.n_way, episode.support_labels == episode.query_labels
    (8, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from metalm.choices import check_choices
from metalm.data.dataset import (
    BUILTIN_DATASETS,
    LabeledTextDataset,
    _columns,
    builtin_dataset,
    check_hf_columns,
    load_hf_split,
    read_csv_rows,
    read_jsonl_rows,
    read_text_file,
)
from metalm.data.episodes import Embed, Episode, EpisodeSampler, TaskSampler
from metalm.errors import MetalmError

TASK_KINDS = ("cluster", "neighbours", "instance")
TEXTS_PER_CLUSTER = 30  # the default number of clusters: one per 30 texts


@dataclass
class UnlabeledConfig:
    """Texts without labels, mixed into meta-training as tasks.

    `source`: a `.txt` file (one text per line), a `.csv`/`.jsonl` file (`text_column`),
    a built-in dataset (its labels are not read) or `hf:<name or directory>`.
    `weight`: the share of meta-training episodes, beside each labeled source's weight.
    `tasks`: `cluster` (the default), `neighbours`, `instance`, or several joined by `+`
    (`cluster+neighbours`: the weight is shared equally).
    Cluster tasks are `n_way`-way `k_shot`-shot episodes over `clusters` k-means
    pseudo-classes (0: one per 30 texts), re-clustered every `refresh_every` steps.
    Neighbour tasks are `n_way` anchors, each with one of its `neighbours` nearest texts
    as query. Instance tasks are `n_way` texts, one view each in support and query.
    `augment` makes the views of instance and neighbour tasks (`words`: drop each word
    with probability `word_dropout`; `none`: the texts as they are, so for instance tasks
    only the encoder's dropout makes the views differ). At most `max_texts` texts are
    clustered or searched for neighbours.
    """

    source: str = ""
    split: str = "train"
    text_column: str = "text"
    hf_config: str | None = None
    weight: float = 1.0
    tasks: str = "cluster"
    n_way: int = 64
    k_shot: int = 1
    q_queries: int = 1
    clusters: int = 0
    neighbours: int = 10
    refresh_every: int = 100
    augment: Literal["words", "none"] = "words"
    word_dropout: float = 0.1
    max_texts: int = 20000

    def __post_init__(self) -> None:
        check_choices(self, "data.unlabeled")
        kinds = self.task_kinds
        if not kinds or any(k not in TASK_KINDS for k in kinds) or len(set(kinds)) < len(kinds):
            raise MetalmError(
                f"data.unlabeled.tasks must be one of {TASK_KINDS} or several joined by '+', "
                f"got {self.tasks!r}"
            )
        if not 0.0 <= self.word_dropout < 1.0:
            raise MetalmError(
                f"data.unlabeled.word_dropout must be in [0, 1), got {self.word_dropout}"
            )
        for name, low in (("n_way", 2), ("k_shot", 1), ("q_queries", 1), ("refresh_every", 1),
                          ("max_texts", 2), ("clusters", 0), ("neighbours", 1)):  # fmt: skip
            if getattr(self, name) < low:
                raise MetalmError(
                    f"data.unlabeled.{name} must be >= {low}, got {getattr(self, name)}"
                )
        if not self.weight > 0:
            raise MetalmError(f"data.unlabeled.weight must be > 0, got {self.weight}")

    @property
    def task_kinds(self) -> list[str]:
        """The kinds of task in `tasks`, e.g. `["cluster", "neighbours"]`."""
        return [kind.strip() for kind in self.tasks.split("+") if kind.strip()]


def load_texts(config: UnlabeledConfig) -> list[str]:
    """The distinct non-empty texts of `config.source` (blank ones are skipped with a
    warning); at least two are needed."""
    source = config.source
    if not source:
        raise MetalmError("data.unlabeled.source is empty; give a .txt/.csv/.jsonl file, "
                          "a built-in dataset or hf:<name>")  # fmt: skip
    if source.startswith("hf:"):
        loaded = load_hf_split(source[3:], config.split, config.hf_config)
        check_hf_columns(loaded, source, config.text_column)
        raw = list(loaded[config.text_column])
    elif source in BUILTIN_DATASETS:
        raw = list(builtin_dataset(source, config.split).texts)
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            (raw,) = _columns(read_csv_rows(path), path, config.text_column)
        elif suffix in (".jsonl", ".json"):
            (raw,) = _columns(read_jsonl_rows(path), path, config.text_column)
        elif suffix in (".txt", ""):
            raw = read_text_file(path).splitlines()
        else:
            raise MetalmError(
                f"unknown unlabeled source {source!r}; give a .txt (one text per line), "
                ".csv or .jsonl file, a built-in name or hf:<name or directory>"
            )
    texts = [t for t in raw if isinstance(t, str) and t.strip()]
    if len(texts) < len(raw):
        warnings.warn(f"{source}: skipped {len(raw) - len(texts)} empty texts", stacklevel=2)
    texts = list(dict.fromkeys(texts))
    if len(texts) < 2:
        raise MetalmError(f"{source}: {len(texts)} distinct non-empty texts; give at least 2")
    return texts


def word_dropout(text: str, rng: np.random.Generator, p: float) -> str:
    """`text` with each word dropped with probability `p` (at least one word is kept)."""
    words = text.split()
    if p == 0 or len(words) < 2:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


class InstanceTaskSampler(TaskSampler):
    """Instance-discrimination episodes: `n_way` texts, each its own class, with one
    augmented view in the support and another in the query. Deterministic in
    `(seed, index)`."""

    def __init__(
        self,
        texts: Sequence[str],
        n_way: int = 32,
        seed: int = 0,
        augment: str = "words",
        dropout: float = 0.1,
    ):
        if n_way > len(texts):
            raise MetalmError(f"instance tasks: {n_way}-way needs {n_way} texts, "
                              f"got {len(texts)}; lower data.unlabeled.n_way")  # fmt: skip
        self.texts, self.n_way, self.seed = list(texts), n_way, seed
        self.dropout = dropout if augment == "words" else 0.0

    def sample(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, index, 3])
        picked = [int(i) for i in rng.choice(len(self.texts), size=self.n_way, replace=False)]
        originals = [self.texts[i] for i in picked]
        support = [word_dropout(t, rng, self.dropout) for t in originals]
        query = [word_dropout(t, rng, self.dropout) for t in originals]
        labels = list(range(self.n_way))
        return Episode(support, labels, query, list(labels), [f"unlabeled-{i}" for i in picked])


def kmeans(vectors: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding; the cluster of each row.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(50, 4), dim=-1)
        >>> kmeans(x, 3, seed=0).unique().numel()
        3
    """
    x = torch.nn.functional.normalize(vectors.detach().float().cpu(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    distance = (1 - x @ x[first]).clamp(min=0)
    for _ in range(1, k):
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        chosen = int(torch.multinomial(weights, 1, generator=generator))
        centres.append(x[chosen])
        distance = torch.minimum(distance, (1 - x @ x[chosen]).clamp(min=0))
    c = torch.stack(centres)
    assign = (x @ c.T).argmax(1)
    for _ in range(iterations):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        c = torch.where(empty[:, None], c, torch.nn.functional.normalize(sums, dim=-1))
        new = (x @ c.T).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def seeded_subset(texts: Sequence[str], max_texts: int, seed: int) -> list[str]:
    """`texts`, or a fixed seeded subset of `max_texts` of them (in their order)."""
    texts = list(texts)
    if len(texts) <= max_texts:
        return texts
    keep = np.random.default_rng([seed, 4]).choice(len(texts), max_texts, replace=False)
    return [texts[int(i)] for i in sorted(keep)]


def nearest_neighbours(vectors: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """The `k` nearest other rows of each row by cosine, nearest first: [n, k].

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> nearest_neighbours(x, 1).flatten().tolist()
        [1, 0, 1]
    """
    x = torch.nn.functional.normalize(vectors.detach().float().cpu(), dim=-1)
    k = min(k, len(x) - 1)
    out = []
    for start in range(0, len(x), chunk):
        similarity = x[start : start + chunk] @ x.T
        rows = torch.arange(start, min(start + chunk, len(x)))
        similarity[rows - start, rows] = -float("inf")  # not its own neighbour
        out.append(similarity.topk(k, dim=1).indices)
    return torch.cat(out)


class NeighbourTaskSampler(TaskSampler):
    """Episodes of `n_way` anchor texts, each its own class, whose query is one of the
    anchor's `neighbours` nearest texts under the current encoder (recomputed by
    `on_step` every `refresh_every` steps); support and query get the `augment` views.
    Episode `i` depends on `(seed, i)` and the neighbour table in effect."""

    def __init__(
        self,
        texts: Sequence[str],
        n_way: int = 64,
        neighbours: int = 10,
        seed: int = 0,
        refresh_every: int = 100,
        max_texts: int = 20000,
        augment: str = "words",
        dropout: float = 0.1,
    ):
        self.texts = seeded_subset(texts, max_texts, seed)
        if n_way > len(self.texts) or len(self.texts) < 2:
            raise MetalmError(f"neighbour tasks: {n_way}-way needs {n_way} texts, got "
                              f"{len(self.texts)}; lower data.unlabeled.n_way")  # fmt: skip
        self.n_way, self.neighbours, self.seed = n_way, neighbours, seed
        self.refresh_every = refresh_every
        self.dropout = dropout if augment == "words" else 0.0
        self.table: torch.Tensor | None = None

    def on_step(self, step: int, embed: Embed) -> None:
        if self.table is None or step % self.refresh_every == 0:
            self.refresh(embed)

    def refresh(self, embed: Embed) -> None:
        self.table = nearest_neighbours(embed(self.texts), self.neighbours)

    def sample(self, index: int) -> Episode:
        if self.table is None:
            raise MetalmError("neighbour tasks are drawn after the neighbours are found: "
                              "call on_step/refresh first")  # fmt: skip
        rng = np.random.default_rng([self.seed, index, 5])
        anchors = [int(i) for i in rng.choice(len(self.texts), size=self.n_way, replace=False)]
        picks = rng.integers(self.table.shape[1], size=self.n_way)
        partners = [int(self.table[a, int(j)]) for a, j in zip(anchors, picks, strict=True)]
        support = [word_dropout(self.texts[a], rng, self.dropout) for a in anchors]
        query = [word_dropout(self.texts[p], rng, self.dropout) for p in partners]
        labels = list(range(self.n_way))
        return Episode(support, labels, query, list(labels), [f"unlabeled-{a}" for a in anchors])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.table is None else {"neighbours": self.table.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "neighbours" in state:
            self.table = state["neighbours"].long()


class ClusterTaskSampler(TaskSampler):
    """Episodes over k-means pseudo-classes of unlabeled texts under the current encoder.

    `on_step(step, embed)` (called by the trainer) re-clusters every `refresh_every`
    steps; clusters smaller than K+Q are left out of episodes. Episode `i` depends on
    `(seed, i)` and the clustering in effect.
    """

    def __init__(
        self,
        texts: Sequence[str],
        clusters: int = 0,
        n_way: int = 32,
        k_shot: int = 1,
        q_queries: int = 1,
        seed: int = 0,
        refresh_every: int = 100,
        max_texts: int = 20000,
    ):
        texts = seeded_subset(texts, max_texts, seed)  # a fixed, seeded subset is clustered
        self.texts = texts
        self.clusters = clusters or max(2, len(texts) // TEXTS_PER_CLUSTER)
        if self.clusters > len(texts):
            raise MetalmError(f"cluster tasks: {self.clusters} clusters need as many texts, "
                              f"got {len(texts)}; lower data.unlabeled.clusters")  # fmt: skip
        self.n_way, self.k_shot, self.q_queries = n_way, k_shot, q_queries
        self.seed, self.refresh_every = seed, refresh_every
        self.assignments: torch.Tensor | None = None
        self._sampler: EpisodeSampler | None = None

    def on_step(self, step: int, embed: Embed) -> None:
        if self.assignments is None or step % self.refresh_every == 0:
            self.refresh(embed, step)

    def refresh(self, embed: Embed, step: int = 0) -> None:
        """Re-cluster the texts under `embed` (k-means seeded by `(seed, step)`)."""
        self.assignments = kmeans(embed(self.texts), self.clusters, seed=self.seed * 100003 + step)
        self._build()

    def _build(self) -> None:
        assert self.assignments is not None
        labels = [f"cluster-{int(c)}" for c in self.assignments]
        dataset = LabeledTextDataset(self.texts, labels, name="unlabeled[clusters]")
        big = [c for c, n in dataset.class_counts().items() if n >= self.k_shot + self.q_queries]
        dataset = dataset.subset(big) if len(big) >= 2 else dataset
        if len(big) < 2:
            raise MetalmError(
                "cluster tasks: fewer than 2 clusters have K+Q texts; lower "
                "data.unlabeled.clusters or k_shot/q_queries, or add texts"
            )
        n_way = min(self.n_way, len(dataset.classes))
        self._sampler = EpisodeSampler(dataset, n_way, self.k_shot, self.q_queries, self.seed)

    def sample(self, index: int) -> Episode:
        if self._sampler is None:
            raise MetalmError(
                "cluster tasks are drawn after clustering: call on_step/refresh first"
            )
        return self._sampler.sample(index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.assignments is None else {"assignments": self.assignments.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "assignments" in state:
            self.assignments = state["assignments"].long()
            self._build()
