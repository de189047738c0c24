"""Score a classifier on labeled texts: accuracy, macro-F1, per-class precision / recall /
F1 / support, the most confused pairs and a confusion matrix (JSON, Markdown, PNG).

Plain numpy, no scikit-learn. Precision, recall and F1 follow the usual conventions: a
ratio whose denominator is 0 counts as 0, and macro-F1 averages over the classes that
occur among the labels or the predictions.

Example:
    >>> result = score_predictions(["a", "b", "b"], ["a", "a", "b"], classes=["a", "b"])
    >>> round(result.accuracy, 3), result.confused_pairs[0].count
    (0.667, 1)
    >>> [path.name for path in result.write("scores/")]
    ['score.json', 'score.md', 'confusion.png']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metalm.errors import MetalmError
from metalm.runs.accuracy import mean_ci95

Label = str | int
SCORE_JSON = "score.json"
SCORE_MARKDOWN = "score.md"
CONFUSION_PNG = "confusion.png"


@dataclass(frozen=True)
class ClassScore:
    """Precision, recall and F1 of one class; `support` = its texts among the labels."""

    label: Label
    precision: float
    recall: float
    f1: float
    support: int
    predicted: int


@dataclass(frozen=True)
class ConfusedPair:
    """`count` texts of class `true` predicted as `predicted` (`rate`: share of `true`)."""

    true: Label
    predicted: Label
    count: int
    rate: float


@dataclass
class ScoreResult:
    """How well predictions match labels.

    `confusion[i][j]` counts texts of `classes[i]` predicted as `classes[j]`.

    Example:
        >>> result = clf.score(["will it snow", "wake me at 7"], ["weather", "alarm"])
        >>> result.classes, [row.support for row in result.per_class]
        (['alarm', 'music', 'weather'], [1, 0, 1])
        >>> 0.0 <= result.accuracy <= 1.0, 0.0 <= result.macro_f1 <= 1.0
        (True, True)
        >>> paths = result.write("scores/intents")
    """

    classes: list[Label]
    confusion: list[list[int]]
    accuracy: float
    accuracy_ci95: float
    macro_f1: float
    per_class: list[ClassScore]
    confused_pairs: list[ConfusedPair]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_texts(self) -> int:
        return int(sum(map(sum, self.confusion)))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["n_texts"] = self.n_texts
        return out

    def summary(self, top: int = 5) -> str:
        """A short Markdown table: the headline numbers and the most confused pairs."""
        lines = [
            "| texts | classes | accuracy % (±95% CI) | macro-F1 % |",
            "|---|---|---|---|",
            f"| {self.n_texts} | {len(self.classes)} | {100 * self.accuracy:.2f} ± "
            f"{_pct(self.accuracy_ci95)} | {100 * self.macro_f1:.2f} |",
        ]
        if self.confused_pairs[:top]:
            lines += ["", "| true label | predicted as | texts | share of true |"]
            lines += ["|---|---|---|---|"]
            lines += [
                f"| {p.true} | {p.predicted} | {p.count} | {100 * p.rate:.1f}% |"
                for p in self.confused_pairs[:top]
            ]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The summary, then every class's precision, recall, F1 and support."""
        lines = ["# metalm score", "", self.summary(top=len(self.confused_pairs)), ""]
        lines += ["| class | precision % | recall % | F1 % | support | predicted |"]
        lines += ["|---|---|---|---|---|---|"]
        lines += [
            f"| {c.label} | {100 * c.precision:.2f} | {100 * c.recall:.2f} | "
            f"{100 * c.f1:.2f} | {c.support} | {c.predicted} |"
            for c in self.per_class
        ]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> list[Path]:
        """`score.json`, `score.md` and `confusion.png` in `directory` (made if needed)."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise MetalmError(f"{directory} is a file; give --out a directory")
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / SCORE_JSON, directory / SCORE_MARKDOWN, directory / CONFUSION_PNG]
        paths[0].write_text(json.dumps(self.as_dict(), indent=1), encoding="utf-8")
        paths[1].write_text(self.to_markdown(), encoding="utf-8")
        plot_confusion(self, paths[2])
        return paths


def _pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{100 * value:.2f}"


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def score_predictions(
    labels: Sequence[Label],
    predictions: Sequence[Label],
    classes: Sequence[Label] | None = None,
    top_pairs: int = 10,
) -> ScoreResult:
    """Score `predictions` against `labels` over `classes` (default: every label seen).

    A label outside `classes` raises a MetalmError naming it.

    Example:
        >>> score_predictions(["a", "b"], ["a", "a"]).macro_f1
        0.333...
    """
    classes, true, pred = _as_indices(labels, predictions, classes)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    per_class, macro_f1 = _class_scores(confusion, classes)
    accuracy, ci95 = mean_ci95((true == pred).astype(float))
    return ScoreResult(
        classes=classes,
        confusion=confusion.tolist(),
        accuracy=accuracy,
        accuracy_ci95=ci95,
        macro_f1=macro_f1,
        per_class=per_class,
        confused_pairs=_confused_pairs(confusion, classes, top_pairs),
    )


def _as_indices(
    labels: Sequence[Label], predictions: Sequence[Label], classes: Sequence[Label] | None
) -> tuple[list[Label], np.ndarray, np.ndarray]:
    """The classes (default: every label and prediction, sorted) and the labels and
    predictions as indices into them; a MetalmError where lengths differ, nothing is
    labeled, or a label or prediction is not a class."""
    labels, predictions = list(labels), list(predictions)
    if len(labels) != len(predictions):
        raise MetalmError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise MetalmError("nothing to score: give at least one labeled text")
    if classes is None:
        classes = sorted(set(labels) | set(predictions), key=lambda v: (isinstance(v, str), v))
    classes = list(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in [*labels, *predictions] if v not in index})
    if unknown:
        raise MetalmError(f"labels not among the classes {classes}: {unknown}")
    true = np.array([index[v] for v in labels])
    pred = np.array([index[v] for v in predictions])
    return classes, true, pred


def _class_scores(confusion: np.ndarray, classes: list[Label]) -> tuple[list[ClassScore], float]:
    """Each class's precision, recall, F1, support and predictions, and macro-F1 (over
    the classes that occur among the labels or the predictions)."""
    hits = np.diag(confusion).astype(float)
    support = confusion.sum(1)  # texts of each class
    predicted = confusion.sum(0)  # texts predicted as each class
    precision = _ratio(hits, predicted.astype(float))
    recall = _ratio(hits, support.astype(float))
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    per_class = [
        ClassScore(
            classes[i],
            float(precision[i]),
            float(recall[i]),
            float(f1[i]),
            int(support[i]),
            int(predicted[i]),
        )
        for i in range(len(classes))
    ]
    return per_class, float(f1[present].mean())


def _confused_pairs(confusion: np.ndarray, classes: list[Label], top: int) -> list[ConfusedPair]:
    """The `top` off-diagonal cells of `confusion` with the most texts (ties: class order)."""
    support = confusion.sum(1)  # texts of each class
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off), strict=True)]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))  # most texts first, then class order
    return [
        ConfusedPair(classes[i], classes[j], count, count / int(support[i]))
        for count, i, j in pairs[:top]
    ]


def plot_confusion(result: ScoreResult, path: str | Path) -> None:
    """The confusion matrix as an image: rows = true labels, columns = predictions,
    colour = share of the row (counts written in the cells up to 25 classes)."""
    from metalm.runs.report import _pyplot

    plt = _pyplot()
    counts = np.asarray(result.confusion, dtype=float)
    n = len(result.classes)
    rows = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(30.0, max(5.0, 0.3 * n + 2))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    names = [str(c) for c in result.classes]
    font = max(4, min(9, 300 // max(n, 1)))
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    if n <= 25:
        for i, j in zip(*np.nonzero(counts), strict=True):
            color = "white" if rows[i, j] > 0.5 else "black"
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", color=color, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true label")
    ax.set_title(
        f"accuracy {100 * result.accuracy:.1f}%, macro-F1 {100 * result.macro_f1:.1f}% "
        f"({result.n_texts} texts)"
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true label")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
