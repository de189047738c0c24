"""N-way K-shot episodes, sampled deterministically, and the full-way protocol."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from metalm.data.dataset import LabeledTextDataset
from metalm.errors import MetalmError

Embed = Callable[[Sequence[str]], torch.Tensor]
"""Texts in, embeddings out: the current encoder (`TextEncoder.embed`)."""


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


WaySpec = int | str | Sequence[int]
ShotSpec = int | Sequence[int]


class SettingNames(NamedTuple):
    """The config keys an episode shape came from, named in errors (what to lower)."""

    n_way: str = "n_way"
    k_shot: str = "k_shot"
    q_queries: str = "q_queries"


PLAIN_SETTINGS = SettingNames()
EPISODE_SETTINGS = SettingNames("episode.n_way", "episode.k_shot", "episode.q_queries")
"""The keys of meta-training episodes (`episode.*`)."""


def _range(name: str, value: Any, low: int) -> tuple[int, int]:
    """A fixed size `n` or a `[min, max]` range, as (min, max)."""
    if isinstance(value, int) and not isinstance(value, bool):
        bounds = (value, value)
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        bounds = (int(value[0]), int(value[1]))
    else:
        raise MetalmError(
            f"{name} must be an integer >= {low}, got {value!r} (or give a range [min, max])"
        )
    if bounds[0] < low:
        raise MetalmError(f"{name} must be an integer >= {low}, got {value!r}")
    if bounds[0] > bounds[1]:
        raise MetalmError(f"{name}: a range [min, max] needs min <= max, got {value!r}")
    return bounds


class TaskSampler(ABC):
    """A source of episodes for meta-training and validation: `sample(index)` is episode
    number `index`, the same every time it is asked. Samplers computed from the current
    encoder (hard negatives, cluster tasks) refresh in `on_step`, which the trainer
    calls before every step, and keep what they computed in checkpoints through
    `state_dict` / `load_state_dict`; the others keep these defaults.

    Example:
        >>> from metalm.data import builtin_dataset
        >>> sampler = EpisodeSampler(builtin_dataset("clinc150", "train"), 5, 1, 1, seed=0)
        >>> isinstance(sampler, TaskSampler), sampler.sample(3) == sampler.sample(3)
        (True, True)
    """

    @abstractmethod
    def sample(self, index: int) -> Episode:
        """Episode number `index`."""

    def on_step(self, step: int, embed: Embed) -> None:  # noqa: B027  (nothing to refresh)
        """Refresh what is computed from the encoder (`embed`: texts to embeddings)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What `on_step` computed, for checkpoints ({} when nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Restore `state_dict`'s tensors (nothing by default)."""


class EpisodeSampler(TaskSampler):
    """N-way K-shot episodes with Q queries per class, from a dataset's classes.

    Episode `i` depends only on `(seed, i)`: the same on any machine and in any order.
    Support and query rows never overlap.

    `n_way` is a number, `"all"` (every class in every episode) or a range `[min, max]`
    drawn per episode (capped at the number of classes); `k_shot` a number or a range.
    With `hard_negatives > 0`, that share of episodes is an anchor class and classes
    among its nearest (by centroid cosine); the neighbours come from `refresh(embed)`,
    which the trainer calls every `refresh_every` steps with the current encoder
    (see `on_step`); until then every episode is drawn at random.

    Example:
        >>> from metalm.data import builtin_dataset
        >>> sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 1, 5, seed=0)
        >>> ep = sampler.sample(0)
        >>> len(ep.support_texts), len(ep.query_texts)
        (5, 25)
        >>> EpisodeSampler(builtin_dataset("banking77", "test"), "all", [1, 3], 2).sample(0).n_way
        77
    """

    def __init__(
        self,
        dataset: LabeledTextDataset,
        n_way: WaySpec,
        k_shot: ShotSpec,
        q_queries: int,
        seed: int = 0,
        drop_small_classes: bool = False,
        hard_negatives: float = 0.0,
        refresh_every: int = 100,
        names: SettingNames = PLAIN_SETTINGS,
    ):
        ways = None if n_way == "all" else _range("n_way", n_way, 2)
        self.k_range = _range("k_shot", k_shot, 1)
        _range("q_queries", q_queries, 1)
        if not 0.0 <= hard_negatives <= 1.0:
            raise MetalmError(f"hard_negatives must be a share in [0, 1], got {hard_negatives}")
        if refresh_every < 1:
            raise MetalmError(f"hard_refresh_every must be >= 1, got {refresh_every}")
        lower = f"lower {names.q_queries} ({q_queries}) or {names.k_shot} ({self.k_range[1]})"
        dataset, dropped = _large_enough(
            dataset, self.k_range[1], q_queries, drop_small_classes, lower
        )
        classes = len(dataset.classes)
        if ways is None:
            ways = (classes, classes)
        elif ways[0] != ways[1]:  # a range is capped at the classes there are
            ways = (min(ways[0], classes), min(ways[1], classes))
        if ways[1] > classes or classes < 2:
            raise MetalmError(
                f"{dataset.name}: {ways[1]}-way episodes need {ways[1]} classes but it has "
                f"{classes}; lower {names.n_way}"
                + (f", or {lower} so that fewer classes are dropped" if dropped else "")
            )
        self.dataset = dataset
        self.n_range = ways
        self.q_queries, self.seed = q_queries, seed
        self.hard_negatives, self.refresh_every = hard_negatives, refresh_every
        self._classes = dataset.classes
        self._rows = dataset.by_class()
        self.neighbours: np.ndarray | None = None  # [C, C-1] class indices, nearest first

    @property
    def n_way(self) -> int:
        """The largest way of an episode."""
        return self.n_range[1]

    @property
    def k_shot(self) -> int:
        """The largest shot of an episode."""
        return self.k_range[1]

    def sample(self, index: int) -> Episode:
        """Episode number `index` (any non-negative integer)."""
        if index < 0:
            raise MetalmError(f"an episode index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        n_way = self._draw(rng, self.n_range)
        k_shot = self._draw(rng, self.k_range)
        if (
            self.hard_negatives
            and self.neighbours is not None
            and (rng.random() < self.hard_negatives)
        ):
            chosen = self._hard_classes(rng, n_way)
        else:
            chosen = rng.choice(len(self._classes), size=n_way, replace=False)
        support_texts, support_labels, query_texts, query_labels = [], [], [], []
        names = []
        for label, class_index in enumerate(chosen):
            name = self._classes[int(class_index)]
            names.append(name)
            rows = self._rows[name]
            picked = rng.choice(len(rows), size=k_shot + self.q_queries, replace=False)
            texts = [self.dataset.texts[rows[int(i)]] for i in picked]
            support_texts += texts[:k_shot]
            support_labels += [label] * k_shot
            query_texts += texts[k_shot:]
            query_labels += [label] * self.q_queries
        return Episode(support_texts, support_labels, query_texts, query_labels, names)

    @staticmethod
    def _draw(rng: np.random.Generator, bounds: tuple[int, int]) -> int:
        # a fixed size draws nothing, so fixed-shape episodes stay as they always were
        return bounds[0] if bounds[0] == bounds[1] else int(rng.integers(bounds[0], bounds[1] + 1))

    def _hard_classes(self, rng: np.random.Generator, n_way: int) -> np.ndarray:
        """An anchor class and `n_way - 1` classes drawn among its `2(n_way - 1)` nearest."""
        assert self.neighbours is not None
        anchor = int(rng.integers(len(self._classes)))
        nearest = self.neighbours[anchor][: 2 * (n_way - 1)]
        others = rng.choice(nearest, size=n_way - 1, replace=False)
        return rng.permutation(np.concatenate([[anchor], others]))

    # -- hard negatives: refreshed from the current encoder ------------------------------
    def on_step(self, step: int, embed: Embed) -> None:
        """Called by the trainer before each step: refresh the neighbours every
        `refresh_every` steps (and whenever there are none yet)."""
        if self.hard_negatives and (self.neighbours is None or step % self.refresh_every == 0):
            self.refresh(embed, step)

    def refresh(self, embed: Embed, step: int = 0, per_class: int = 32) -> None:
        """Class centroids of up to `per_class` texts each (drawn with `(seed, step)`)
        under `embed`, and each class's other classes ordered nearest first."""
        rng = np.random.default_rng([self.seed, step, 2])
        texts, owners = [], []
        for c, name in enumerate(self._classes):
            rows = self._rows[name]
            picked = rng.choice(len(rows), size=min(per_class, len(rows)), replace=False)
            texts += [self.dataset.texts[rows[int(i)]] for i in picked]
            owners += [c] * len(picked)
        vectors = torch.nn.functional.normalize(embed(texts).float().cpu(), dim=-1)
        index = torch.as_tensor(owners)
        centroids = torch.zeros(len(self._classes), vectors.shape[1]).index_add_(0, index, vectors)
        centroids = torch.nn.functional.normalize(centroids, dim=-1)
        similarity = centroids @ centroids.T
        similarity.fill_diagonal_(-float("inf"))
        order = similarity.argsort(dim=1, descending=True, stable=True)[:, :-1]
        self.neighbours = order.numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What `refresh` computed (saved in checkpoints so a resumed run goes on alike)."""
        if self.neighbours is None:
            return {}
        return {"neighbours": torch.from_numpy(np.ascontiguousarray(self.neighbours))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "neighbours" in state:
            self.neighbours = state["neighbours"].numpy()

    def __iter__(self):
        index = 0
        while True:
            yield self.sample(index)
            index += 1


def _large_enough(
    dataset: LabeledTextDataset, k_shot: int, q_queries: int, drop_small: bool, lower: str
) -> tuple[LabeledTextDataset, list[str]]:
    """`dataset` with every class holding K + Q examples (small classes dropped with a
    warning when `drop_small`, else an error), and the dropped classes; errors end with
    `lower`, the settings to lower."""
    needed = k_shot + q_queries
    counts = dataset.class_counts()
    small = {c: n for c, n in counts.items() if n < needed}
    if small and (not drop_small or len(small) == len(counts)):
        first = next(iter(small))
        short = f"{len(small)} classes are short"
        if len(small) == len(counts):
            short += f": every class has fewer than {needed} examples"
        else:
            lower += ", or set data.drop_small_classes=true"
        raise MetalmError(
            f"{dataset.name}: class {first!r} has {small[first]} examples but {k_shot}-shot "
            f"with {q_queries} queries needs {needed} ({short}); {lower}"
        )
    if not small:
        return dataset, []
    kept, dropped = dataset.drop_small_classes(needed)
    warnings.warn(
        f"{kept.name}: dropped {len(dropped)} classes with fewer than {needed} examples "
        f"(K+Q): {dropped[:5]}",
        stacklevel=3,
    )
    return kept, dropped


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
    unused = sorted(set(names) - set(query.labels))
    if unknown or unused:
        sides = []
        if unknown:
            sides.append(f"labels {_few(unknown)} have no support examples in {support.name}")
        if unused:
            sides.append(f"labels {_few(unused)} have no query texts in {query.name}")
        raise MetalmError(
            f"{query.name}: {'; '.join(sides)}; the support and query sources must have "
            "the same label set"
        )
    return Episode(
        list(support.texts),
        [index[label] for label in support.labels],
        list(query.texts),
        [index[label] for label in query.labels],
        names,
    )


def _few(names: list[str], limit: int = 10) -> str:
    """`names` for an error message: the first `limit`, and how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"
