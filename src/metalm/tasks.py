"""From a data config to class-disjoint task pools, meta-training task mixtures and the
full-way protocol."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from metalm.config import DataConfig, EpisodeConfig, TrainConfig
from metalm.data.dataset import LabeledTextDataset
from metalm.data.episodes import (
    EPISODE_SETTINGS,
    Episode,
    EpisodeSampler,
    SettingNames,
    full_way_episode,
)
from metalm.data.mixture import mixture
from metalm.data.overlap import ClassOverlap, class_overlap, overlapping_train_classes
from metalm.data.sources import DataSource, EvalSource
from metalm.data.splits import ClassSplit, explicit_split, split_classes
from metalm.data.unlabeled import (
    ClusterTaskSampler,
    InstanceTaskSampler,
    NeighbourTaskSampler,
    UnlabeledConfig,
    load_texts,
)
from metalm.errors import MetalmError

# seeds of the second, third, ... training source: episode i of each source differs
SOURCE_SEED_STRIDE = 7919
UNLABELED_SEED_STRIDE = 104729  # the j-th unlabeled source: seed + j * stride (0 for one)
VAL_SETTINGS = SettingNames("train.val_n_way", "train.val_k_shot", "train.val_q_queries")


@dataclass
class TaskPools:
    """The texts each phase draws its tasks from; their classes never overlap
    (unless the test pool comes from another dataset).

    `train_parts`/`val_parts` hold each labeled training source's meta-train and meta-val
    classes (with its weight); `train`/`val` are the first source's. `unlabeled` holds each
    source of texts without labels (`data.unlabeled`), with its texts. `removed_overlap`:
    what a strict split (`data.classes.strict`) took out of meta-training, and why.
    """

    split: ClassSplit
    train: LabeledTextDataset | None
    val: LabeledTextDataset | None
    test: LabeledTextDataset | None
    test_source_name: str
    full_way: dict[int, Episode] = field(default_factory=dict)
    train_parts: list[tuple[LabeledTextDataset, float]] = field(default_factory=list)
    val_parts: list[LabeledTextDataset] = field(default_factory=list)
    unlabeled: list[tuple[UnlabeledConfig, list[str]]] = field(default_factory=list)
    removed_overlap: list[ClassOverlap] = field(default_factory=list)

    def sampler(self, pool: str, episode: EpisodeConfig, seed: int, drop_small: bool = False):
        """Plain N-way K-shot episodes of one pool (`train`, `val` or `test`)."""
        dataset = getattr(self, pool)
        if dataset is None:
            raise MetalmError(
                f"no {pool} classes; set data.classes.fractions or data.classes.{pool}"
            )
        return EpisodeSampler(
            dataset,
            episode.n_way,
            episode.k_shot,
            episode.q_queries,
            seed,
            drop_small,
            names=EPISODE_SETTINGS,
        )

    def train_sampler(self, episode: EpisodeConfig, seed: int, drop_small: bool = False) -> Any:
        """Meta-training episodes: every labeled source (episodes shaped by `episode`,
        hard negatives included) and the unlabeled tasks, mixed by weight."""
        parts = list(self.train_parts)
        if not parts and self.train is not None:
            parts = [(self.train, 1.0)]
        samplers: list[Any] = [
            EpisodeSampler(
                dataset,
                episode.n_way,
                episode.k_shot,
                episode.q_queries,
                seed + SOURCE_SEED_STRIDE * j,
                drop_small,
                episode.hard_negatives,
                episode.hard_refresh_every,
                names=EPISODE_SETTINGS,
            )
            for j, (dataset, _) in enumerate(parts)
        ]
        weights = [weight for _, weight in parts]
        for j, (config, texts) in enumerate(self.unlabeled):
            extra, extra_weights = unlabeled_samplers(
                texts, config, seed + UNLABELED_SEED_STRIDE * j
            )
            samplers += extra
            weights += extra_weights
        return mixture(samplers, weights, seed)


def unlabeled_samplers(
    texts: list[str], config: UnlabeledConfig, seed: int
) -> tuple[list[Any], list[float]]:
    """The instance, neighbour and/or cluster task samplers of `config`, with their
    weights (`config.weight` shared equally)."""
    samplers: list[Any] = []
    kinds = config.task_kinds
    for kind in kinds:
        if kind == "neighbours":
            samplers.append(
                NeighbourTaskSampler(
                    texts,
                    config.n_way,
                    config.neighbours,
                    seed + 3,
                    config.refresh_every,
                    config.max_texts,
                    config.augment,
                    config.word_dropout,
                )
            )
        elif kind == "instance":
            samplers.append(
                InstanceTaskSampler(
                    texts, config.n_way, seed + 1, config.augment, config.word_dropout
                )
            )
        else:
            samplers.append(
                ClusterTaskSampler(
                    texts,
                    config.clusters,
                    config.n_way,
                    config.k_shot,
                    config.q_queries,
                    seed + 2,
                    config.refresh_every,
                    config.max_texts,
                )
            )
    return samplers, [config.weight / len(kinds)] * len(kinds)


def validation_sampler(
    pools: TaskPools, train: TrainConfig, seed: int, drop_small: bool = False
) -> Any:
    """Episodes of the meta-val classes, shaped by `train.val_*` (None without val
    classes); with several labeled sources, each source's in turn (equal weights)."""
    parts = pools.val_parts or ([pools.val] if pools.val is not None else [])
    samplers = [
        EpisodeSampler(
            dataset,
            min(train.val_n_way, len(dataset.classes)),
            train.val_k_shot,
            train.val_q_queries,
            seed + SOURCE_SEED_STRIDE * j,
            drop_small,
            names=VAL_SETTINGS,
        )
        for j, dataset in enumerate(parts)
    ]
    return mixture(samplers, [1.0] * len(samplers), seed) if samplers else None


def _split(data: DataConfig, source: LabeledTextDataset, cross: bool) -> ClassSplit:
    classes = data.classes
    if classes.train or classes.val or classes.test:
        known = set(source.classes)
        if len(data.train_sources) > 1:  # each source takes the listed classes it has
            pick = [
                [c for c in names if c in known]
                for names in (classes.train, classes.val, classes.test)
            ]
        else:
            pick = [classes.train, classes.val, classes.test]
        return explicit_split(source.classes, pick[0], pick[1], pick[2] if not cross else [])
    fractions = list(classes.fractions)
    if cross and len(fractions) == 3:  # the other dataset is the test set
        total = fractions[0] + fractions[1]
        fractions = [fractions[0] / total, fractions[1] / total, 0.0] if total else fractions
    return split_classes(source.classes, fractions, classes.seed)


def build_pools(data: DataConfig, full_way_shots: list[int] | None = None) -> TaskPools:
    """Load the sources, split each one's classes, and prepare the full-way episodes.

    Example:
        >>> pools = build_pools(DataConfig())          # CLINC150 -> BANKING77
        >>> len(pools.test.classes), sorted(pools.full_way)
        (77, [])
    """
    sources = data.train_sources
    test_spec = _query_spec(data.test) or (sources[0].with_split("test") if sources else None)
    home = [j for j, s in enumerate(sources) if test_spec and s.source == test_spec.source]
    cross = not home
    loaded = [spec.load() for spec in sources]
    splits = [_split(data, dataset, cross or j not in home) for j, dataset in enumerate(loaded)]
    _check_listed_classes(data, loaded)
    if sources and not any(split.train for split in splits):
        raise MetalmError("no meta-train classes; raise data.classes.fractions[0]")
    # the test classes are those of the first source that is also the test dataset
    split = splits[home[0]] if home else (splits[0] if splits else ClassSplit([], [], []))
    test_source = test_spec.load() if test_spec else None
    test_pool = test_source if cross else _restrict(test_source, split.test, "test")
    overlap: list[ClassOverlap] = []
    if data.classes.strict and test_pool is not None:
        splits, overlap = _strict(splits, test_pool.classes, data.classes.name_similarity)
        split = splits[home[0]] if home else splits[0]
    val_source = data.val.load() if data.val else None
    train_parts, val_parts = [], []
    for spec, dataset, part in zip(sources, loaded, splits, strict=True):
        if part.train:
            name = f"{dataset.name}[meta-train]"
            train_parts.append((dataset.subset(part.train, name), spec.weight))
        if part.val:
            pool = val_source or dataset
            val_parts.append(pool.subset(part.val, f"{pool.name}[meta-val]"))
    full_way = _full_way(data, test_spec, test_pool, full_way_shots or [], split, cross)
    unlabeled = []
    for source in data.unlabeled_sources:
        texts = load_texts(source)
        if test_pool is not None:
            _warn_overlap(texts, test_pool, source)
        unlabeled.append((source, texts))
    return TaskPools(
        split=split,
        train=train_parts[0][0] if train_parts else None,
        val=val_parts[0] if val_parts else None,
        test=test_pool,
        test_source_name=test_source.name if test_source else "",
        full_way=full_way,
        train_parts=train_parts,
        val_parts=val_parts,
        unlabeled=unlabeled,
        removed_overlap=overlap,
    )


def _strict(
    splits: list[ClassSplit], test_classes: list[str], similarity: float | None
) -> tuple[list[ClassSplit], list[ClassOverlap]]:
    """Each source's split without the meta-train/meta-val classes that overlap a test
    class (`data.classes.strict`), and the overlaps that were removed."""
    seen = sorted({c for part in splits for c in part.train + part.val})
    overlap = class_overlap(seen, test_classes, similarity)
    removed = set(overlapping_train_classes(overlap))
    kept = [
        ClassSplit(
            [c for c in part.train if c not in removed],
            [c for c in part.val if c not in removed],
            part.test,
        )
        for part in splits
    ]
    if not any(part.train for part in kept):
        raise MetalmError(
            f"data.classes.strict removes every meta-train class ({len(removed)} overlap the "
            "test classes); meta-train on another dataset, or set data.classes.strict=false"
        )
    return kept, overlap


def pools_overlap(pools: TaskPools, similarity: float | None) -> list[ClassOverlap]:
    """The (near-)name overlaps between the meta-train/meta-val classes `pools` kept and
    its test classes (empty after a strict split)."""
    if pools.test is None:
        return []
    seen = sorted(
        {c for dataset, _ in pools.train_parts for c in dataset.classes}
        | {c for dataset in pools.val_parts for c in dataset.classes}
    )
    return class_overlap(seen, pools.test.classes, similarity)


def _query_spec(test: DataSource | None) -> DataSource | None:
    """Where the test texts come from (`data.test.query`, else `data.test` itself)."""
    return test.query_source() if isinstance(test, EvalSource) else test


def _full_way(
    data: DataConfig,
    test_spec: DataSource | None,
    test_pool: LabeledTextDataset | None,
    shots: list[int],
    split: ClassSplit,
    cross: bool,
) -> dict[int, Episode]:
    """The full-way episodes, by shot: from `data.test.support` if given, else from the
    test dataset's K-shot splits (`train_K`; built-in and `hf:` sources only)."""
    if test_spec is None or test_pool is None:
        return {}
    own = data.test.support if isinstance(data.test, EvalSource) else None
    if isinstance(own, DataSource):
        return _own_full_way(own.load(), test_pool, None if cross else split.test)
    full_way = {}
    for k in shots:
        support_spec = test_spec.with_split(f"train_{k}")
        if not (support_spec.is_builtin or support_spec.source.startswith("hf:")):
            continue
        support = support_spec.load()
        if not cross:
            support = _restrict(support, split.test, "test")
        full_way[k] = full_way_episode(support, test_pool)
    return full_way


def _own_full_way(
    support: LabeledTextDataset, query: LabeledTextDataset, classes: list[str] | None
) -> dict[int, Episode]:
    """One full-way episode from a support file of your own (restricted to the meta-test
    `classes` when the queries are a training source's), keyed by its examples per class
    (rounded down, as reports count K)."""
    if classes is not None:
        support = support.subset([c for c in support.classes if c in set(classes)])
    episode = full_way_episode(support, query)
    return {len(support) // episode.n_way: episode}


def _check_listed_classes(data: DataConfig, loaded: list[LabeledTextDataset]) -> None:
    """With several sources, every explicitly listed class must exist in one of them."""
    if len(loaded) < 2:
        return
    known = set().union(*(set(d.classes) for d in loaded))
    listed = set(data.classes.train) | set(data.classes.val) | set(data.classes.test)
    unknown = sorted(listed - known)
    if unknown:
        raise MetalmError(f"data.classes: {unknown[:5]} are in none of the training sources")


def _warn_overlap(texts: list[str], test_pool: LabeledTextDataset, config: UnlabeledConfig) -> None:
    shared = set(texts) & set(test_pool.texts)
    if shared:
        warnings.warn(
            f"{config.source}: {len(shared)} of the {len(set(test_pool.texts))} test texts "
            f"of {test_pool.name} are also unlabeled texts, which meta-training sees "
            "(without labels)",
            stacklevel=3,
        )


def _restrict(dataset: Any, classes: list[str], part: str) -> LabeledTextDataset:
    if not classes:
        raise MetalmError(
            f"no meta-{part} classes in {dataset.name}; give data.classes.fractions a "
            f"non-zero {part} share, or set data.test to another dataset"
        )
    return dataset.subset(classes, f"{dataset.name}[meta-{part}]")


__all__ = ["TaskPools", "build_pools", "pools_overlap", "unlabeled_samplers", "validation_sampler"]
