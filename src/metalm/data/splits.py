"""Class-disjoint meta-train / meta-val / meta-test splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metalm.errors import MetalmError


@dataclass(frozen=True)
class ClassSplit:
    """Three disjoint lists of class names."""

    train: list[str]
    val: list[str]
    test: list[str]

    def __post_init__(self) -> None:
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = set(getattr(self, a)) & set(getattr(self, b))
            if shared:
                raise MetalmError(
                    f"class split: {sorted(shared)[:3]} are in both {a} and {b}; "
                    "meta-splits must not share classes"
                )


def check_fractions(fractions: Sequence[float], name: str = "class split fractions") -> None:
    """Three non-negative shares (train, val, test) that sum to 1, or a MetalmError."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise MetalmError(
            f"{name} {list(fractions)} must be three non-negative numbers "
            "(train, val, test) that sum to 1"
        )


def split_classes(
    classes: Sequence[str],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> ClassSplit:
    """Shuffle the classes with `seed` and cut them by `fractions` (train, val, test).

    Example:
        >>> s = split_classes([f"c{i}" for i in range(10)], (0.6, 0.2, 0.2), seed=1)
        >>> len(s.train), len(s.val), len(s.test)
        (6, 2, 2)
    """
    check_fractions(fractions)
    ordered = sorted(set(classes))
    order = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    # cut at rounded cumulative shares, so a zero share always gets no classes
    n_train = round(fractions[0] * len(shuffled))
    n_val = round((fractions[0] + fractions[1]) * len(shuffled)) - n_train
    if fractions[2] == 0:
        n_val = len(shuffled) - n_train
    return ClassSplit(
        shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]
    )


def explicit_split(
    classes: Sequence[str], train: Sequence[str], val: Sequence[str], test: Sequence[str]
) -> ClassSplit:
    """A split from explicit class lists; every listed class must exist."""
    known = set(classes)
    for part, names in (("train", train), ("val", val), ("test", test)):
        unknown = sorted(set(names) - known)
        if unknown:
            raise MetalmError(
                f"class split {part}: unknown classes {unknown[:5]}; "
                f"valid classes are e.g. {sorted(known)[:5]}"
            )
    return ClassSplit(list(train), list(val), list(test))
