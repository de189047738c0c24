"""Class names as words the encoder can read, and the check that they mean something
(no torch: the torch-free ONNX adapt uses it too).

A task's label names (`card_arrival`, `book_flight`) say what a class is about; the
embedding learners can use them as one more example of their class
(`learner.label_names=example`) or as a prior on the class's head
(`learner.label_names=prior`). Names that are identifiers (`0`, `1`, `class_3`,
`LABEL_2`, `cluster-7`) carry nothing and would only add noise: `meaningless_names`
finds them; the learners leave those names out (a class's name that is a word is still
used), and when most of a task's names are ids, all of them.

Example:
    >>> name_texts(["card_arrival", "Book-Flight"])
    ['card arrival', 'Book Flight']
    >>> meaningless_names(["card_arrival", "class_3", "7"])
    ['class_3', '7']
"""

from __future__ import annotations

import re
import typing
import warnings
from collections.abc import Sequence
from typing import Literal

LabelNameMode = Literal["off", "example", "prior"]
LABEL_NAME_MODES: tuple[str, ...] = typing.get_args(LabelNameMode)
# words that name a class without saying anything about it
GENERIC_WORDS = frozenset(
    (
        "class",
        "classes",
        "label",
        "labels",
        "category",
        "intent",
        "cls",
        "id",
        "cluster",
        "unlabeled",
    )
)
_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters or more, no digits


def verbalize(class_name: str) -> str:
    """A label as words: `card_arrival` → `card arrival`."""
    return " ".join(str(class_name).replace("_", " ").replace("-", " ").split())


def name_texts(names: Sequence[str]) -> list[str]:
    """Each label name as words: underscores and hyphens become spaces."""
    return [verbalize(name) for name in names]


def is_meaningless(name: str) -> bool:
    """True when `name` has no word of two letters or more beyond the generic ones
    (`class`, `label`, `cluster`, ...): an id such as `0`, `class_3`, `LABEL_2`, `B`."""
    words = [w.lower() for w in _WORD.findall(verbalize(name))]
    return not [w for w in words if w not in GENERIC_WORDS]


def meaningless_names(names: Sequence[str]) -> list[str]:
    """The names of `names` that are ids rather than words (see `is_meaningless`)."""
    return [str(name) for name in names if is_meaningless(str(name))]


def usable_names(names: Sequence[str] | None, warn: bool = True) -> list[str | None] | None:
    """Each name as a text to embed, None for a name that is an id; or None for the
    whole task when there are no names or most of them are ids (then a warning says so,
    unless `warn` is False: meta-training tasks of unlabeled texts are named `cluster-3`
    by design).

    Example:
        >>> usable_names(["card_arrival", "w2", "top_up"])
        ['card arrival', None, 'top up']
    """
    if not names:
        return None
    ids = [is_meaningless(str(name)) for name in names]
    if 2 * sum(ids) > len(names):
        if warn:
            bad = [str(n) for n, i in zip(names, ids, strict=True) if i]
            shown = ", ".join(repr(b) for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
            warnings.warn(
                f"label names {shown} look like ids, not words: learner.label_names is "
                "off for this task (name the classes in words, e.g. card_arrival, to use it)",
                UserWarning,
                stacklevel=3,
            )
        return None
    return [None if i else verbalize(str(n)) for n, i in zip(names, ids, strict=True)]


def named_classes(names: Sequence[str | None] | None) -> tuple[list[int], list[str]]:
    """The classes that have a usable name (as `usable_names` gives them) and those names.

    Example:
        >>> named_classes(["card arrival", None, "top up"])
        ([0, 2], ['card arrival', 'top up'])
    """
    pairs = [(label, name) for label, name in enumerate(names or []) if name is not None]
    return [label for label, _ in pairs], [name for _, name in pairs]
