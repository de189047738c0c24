"""`metalm.data.mixture`: task mixtures over several sources, each episode in one label
space."""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

import pytest
from learner_tools import toy_dataset

from metalm.config import load_config
from metalm.data import EpisodeSampler
from metalm.data.mixture import MixtureSampler, mixture
from metalm.errors import MetalmError
from metalm.tasks import build_pools


def _write_csv(path: Path, classes: int, per_class: int, prefix: str) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for c in range(classes):
            for i in range(per_class):
                writer.writerow([f"{prefix} text {i} of class {c}", f"{prefix}-{c}"])
    return path


def test_mixture_config_splits_each_source_and_keeps_episodes_in_one_label_space(tmp_path):
    other = _write_csv(tmp_path / "other.csv", classes=10, per_class=8, prefix="o")
    config = load_config(
        None,
        [
            f"data.train=[clinc150, {{source: {other}, weight: 3}}]",
            "data.classes.fractions=[0.6, 0.2, 0.2]",
            "episode.n_way=3",
            "episode.k_shot=2",
            "episode.q_queries=2",
        ],
    )
    pools = build_pools(config.data)
    (clinc, w1), (mine, w3) = pools.train_parts
    assert (w1, w3) == (1.0, 3.0)
    assert len(pools.val_parts) == 2
    for train_part, val_part in zip([clinc, mine], pools.val_parts, strict=True):
        assert train_part.classes and val_part.classes
        assert not set(train_part.classes) & set(val_part.classes)  # class-disjoint per source
    # the test set is another dataset (banking77): no source keeps a test share
    assert len(clinc.classes) + len(pools.val_parts[0].classes) == 150
    assert len(mine.classes) + len(pools.val_parts[1].classes) == 10

    sampler = pools.train_sampler(config.episode, seed=0)
    assert isinstance(sampler, MixtureSampler)
    sources = Counter()
    for i in range(800):
        episode = sampler.sample(i)
        names = set(episode.label_names)
        inside = [names <= set(part.classes) for part in (clinc, mine)]
        assert sum(inside) == 1, episode.label_names  # all classes from exactly one source
        sources[inside.index(True)] += 1
    # weights 1:3 -> a quarter of the episodes from CLINC150 (binomial sd ~ 0.015)
    assert abs(sources[0] / 800 - 0.25) < 0.06


def test_mixture_is_deterministic_in_seed_and_index():
    a = toy_dataset({f"a{i}": 6 for i in range(8)})
    b = toy_dataset({f"b{i}": 6 for i in range(5)})

    def build():
        return MixtureSampler(
            [EpisodeSampler(a, 3, 1, 2, seed=0), EpisodeSampler(b, 4, 1, 1, seed=1)], [1, 2], 7
        )

    first, second = build(), build()
    indices = list(range(60))
    forward = [first.sample(i) for i in indices]
    random.Random(0).shuffle(indices)
    for i in indices:
        assert second.sample(i) == forward[i]
    other_seed = MixtureSampler(second.samplers, [1, 2], seed=8)
    assert [other_seed.source_of(i) for i in range(60)] != [first.source_of(i) for i in range(60)]


def test_one_source_gives_the_same_episodes_as_before():
    config = load_config(None, ["episode.n_way=5", "episode.k_shot=1", "episode.q_queries=2"])
    pools = build_pools(config.data)
    sampler = pools.train_sampler(config.episode, seed=3)
    plain = EpisodeSampler(pools.train, 5, 1, 2, seed=3)
    assert isinstance(sampler, EpisodeSampler)  # no mixture wrapper for a single source
    assert [sampler.sample(i) for i in range(20)] == [plain.sample(i) for i in range(20)]
    assert mixture([plain], [5.0]) is plain


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=[]"], "empty list"),
        (["data.train=[clinc150, banking77]", "data.val={source: clinc150}"], "drop data.val"),
        (["data.train=[{source: clinc150, weight: 0}]"], "weight must be > 0"),
        (["data.train=[clinc150]", "data.train.3.weight=2"], "index it with data.train.0"),
    ],
)
def test_bad_mixture_configs(overrides, message):
    with pytest.raises(MetalmError, match=message):
        load_config(None, overrides)


def test_listed_classes_must_exist_in_some_source(tmp_path):
    other = _write_csv(tmp_path / "other.csv", classes=4, per_class=6, prefix="o")
    config = load_config(
        None,
        [f"data.train=[clinc150, {other}]", "data.classes.train=[o-0, o-1, balance, nope]"],
    )
    with pytest.raises(MetalmError, match="nope"):
        build_pools(config.data)
