"""A task's examples as metalm takes them: texts that are non-empty strings, labels that
are strings or integers, and the classes in their order. No torch here (the torch-free
`metalm.onnx_adapt` checks its input with these too).

Example:
    >>> task_classes(["b", "a", "b"])
    ['a', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metalm.errors import MetalmError

Label = str | int


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    """`texts` as a list, or a MetalmError naming the first bad one."""
    if isinstance(texts, str):
        raise MetalmError(f"{what} must be a list of strings, not one string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise MetalmError(f"{what}[{i}] is empty or not a string ({text!r})")
    return texts


def check_label(value: Any, i: int) -> Label:
    """`value` as a label (a string or an integer; numpy scalars taken), or an error."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MetalmError(f"labels[{i}] must be a string or an integer, got {value!r}")
    return value


def check_examples(texts: Sequence[str], labels: Sequence[Any]) -> tuple[list[str], list[Label]]:
    """Labeled examples checked: texts, one label each, at least two classes."""
    texts = check_texts(texts)
    checked = [check_label(v, i) for i, v in enumerate(labels)]
    if not texts:
        raise MetalmError("no examples: give at least one labeled text per class")
    if len(texts) != len(checked):
        raise MetalmError(f"{len(texts)} texts but {len(checked)} labels")
    classes = task_classes(checked)
    if len(classes) < 2:
        raise MetalmError(f"need at least 2 classes, got {len(classes)}: {classes}")
    return texts, checked


def task_classes(labels: Sequence[Label]) -> list[Label]:
    """The distinct labels in a task's class order: integers first, then strings, each
    sorted."""
    return sorted(set(labels), key=lambda v: (isinstance(v, str), v))
