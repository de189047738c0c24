"""N-way K-shot episodes, sampled deterministically, and the full-way protocol."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from metalm.data.dataset import LabeledTextDataset
from metalm.errors import MetalmError


@dataclass(frozen=True)
class Episode:
    """One few-shot task. Texts stay strings until a learner collates them.

    Labels are 0..N-1; `label_names[i]` is the original name of label i.
    """

    support_texts: list[str]
    support_labels: list[int]
    query_texts: list[str]
    query_labels: list[int]
    label_names: list[str]

    @property
    def n_way(self) -> int:
        return len(self.label_names)


class EpisodeSampler:
    """N-way K-shot episodes with Q queries per class, from a dataset's classes.

    Episode `i` depends only on `(seed, i)`: the same on any machine and in any order.
    Support and query rows never overlap.

    Example:
        >>> from metalm.data import builtin_dataset
        >>> sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 5, seed=0)
        >>> ep = sampler.sample(0)
        >>> len(ep.support_texts), len(ep.query_texts)
        (5, 25)
    """

    def __init__(
        self,
        dataset: LabeledTextDataset,
        n_way: int,
        k_shot: int,
        q_queries: int,
        seed: int = 0,
        drop_small_classes: bool = False,
    ):
        for name, value, low in (
            ("n_way", n_way, 2),
            ("k_shot", k_shot, 1),
            ("q_queries", q_queries, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise MetalmError(f"{name} must be an integer >= {low}, got {value!r}")
        needed = k_shot + q_queries
        if drop_small_classes:
            dataset, dropped = dataset.drop_small_classes(needed)
            if dropped:
                warnings.warn(
                    f"{dataset.name}: dropped {len(dropped)} classes with fewer than "
                    f"{needed} examples (K+Q): {dropped[:5]}",
                    stacklevel=2,
                )
        else:
            small = {c: n for c, n in dataset.class_counts().items() if n < needed}
            if small:
                first = next(iter(small))
                raise MetalmError(
                    f"{dataset.name}: class {first!r} has {small[first]} examples but "
                    f"{k_shot}-shot with {q_queries} queries needs {needed} "
                    f"({len(small)} classes are short); lower K or Q, or set "
                    "data.drop_small_classes=true"
                )
        if n_way > len(dataset.classes):
            raise MetalmError(
                f"{dataset.name}: {n_way}-way episodes need {n_way} classes but it has "
                f"{len(dataset.classes)}; lower n_way"
            )
        self.dataset = dataset
        self.n_way, self.k_shot, self.q_queries, self.seed = n_way, k_shot, q_queries, seed
        self._classes = dataset.classes
        self._rows = dataset.by_class()

    def sample(self, index: int) -> Episode:
        """Episode number `index` (any non-negative integer)."""
        rng = np.random.default_rng([self.seed, index])
        chosen = rng.choice(len(self._classes), size=self.n_way, replace=False)
        support_texts, support_labels, query_texts, query_labels = [], [], [], []
        names = []
        for label, class_index in enumerate(chosen):
            name = self._classes[int(class_index)]
            names.append(name)
            rows = self._rows[name]
            picked = rng.choice(len(rows), size=self.k_shot + self.q_queries, replace=False)
            texts = [self.dataset.texts[rows[int(i)]] for i in picked]
            support_texts += texts[: self.k_shot]
            support_labels += [label] * self.k_shot
            query_texts += texts[self.k_shot :]
            query_labels += [label] * self.q_queries
        return Episode(support_texts, support_labels, query_texts, query_labels, names)

    def __iter__(self):
        index = 0
        while True:
            yield self.sample(index)
            index += 1


def full_way_episode(support: LabeledTextDataset, query: LabeledTextDataset) -> Episode:
    """The published protocol: every class's K-shot split as support, a whole split as query.

    Example:
        >>> from metalm.data import builtin_dataset
        >>> ep = full_way_episode(builtin_dataset("banking77", "train_5"),
        ...                       builtin_dataset("banking77", "test"))
        >>> ep.n_way, len(ep.support_texts), len(ep.query_texts)
        (77, 385, 3080)
    """
    names = support.classes
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(query.labels) - set(names))
    if unknown:
        raise MetalmError(
            f"{query.name}: labels {unknown[:5]} have no support examples in {support.name}"
        )
    return Episode(
        list(support.texts),
        [index[label] for label in support.labels],
        list(query.texts),
        [index[label] for label in query.labels],
        names,
    )
