"""From a data config to class-disjoint task pools and the full-way protocol."""

from __future__ import annotations

from dataclasses import dataclass, field

from metalm.config import DataConfig, EpisodeConfig, TrainConfig
from metalm.data.dataset import LabeledTextDataset
from metalm.data.episodes import Episode, EpisodeSampler, full_way_episode
from metalm.data.splits import ClassSplit, explicit_split, split_classes
from metalm.errors import MetalmError


@dataclass
class TaskPools:
    """The texts each phase draws its tasks from; their classes never overlap
    (unless the test pool comes from another dataset)."""

    split: ClassSplit
    train: LabeledTextDataset
    val: LabeledTextDataset | None
    test: LabeledTextDataset
    test_source_name: str
    full_way: dict[int, Episode] = field(default_factory=dict)

    def sampler(self, pool: str, episode: EpisodeConfig, seed: int, drop_small: bool = False):
        dataset = getattr(self, pool)
        if dataset is None:
            raise MetalmError(
                f"no {pool} classes; set data.classes.fractions or data.classes.{pool}"
            )
        return EpisodeSampler(
            dataset, episode.n_way, episode.k_shot, episode.q_queries, seed, drop_small
        )


def validation_sampler(
    pools: TaskPools, train: TrainConfig, seed: int, drop_small: bool = False
) -> EpisodeSampler | None:
    """Episodes of the meta-val classes, shaped by `train.val_*` (None without val classes)."""
    if pools.val is None:
        return None
    n_way = min(train.val_n_way, len(pools.val.classes))
    shape = EpisodeConfig(n_way, train.val_k_shot, train.val_q_queries)
    return pools.sampler("val", shape, seed, drop_small)


def build_pools(data: DataConfig, full_way_shots: list[int] | None = None) -> TaskPools:
    """Load the sources, split the classes, and prepare the full-way episodes.

    Example:
        >>> pools = build_pools(DataConfig())          # CLINC150 -> BANKING77
        >>> len(pools.test.classes), sorted(pools.full_way)
        (77, [])
    """
    train_source = data.train.load()
    test_spec = data.test or data.train.with_split("test")
    cross = test_spec.source != data.train.source
    classes = data.classes
    if classes.train or classes.val or classes.test:
        test_names = classes.test if not cross else []
        split = explicit_split(train_source.classes, classes.train, classes.val, test_names)
    else:
        fractions = list(classes.fractions)
        if cross and len(fractions) == 3:  # the other dataset is the test set
            total = fractions[0] + fractions[1]
            fractions = [fractions[0] / total, fractions[1] / total, 0.0] if total else fractions
        split = split_classes(train_source.classes, fractions, classes.seed)
    if not split.train:
        raise MetalmError("no meta-train classes; raise data.classes.fractions[0]")
    val_source = data.val.load() if data.val else train_source
    test_source = test_spec.load()
    test_pool = test_source if cross else _restrict(test_source, split.test, "test")
    full_way = {}
    for shots in full_way_shots or []:
        support_spec = test_spec.with_split(f"train_{shots}")
        if not (support_spec.is_builtin or support_spec.source.startswith("hf:")):
            continue
        support = support_spec.load()
        if not cross:
            support = _restrict(support, split.test, "test")
        full_way[shots] = full_way_episode(support, test_pool)
    return TaskPools(
        split=split,
        train=train_source.subset(split.train, f"{train_source.name}[meta-train]"),
        val=val_source.subset(split.val, f"{val_source.name}[meta-val]") if split.val else None,
        test=test_pool,
        test_source_name=test_source.name,
        full_way=full_way,
    )


def _restrict(dataset: LabeledTextDataset, classes: list[str], part: str) -> LabeledTextDataset:
    if not classes:
        raise MetalmError(
            f"no meta-{part} classes in {dataset.name}; give data.classes.fractions a "
            f"non-zero {part} share, or set data.test to another dataset"
        )
    return dataset.subset(classes, f"{dataset.name}[meta-{part}]")
