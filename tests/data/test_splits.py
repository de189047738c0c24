"""`metalm.data.splits`: class-disjoint meta-train / meta-val / meta-test splits."""

from __future__ import annotations

import pytest
from learner_tools import cached_builtin

from metalm.data import (
    ClassSplit,
    EpisodeSampler,
    explicit_split,
    split_classes,
)
from metalm.errors import MetalmError

FRACTIONS = [(0.6, 0.2, 0.2), (0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (0.8, 0.1, 0.1)]


@pytest.mark.parametrize("fractions", FRACTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_split_classes_is_a_disjoint_partition(fractions, seed):
    classes = cached_builtin("clinc150", "train").classes
    split = split_classes(classes, fractions, seed=seed)
    parts = (split.train, split.val, split.test)
    n = len(classes)
    assert n == 150
    for a in range(3):
        assert len(set(parts[a])) == len(parts[a])  # no repeats within a part
        for b in range(a + 1, 3):
            assert not set(parts[a]) & set(parts[b])
    assert set().union(*map(set, parts)) == set(classes)
    assert sum(map(len, parts)) == n
    assert len(split.train) == round(fractions[0] * n)
    for part, fraction in zip(parts, fractions, strict=True):
        assert abs(len(part) - fraction * n) <= 1
    # same seed, same split (also from a shuffled, duplicated class list)
    assert split_classes(classes, fractions, seed=seed) == split
    noisy = list(reversed(classes)) + classes[:10]
    assert split_classes(noisy, fractions, seed=seed) == split


def test_split_classes_depends_on_seed():
    classes = cached_builtin("clinc150", "train").classes
    trains = {tuple(split_classes(classes, seed=seed).train) for seed in range(6)}
    assert len(trains) == 6


def test_episodes_from_a_split_stay_in_their_classes():
    ds = cached_builtin("clinc150", "train")
    split = split_classes(ds.classes, (0.6, 0.2, 0.2), seed=3)
    for part in (split.train, split.val, split.test):
        sampler = EpisodeSampler(ds.subset(part), 5, 1, 2, seed=0)
        for i in range(30):
            assert set(sampler.sample(i).label_names) <= set(part)


def test_explicit_split():
    classes = cached_builtin("banking77", "test").classes
    split = explicit_split(classes, classes[:50], classes[50:60], classes[60:])
    assert split == ClassSplit(classes[:50], classes[50:60], classes[60:])
    with pytest.raises(MetalmError, match="class split val: unknown classes"):
        explicit_split(classes, classes[:50], ["not_a_class"], classes[60:])
    with pytest.raises(MetalmError, match="in both train and test"):
        explicit_split(classes, classes[:50], classes[50:60], classes[49:])


@pytest.mark.parametrize(
    ("train", "val", "test", "pair"),
    [
        (["a", "b"], ["b", "c"], ["d"], "train and val"),
        (["a"], ["b"], ["c", "a"], "train and test"),
        (["a"], ["b", "c"], ["c"], "val and test"),
    ],
)
def test_class_split_rejects_shared_classes(train, val, test, pair):
    with pytest.raises(MetalmError, match=f"in both {pair}; meta-splits must not share"):
        ClassSplit(train, val, test)


@pytest.mark.parametrize(
    "fractions",
    [
        (0.5, 0.3, 0.3),
        (0.6, 0.2, 0.1),
        (1.2, -0.1, -0.1),
        (1.0, -0.5, 0.5),
        (0.5, 0.5),
        (0.25,) * 4,
    ],
)
def test_split_classes_rejects_bad_fractions(fractions):
    with pytest.raises(MetalmError, match="must be three non-negative numbers"):
        split_classes([f"c{i}" for i in range(10)], fractions)
