"""`metalm.runs.existing`: evaluating an existing run directory again (`metalm eval --run`)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from run_tools import EXAMPLE_SUPPORT, OWN_FILES, TEST_TEXTS, probabilities

from metalm import MetalmError, from_pretrained
from metalm.cli import main
from metalm.config import load_config
from metalm.layout import METADATA
from metalm.learners import (
    HEADS,
    ProtoNetConfig,
)
from metalm.runs.existing import evaluate_run, load_trained_learner


def _other_head(config_class) -> str:
    """A head that is not `config_class`'s default (whatever the default is)."""
    return next(h for h in HEADS if h != config_class().head and h != "lpft")


# -- eval --run with overrides -----------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heads-run")
    overrides = tiny_overrides(
        tiny_model_dir,
        root,
        **{"learner.name": "protonet", "eval.settings": "[{n_way: 3, k_shot: 3}]"},
    )
    assert main(["-q", "train", *overrides]) == 0
    return root / "run"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.iterdir() if p.is_file()
    }


@pytest.mark.slow
def test_eval_run_applies_learner_and_model_overrides(finished_run, capsys):
    before = _files(finished_run)
    own = json.loads((finished_run / "report.json").read_text())
    other = _other_head(ProtoNetConfig)
    args = ["-q", "eval", "--run", str(finished_run), "--name", "other-head"]
    assert main([*args, f"learner.head={other}", "model.batch_size=7"]) == 0
    out_dir = finished_run / "evals" / "other-head"
    assert str(out_dir / "report.md") in capsys.readouterr().out
    assert _files(finished_run) == before  # the run's own report, config, weights
    report = json.loads((out_dir / "report.json").read_text())
    methods = {r["method"] for r in report["results"]}
    assert methods == {f"protonet/{other}", "frozen"}
    saved = load_config(out_dir / "config.yaml")
    assert saved.learner.head == other and saved.model.batch_size == 7
    mine = {r["method"]: r for r in report["results"]}
    theirs = {r["method"]: r for r in own["results"]}
    assert mine["frozen"]["per_episode"] == pytest.approx(theirs["frozen"]["per_episode"])
    assert mine[f"protonet/{other}"]["per_episode"] != theirs["protonet"]["per_episode"]
    # the same name again is refused before anything is evaluated
    assert main([*args, f"learner.head={other}"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_run_refuses_overrides_that_change_the_weights_shapes(finished_run, capsys):
    with pytest.raises(MetalmError, match="do not fit"):
        evaluate_run(finished_run, ["model.num_layers=1"], progress=False, name="cut")
    assert not (finished_run / "evals" / "cut").exists()
    assert main(["-q", "eval", "--name", "x", "learner.name=frozen"]) == 2
    assert "--name" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_run_default_folder_is_new_each_time(finished_run):
    first = evaluate_run(finished_run, ["eval.episodes=2"], progress=False)
    second = evaluate_run(finished_run, ["eval.episodes=2"], progress=False)
    assert first.run_dir != second.run_dir
    for report in (first, second):
        assert Path(report.run_dir).parent == finished_run / "evals"
        assert (Path(report.run_dir) / "report.json").is_file()


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_eval_run_on_own_files_writes_a_new_folder(tiny_run, capsys):
    before = snapshot(tiny_run)
    evals = tiny_run / "evals"
    earlier = set(evals.iterdir()) if evals.exists() else set()
    args = ["-q", "eval", "--run", str(tiny_run), *OWN_FILES]
    assert main([*args, "eval.q_queries=2"]) == 0  # 3 test texts per class: K + Q <= 3
    assert snapshot(tiny_run).items() >= before.items()  # the run's own files unchanged
    (folder,) = set(evals.iterdir()) - earlier  # default name: a timestamp
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", folder.name)
    assert str(folder / "report.md") in capsys.readouterr().out
    report = json.loads((folder / "report.json").read_text())
    own = json.loads((tiny_run / "report.json").read_text())
    assert {r["protocol"] for r in own["results"]} == {"3-way 1-shot"}
    assert {(r["method"], r["protocol"], r["dataset"]) for r in report["results"]} == {
        ("protonet", "3-way 1-shot", "intents_test.csv"),
        ("frozen", "3-way 1-shot", "intents_test.csv"),
        ("protonet", "full-way 3-shot", "intents_test.csv"),
        ("frozen", "full-way 3-shot", "intents_test.csv"),
    }
    saved = load_config(folder / "config.yaml")
    assert saved.data.test.support.source == str(EXAMPLE_SUPPORT)


@pytest.mark.slow
def test_export_run_by_flag_and_a_run_given_without_it_refused(tiny_model_dir, tmp_path, capsys):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, **{"learner.name": "protonet"})
    assert main(["-q", "train", *overrides, "train.steps=2", "train.eval_every=2"]) == 0
    run = tmp_path / "run"
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / METADATA).read_text())["meta_trained"] is True
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 2  # pre-1.0 form
    assert f"exported with --run {run}" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    _, trained = load_trained_learner(run)
    np.testing.assert_array_equal(
        probabilities(from_pretrained(tmp_path / "a"), TEST_TEXTS),
        probabilities(trained.eval(), TEST_TEXTS),
    )
