"""`metalm.cli.use_commands`: `metalm export` (of a run, or of an untrained learner; its
model card; bad arguments), `adapt`, `predict` (files and a shell pipeline) and
`score`, on the tiny random BERT of conftest; one slow test of the README's first
minute (export, adapt, score) on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from run_tools import (
    LABELS,
    QUERIES,
    TEST_LABELS,
    TEST_TEXTS,
    TEXTS,
    assert_consistent,
    probabilities,
    write_csv,
)

from metalm import FewShotClassifier, from_pretrained
from metalm.cli import main
from metalm.layout import METADATA

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "intents.csv"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """conftest's protonet meta-trained for a few steps by `metalm train`, then `metalm
    export`."""
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_export_writes_a_model_card_with_accuracy_and_licenses(exported, tiny_run):
    card = (exported / "README.md").read_text()
    report = json.loads((tiny_run / "report.json").read_text())
    first = report["results"][0]
    assert f"{100 * first['accuracy']:.2f} ± {100 * first['ci95']:.2f}" in card
    assert "Meta-trained for 6 steps" in card
    assert "clinc150" in card and "CC BY 3.0" in card and "CC BY 4.0" in card
    metadata = json.loads((exported / METADATA).read_text())
    assert metadata["meta_trained"] and metadata["run"]["train"]["steps"] == 6
    # the exported weights are the run's best weights
    from metalm.runs.existing import load_trained_learner

    _, trained = load_trained_learner(tiny_run)
    np.testing.assert_array_equal(
        probabilities(from_pretrained(exported), QUERIES), probabilities(trained.eval(), QUERIES)
    )


def test_export_of_a_non_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--learner", "frozen", "train.steps=3"], "model.* and learner.* overrides only"),
        (["--learner", "nosuch"], "nosuch"),
        (["--learner", "frozen", "learner.nokey=1"], "nokey"),
        (["--learner", "frozen", "oops"], "'oops': overrides look like key.sub=value"),
        (["--run", "somewhere", "--learner", "frozen"], "drop --learner"),
        ([], "say what to export"),
    ],
)
def test_export_bad_arguments_are_one_line_errors(args, message, tmp_path, capsys):
    assert main(["export", *args, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "m").exists()


def test_export_does_not_overwrite_other_directories(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    args = ["export", "--learner", "frozen", f"model.name_or_path={tiny_model_dir}"]
    assert main([*args, "--out", str(tmp_path / "m")]) == 2
    assert "not a metalm model directory" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_cli_adapt_then_predict_files(exported, tmp_path, capsys):
    support = write_csv(tmp_path / "support.csv", zip(TEXTS, LABELS, strict=True))
    task = tmp_path / "task"
    args = ["adapt", "--model", str(exported), "--support", str(support), "--out", str(task)]
    assert main(args) == 0
    assert (task / "task.safetensors").exists()
    queries = write_csv(tmp_path / "q.csv", [(q,) for q in QUERIES], header=("text",))
    out = tmp_path / "preds.jsonl"
    assert (
        main(["predict", "--task", str(task), "--input", str(queries), "--output", str(out)]) == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    clf = FewShotClassifier.from_pretrained(exported).adapt(TEXTS, LABELS)
    expected = clf.predict_with_probability(QUERIES)
    assert [r["text"] for r in rows] == QUERIES
    assert [r["label"] for r in rows] == [label for label, _ in expected]
    np.testing.assert_allclose([r["probability"] for r in rows], [p for _, p in expected], 1e-5)


def test_cli_adapt_jsonl_with_other_columns(exported, tmp_path):
    support = tmp_path / "support.jsonl"
    support.write_text(
        "".join(
            json.dumps({"utterance": t, "intent": y}) + "\n"
            for t, y in zip(TEXTS, LABELS, strict=True)
        )
    )
    args = ["adapt", "--model", str(exported), "--support", str(support)]
    args += ["--out", str(tmp_path / "t"), "--text-column", "utterance", "--label-column", "intent"]
    assert main(args) == 0
    assert json.loads((tmp_path / "t" / "task.json").read_text())["classes"] == sorted(set(LABELS))


@pytest.mark.slow
def test_cli_predict_in_a_shell_pipeline(exported, tmp_path):
    support = write_csv(tmp_path / "support.csv", zip(TEXTS, LABELS, strict=True))
    task = tmp_path / "task"
    cli = [sys.executable, "-m", "metalm.cli"]
    subprocess.run(
        [*cli, "adapt", "--model", str(exported), "--support", str(support), "--out", str(task)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stdin = "alarm at noon please\n\n" + json.dumps({"text": "is it sunny"}) + "\nplay a song\n"
    done = subprocess.run(
        [*cli, "predict", "--task", str(task), "--input", "-", "--output", "-"],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["alarm at noon please", "is it sunny", "play a song"]
    assert all(r["label"] in LABELS and 0 < r["probability"] <= 1 for r in rows)


def test_cli_predict_errors_are_one_line(exported, tmp_path, capsys):
    assert main(["predict", "--task", str(tmp_path), "--input", "-"]) == 2
    assert "not a task directory" in capsys.readouterr().err
    bad = write_csv(tmp_path / "s.csv", [("only one", "a")])
    args = ["adapt", "--model", str(exported), "--support", str(bad), "--out", str(tmp_path / "t")]
    assert main(args) == 2
    assert "at least 2 classes" in capsys.readouterr().err


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
