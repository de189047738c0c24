"""Class overlap between meta-training and test: test classes whose name, or a near-name,
is also a meta-train class (e.g. CLINC150's `pin_change` and BANKING77's `change_pin`).

Two class names overlap when, after normalising (lower case, words split at anything
that is not a letter or digit, a plural `s` dropped):

* `same name`: they are equal;
* `same words`: they have the same words in another order (`pin_change`, `change_pin`);
* `contains`: every word of one is a word of the other (`transfer`, `failed_transfer`);
* `similar`: their embeddings (the names as words, by the shipped all-MiniLM-L6-v2) have
  a cosine similarity of at least `similarity` (`card_declined`,
  `declined_card_payment`: 0.83; see `DEFAULT_SIMILARITY`).

A strict split (`data.classes.strict=true`) removes every meta-train and meta-val class
that overlaps a test class.

Example:
    >>> [(o.test_class, o.train_class, o.reason)
    ...  for o in class_overlap(["pin_change", "weather"], ["change_pin", "top_up"], None)]
    [('change_pin', 'pin_change', 'same words')]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

EmbedNames = Callable[[Sequence[str]], torch.Tensor]
DEFAULT_SIMILARITY = 0.6
"""Names at least this similar overlap. Set by reading CLINC150 x BANKING77's most
similar name pairs (not by any accuracy): the near-synonyms `report_lost_card` /
`lost_or_stolen_card` (0.76), `damaged_card` / `card_not_working` (0.72), `find_phone` /
`lost_or_stolen_phone` (0.70) and `expiration_date` / `card_about_to_expire` (0.60) are
in; so are some related intents of one domain (`new_card` / `card_arrival` 0.62):
a strict split errs on the side of removing."""


@dataclass(frozen=True)
class ClassOverlap:
    """One test class and a meta-train class it overlaps, and why."""

    test_class: str
    train_class: str
    reason: str  # same name | same words | contains | similar
    similarity: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def name_words(name: str) -> tuple[str, ...]:
    """The normalised words of a class name.

    Example:
        >>> name_words("Lost_or_stolen-Cards?")
        ('lost', 'or', 'stolen', 'card')
    """
    words = re.findall(r"[a-z0-9]+", name.lower())
    return tuple(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w
                 for w in words)  # fmt: skip


@lru_cache(maxsize=4096)  # class names: compared pairwise, each name many times
def _word_set(name: str) -> frozenset[str]:
    return frozenset(name_words(name))


def _name_reason(test: str, train: str) -> str | None:
    if test == train:
        return "same name"
    a, b = _word_set(test), _word_set(train)
    if not a or not b:
        return None
    if a == b:
        return "same words"
    if a <= b or b <= a:
        return "contains"
    return None


@lru_cache(maxsize=1)
def _shipped_encoder():
    from metalm.models.encoder import EncoderConfig, TextEncoder

    return TextEncoder.from_config(EncoderConfig(device="cpu"))


def embed_names(names: Sequence[str]) -> torch.Tensor:
    """Unit embeddings of class names read as words (`card_declined` -> "card
    declined"), by the shipped all-MiniLM-L6-v2 (loaded once per process)."""
    texts = [" ".join(name_words(n)) or n for n in names]
    with torch.no_grad():
        return _shipped_encoder().embed(texts).float()


def class_overlap(
    train_classes: Sequence[str],
    test_classes: Sequence[str],
    similarity: float | None = DEFAULT_SIMILARITY,
    embed: EmbedNames = embed_names,
) -> list[ClassOverlap]:
    """Every (test class, meta-train class) pair that overlaps, test classes in their
    order; `similarity=None` checks the names and words only (no encoder)."""
    train, test = list(dict.fromkeys(train_classes)), list(dict.fromkeys(test_classes))
    scores = None
    if similarity is not None and train and test:
        scores = (embed(test) @ embed(train).T).tolist()
    found = []
    for i, test_class in enumerate(test):
        for j, train_class in enumerate(train):
            score = None if scores is None else scores[i][j]
            reason = _name_reason(test_class, train_class)
            if reason is None and score is not None and score >= similarity:
                reason = "similar"
            if reason is not None:
                found.append(ClassOverlap(test_class, train_class, reason, score))
    return found


def overlapping_train_classes(overlaps: Sequence[ClassOverlap]) -> list[str]:
    """The meta-train classes a strict split removes, sorted."""
    return sorted({o.train_class for o in overlaps})


def overlap_markdown(overlaps: Sequence[ClassOverlap]) -> str:
    """A Markdown table of the overlaps."""
    lines = ["| test class | meta-train class | why | name similarity |", "|---|---|---|---|"]
    for o in overlaps:
        score = "" if o.similarity is None else f"{o.similarity:.2f}"
        lines.append(f"| {o.test_class} | {o.train_class} | {o.reason} | {score} |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_SIMILARITY",
    "ClassOverlap",
    "class_overlap",
    "embed_names",
    "name_words",
    "overlap_markdown",
    "overlapping_train_classes",
]
