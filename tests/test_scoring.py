"""`metalm.scoring`: accuracy, macro-F1, per-class scores and confusions against hand
counts, the result files, and `metalm score` from the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from run_tools import LABELS, TEST_LABELS, TEST_TEXTS, TEXTS, assert_consistent, write_csv

from metalm import FewShotClassifier, MetalmError
from metalm.cli import main
from metalm.layout import METADATA
from metalm.scoring import ClassScore, ConfusedPair, score_predictions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "intents.csv"


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


def test_cli_export_adapt_score(frozen_model, tmp_path, capsys):
    support = write_csv(tmp_path / "support.csv", zip(TEXTS, LABELS, strict=True))
    task, out = tmp_path / "task", tmp_path / "scores"
    assert (
        main(["adapt", "--model", str(frozen_model), "--support", str(support), "--out", str(task)])
        == 0
    )
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"utterance": t, "intent": y}) + "\n"
            for t, y in zip(TEST_TEXTS, TEST_LABELS, strict=True)
        )
    )
    capsys.readouterr()
    args = ["score", "--task", str(task), "--input", str(test), "--out", str(out)]
    assert main([*args, "--text-column", "utterance", "--label-column", "intent"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "score.json").read_text())
    expected = FewShotClassifier.load_task(task).score(TEST_TEXTS, TEST_LABELS)
    assert data["confusion"] == expected.confusion and data["n_texts"] == len(TEST_TEXTS)
    assert data["info"]["task"] == str(task) and data["info"]["input"] == str(test)
    assert_consistent(data)
    assert f"{100 * expected.accuracy:.2f}" in printed and "score.json" in printed
    assert (out / "score.md").read_text().startswith("# metalm score")
    assert (out / "confusion.png").stat().st_size > 1000


def test_cli_score_unknown_labels_is_one_line_error_and_writes_nothing(
    frozen_model, tmp_path, capsys
):
    clf = FewShotClassifier.from_pretrained(frozen_model).adapt(TEXTS, LABELS)
    clf.save_task(tmp_path / "task")
    rows = [*zip(TEST_TEXTS, TEST_LABELS, strict=True), ("call a cab", "taxi")]
    test = write_csv(tmp_path / "test.csv", rows)
    args = ["score", "--task", str(tmp_path / "task"), "--input", str(test)]
    assert main([*args, "--out", str(tmp_path / "scores")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'taxi'" in err
    assert not (tmp_path / "scores").exists()
    assert main([*args, "--out", str(tmp_path / "s"), "--label-column", "intent"]) == 2
    assert "intent" in capsys.readouterr().err


# -- the real model -----------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_first_minute_export_adapt_score(tmp_path, capsys):
    """The README's first minute: export frozen MiniLM, adapt on 3 examples of each of
    the 10 intents of examples/intents.csv, score the other texts: far above chance."""
    with open(EXAMPLES, newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    seen: dict[str, int] = {}
    support, test = [], []
    for text, label in rows:
        seen[label] = seen.get(label, 0) + 1
        (support if seen[label] <= 3 else test).append((text, label))
    assert len(seen) == 10 and len(test) >= 25
    model, task, out = tmp_path / "model", tmp_path / "task", tmp_path / "scores"
    torch.manual_seed(0)
    assert main(["export", "--learner", "frozen", "--out", str(model)]) == 0
    metadata = json.loads((model / METADATA).read_text())
    assert metadata["encoder"]["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["encoder"]["dim"] == 384 and metadata["learner"]["head"] == "logreg"
    support_csv = write_csv(tmp_path / "support.csv", support)
    test_csv = write_csv(tmp_path / "test.csv", test)
    assert (
        main(["adapt", "--model", str(model), "--support", str(support_csv), "--out", str(task)])
        == 0
    )
    capsys.readouterr()
    assert main(["score", "--task", str(task), "--input", str(test_csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "score.json").read_text())
    assert data["n_texts"] == len(test) and len(data["classes"]) == 10
    assert data["accuracy"] > 0.6, data["accuracy"]  # chance: 0.1
    assert data["macro_f1"] > 0.5
    assert_consistent(data)
    assert f"{100 * data['accuracy']:.2f}" in printed
    assert (out / "confusion.png").stat().st_size > 5000 and (out / "score.md").exists()
    # the Python API gives the same numbers
    texts, labels = zip(*test, strict=True)
    result = FewShotClassifier.load_task(task).score(list(texts), list(labels))
    assert result.confusion == data["confusion"] and result.macro_f1 == pytest.approx(
        data["macro_f1"]
    )
