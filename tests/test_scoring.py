"""`metalm.scoring`: accuracy, macro-F1, per-class scores and confusions against hand
counts, and the result files (`metalm score` is tested in tests/cli/test_use_commands.py)."""

from __future__ import annotations

import json

import pytest
from run_tools import assert_consistent

from metalm import MetalmError
from metalm.scoring import ClassScore, ConfusedPair, score_predictions


# -- the metrics -------------------------------------------------------------------------
def test_score_predictions_against_hand_counts():
    labels = ["a", "a", "a", "a", "b", "b", "c", "c", "c", "c"]
    preds = ["a", "a", "b", "c", "b", "a", "c", "c", "b", "b"]
    result = score_predictions(labels, preds, classes=["a", "b", "c", "d"], top_pairs=3)
    assert result.confusion == [[2, 1, 1, 0], [1, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
    assert result.accuracy == pytest.approx(0.5) and result.n_texts == 10
    # a: P 2/3 R 2/4; b: P 1/4 R 1/2; c: P 2/3 R 2/4; d never occurs: 0s, not averaged
    expected = {"a": (2 / 3, 0.5), "b": (0.25, 0.5), "c": (2 / 3, 0.5), "d": (0.0, 0.0)}
    f1 = {}
    for row in result.per_class:
        p, r = expected[row.label]
        f1[row.label] = 2 * p * r / (p + r) if p + r else 0.0
        assert (row.precision, row.recall, row.f1) == pytest.approx((p, r, f1[row.label]))
    assert result.per_class[3] == ClassScore("d", 0.0, 0.0, 0.0, 0, 0)
    assert result.macro_f1 == pytest.approx((f1["a"] + f1["b"] + f1["c"]) / 3)
    # the most texts first (c→b), ties in class order: (a→b), (a→c), then (b→a) cut
    assert result.confused_pairs == [
        ConfusedPair("c", "b", 2, 0.5),
        ConfusedPair("a", "b", 1, 0.25),
        ConfusedPair("a", "c", 1, 0.25),
    ]
    assert_consistent(result)


def test_score_predictions_perfect_and_integer_labels():
    result = score_predictions([0, 1, 1, 2], [0, 1, 1, 2])
    assert result.classes == [0, 1, 2] and result.accuracy == 1.0 and result.macro_f1 == 1.0
    assert result.confused_pairs == [] and result.accuracy_ci95 == 0.0
    assert "| 4 | 3 | 100.00 ± 0.00 | 100.00 |" in result.summary()


@pytest.mark.parametrize(
    "labels, preds, classes, message",
    [
        (["a", "x"], ["a", "a"], ["a", "b"], "'x'"),
        (["a"], ["a", "b"], None, "1 labels but 2 predictions"),
        ([], [], None, "nothing to score"),
    ],
)
def test_score_predictions_bad_input(labels, preds, classes, message):
    with pytest.raises(MetalmError, match=message):
        score_predictions(labels, preds, classes)


def test_score_result_files(tmp_path):
    result = score_predictions(["a", "b", "b", "c"], ["a", "a", "b", "c"])
    paths = result.write(tmp_path / "out")
    assert [p.name for p in paths] == ["score.json", "score.md", "confusion.png"]
    data = json.loads(paths[0].read_text())
    assert data["n_texts"] == 4 and data["confusion"] == result.confusion
    assert_consistent(data)
    markdown = paths[1].read_text()
    assert (
        "| b | a | 1 | 50.0% |" in markdown and "| b | 100.00 | 50.00 | 66.67 | 2 | 1 |" in markdown
    )
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(MetalmError, match="is a file"):
        result.write(tmp_path / "file")
