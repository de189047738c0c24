"""Save / load of meta-learners (every registered learner) and `FewShotClassifier`, on
the tiny random BERT of conftest; one slow test on the real all-MiniLM-L6-v2 and real
BANKING77 data (through the API and `metalm adapt` / `predict`). The commands' own
tests are in tests/cli/test_use_commands.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from run_tools import (
    LABELS,
    QUERIES,
    TEST_LABELS,
    TEST_TEXTS,
    TEXTS,
    assert_consistent,
    tiny_learner,
    write_csv,
)

from metalm import FewShotClassifier, MetalmError, save_pretrained
from metalm.cli import main
from metalm.config import load_config
from metalm.learners import build_learner
from metalm.models.encoder import TextEncoder


# -- FewShotClassifier -----------------------------------------------------------------
def test_classifier_maps_labels_and_predicts_names(frozen_dir):
    clf = FewShotClassifier.from_pretrained(frozen_dir).fit(TEXTS, LABELS)
    assert clf.classes_ == ["alarm", "music", "weather"]
    probs = clf.predict_proba(QUERIES)
    assert probs.shape == (len(QUERIES), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert clf.predict(QUERIES) == [clf.classes_[i] for i in probs.argmax(1)]
    # the support texts themselves sit next to their own class
    assert clf.predict(TEXTS[::2]) == LABELS[::2]
    assert clf.predict_proba([]).shape == (0, 3)


def test_classifier_integer_labels_batches_and_determinism(frozen_dir):
    clf = FewShotClassifier.from_pretrained(frozen_dir, batch_size=2)
    clf.adapt(TEXTS, [7, 7, 3, 3, 5, 5])
    assert clf.classes_ == [3, 5, 7]
    assert all(isinstance(label, int) for label in clf.predict(QUERIES))
    one_batch = FewShotClassifier.from_pretrained(frozen_dir, batch_size=64)
    one_batch.adapt(TEXTS, [7, 7, 3, 3, 5, 5])
    # batches of other widths pad differently: equal up to float32 rounding (the logistic
    # regression head's larger logits show it in the 7th digit)
    np.testing.assert_allclose(
        clf.predict_proba(QUERIES), one_batch.predict_proba(QUERIES), rtol=0, atol=1e-6
    )
    np.testing.assert_array_equal(
        one_batch.predict_proba(QUERIES), one_batch.predict_proba(QUERIES)
    )


@pytest.mark.parametrize(
    "texts, labels, message",
    [
        (TEXTS, ["a"] * 6, "at least 2 classes"),
        ([], [], "no examples"),
        (TEXTS, LABELS[:-1], "6 texts but 5 labels"),
        (["ok", "  "], ["a", "b"], r"texts\[1\] is empty"),
        ("one string", ["a"], "not one string"),
        (TEXTS, [1.5] * 6, "string or an integer"),
    ],
)
def test_classifier_bad_input(texts, labels, message, frozen_dir):
    clf = FewShotClassifier.from_pretrained(frozen_dir)
    with pytest.raises(MetalmError, match=message):
        clf.adapt(texts, labels)


def test_predict_before_adapt_and_bad_query(frozen_dir):
    clf = FewShotClassifier.from_pretrained(frozen_dir)
    with pytest.raises(MetalmError, match="not adapted yet"):
        clf.predict(["hello"])
    clf.adapt(TEXTS, LABELS)
    with pytest.raises(MetalmError, match="empty"):
        clf.predict(["fine", ""])


def test_task_save_load_round_trip(frozen_dir, tiny_model_dir, tmp_path):
    clf = FewShotClassifier.from_pretrained(frozen_dir).adapt(TEXTS, LABELS)
    clf.save_task(tmp_path / "task")
    info = json.loads((tmp_path / "task" / "task.json").read_text())
    assert info["classes"] == clf.classes_ and info["model_fingerprint"] == clf.model_fingerprint
    again = FewShotClassifier.load_task(tmp_path / "task")  # finds the model by its path
    np.testing.assert_array_equal(again.predict_proba(QUERIES), clf.predict_proba(QUERIES))
    assert again.classes_ == clf.classes_
    other = save_pretrained(tiny_learner(tiny_model_dir, "protonet"), tmp_path / "other")
    with pytest.raises(MetalmError, match="adapted with another model"):
        FewShotClassifier.load_task(tmp_path / "task", model=other)
    with pytest.raises(MetalmError, match="not a task directory"):
        FewShotClassifier.load_task(tmp_path)


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "task.json").write_text("{oops"), "task.json: not valid JSON"),
        (lambda d: _cut_in_half(d / "task.json"), "task.json: not valid JSON"),
        (lambda d: _cut_in_half(d / "task.safetensors"), "task.safetensors: broken or truncated"),
        (lambda d: (d / "task.safetensors").unlink(), "missing task.safetensors"),
    ],
)
def test_broken_task_directories_are_one_line_errors(change, message, frozen_dir, tmp_path, capsys):
    """Through the API and through `metalm predict`: one line naming the file."""
    FewShotClassifier.from_pretrained(frozen_dir).adapt(TEXTS, LABELS).save_task(tmp_path / "t")
    change(tmp_path / "t")
    with pytest.raises(MetalmError, match=message):
        FewShotClassifier.load_task(tmp_path / "t")
    queries = write_csv(tmp_path / "q.csv", [(q, "x") for q in QUERIES])
    assert main(["predict", "--task", str(tmp_path / "t"), "--input", str(queries)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


# -- the real model --------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_on_banking77_via_api_and_cli(tmp_path):
    """Frozen MiniLM, 10 BANKING77 intents, 5 shots (train_5): far above chance."""
    from metalm.data import builtin_dataset

    config = load_config(None, ["learner.name=frozen"])
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    model = save_pretrained(learner, tmp_path / "minilm-frozen", run_config=config)
    train = builtin_dataset("banking77", "train_5")
    classes = train.classes[:10]
    support = train.subset(classes)
    test = builtin_dataset("banking77", "test").subset(classes)
    clf = FewShotClassifier.from_pretrained(model).adapt(support.texts, support.labels)
    accuracy = np.mean(np.array(clf.predict(test.texts)) == np.array(test.labels))
    assert accuracy > 0.6
    support_csv = write_csv(tmp_path / "s.csv", zip(support.texts, support.labels, strict=True))
    args = ["adapt", "--model", str(model), "--support", str(support_csv)]
    assert main([*args, "--out", str(tmp_path / "task")]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(test.texts) + "\n")
    out = tmp_path / "p.jsonl"
    args = ["predict", "--task", str(tmp_path / "task"), "--input", str(texts)]
    assert main([*args, "--output", str(out)]) == 0
    labels = [json.loads(line)["label"] for line in out.read_text().splitlines()]
    assert labels == clf.predict(test.texts)


# -- FewShotClassifier.score ---------------------------------------------------------------
def test_classifier_score_matches_its_predictions(frozen_model):
    clf = FewShotClassifier.from_pretrained(frozen_model).adapt(TEXTS, LABELS)
    result = clf.score(TEST_TEXTS, TEST_LABELS)
    predictions = clf.predict(TEST_TEXTS)
    assert result.classes == clf.classes_
    assert result.accuracy == pytest.approx(np.mean(np.array(predictions) == TEST_LABELS))
    expected = np.zeros((3, 3), dtype=int)
    for truth, pred in zip(TEST_LABELS, predictions, strict=True):
        expected[clf.classes_.index(truth), clf.classes_.index(pred)] += 1
    assert result.confusion == expected.tolist()
    assert result.info["learner"] == "frozen"
    assert_consistent(result)


def test_classifier_score_labels_the_task_does_not_know(frozen_model):
    clf = FewShotClassifier.from_pretrained(frozen_model).adapt(TEXTS, LABELS)
    with pytest.raises(MetalmError, match=r"does not know: 'snooze', 'taxi' \(its 3 classes"):
        clf.score([*TEST_TEXTS, "x", "y", "z"], [*TEST_LABELS, "taxi", "snooze", "taxi"])
    with pytest.raises(MetalmError, match="2 texts but 1 labels"):
        clf.score(TEST_TEXTS[:2], TEST_LABELS[:1])
    with pytest.raises(MetalmError, match="not adapted"):
        FewShotClassifier.from_pretrained(frozen_model).score(TEST_TEXTS, TEST_LABELS)


def test_classifier_score_matches_string_labels_to_integer_classes(frozen_model):
    clf = FewShotClassifier.from_pretrained(frozen_model)
    clf.adapt(TEXTS, [{"alarm": 0, "weather": 1, "music": 2}[y] for y in LABELS])
    as_int = [{"alarm": 0, "weather": 1, "music": 2}[y] for y in TEST_LABELS]
    by_int, by_str = clf.score(TEST_TEXTS, as_int), clf.score(TEST_TEXTS, list(map(str, as_int)))
    assert by_int.classes == [0, 1, 2] and by_int.confusion == by_str.confusion
