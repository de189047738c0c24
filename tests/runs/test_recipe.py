"""`metalm.runs.recipe`: evaluating on own files beside the baselines, the README's commands,
and a hand-made loop on the real MiniLM."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import tiny_overrides
from run_tools import EXAMPLE_QUERY, EXAMPLE_SUPPORT, OWN_FILES, REPO_ROOT, write_csv

from metalm.cli import main
from metalm.data import load_csv


# -- metalm eval -------------------------------------------------------------------------
def eval_overrides(model_dir: Path, output_dir: Path) -> list[str]:
    return tiny_overrides(model_dir, output_dir, **{"eval.settings": "[]"})


def test_eval_on_own_files_beside_the_baselines(tiny_model_dir, tmp_path, capsys):
    overrides = [*eval_overrides(tiny_model_dir, tmp_path / "runs"), *OWN_FILES]
    assert main(["-q", "eval", *overrides]) == 0
    assert "| frozen | full-way 3-shot | intents_test.csv |" in capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "run" / "report.json").read_text())
    queries = load_csv(EXAMPLE_QUERY)
    rows_by_method = {r["method"]: r for r in report["results"]}
    assert set(rows_by_method) == {"protonet", "frozen"}
    for row in rows_by_method.values():
        assert row["protocol"] == "full-way 3-shot" and row["dataset"] == "intents_test.csv"
        assert (row["n_way"], row["k_shot"], row["episodes"]) == (10, 3, 1)
        assert len(row["per_episode"]) == len(queries) == 30  # one 0/1 per test text
    # untrained protonet and frozen are the same rule on the same texts: paired difference 0
    assert rows_by_method["protonet"]["per_episode"] == rows_by_method["frozen"]["per_episode"]
    assert rows_by_method["protonet"]["vs_frozen"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert rows_by_method["frozen"]["vs_frozen"] is None


@pytest.mark.slow
def test_readme_own_files_commands_run(tiny_run, tiny_model_dir, tmp_path, monkeypatch):
    """The `metalm eval` lines of README.md's "Your own data", as written: the first from
    the repository (the shipped example files), the second on a run of that name and
    `train_5.csv`/`test.csv` files with an `utterance` column."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Your own data") :]
    section = section[: section.index("\n### ", 1)]
    commands = [
        shlex.split(line)[1:]
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith(".venv/bin/metalm eval")
    ]
    assert len(commands) == 2
    first, second = commands
    monkeypatch.chdir(REPO_ROOT)
    assert main(["-q", *first, *eval_overrides(tiny_model_dir, tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "runs" / "run" / "report.json").read_text())
    assert {r["protocol"] for r in report["results"]} == {"full-way 3-shot"}

    work = tiny_run.parent.parent
    support = load_csv(EXAMPLE_SUPPORT)
    queries = load_csv(EXAMPLE_QUERY)
    write_csv(
        work / "train_5.csv",
        list(zip(support.texts, support.labels, strict=True)),
        header=("utterance", "label"),
    )
    write_csv(
        work / "test.csv",
        list(zip(queries.texts, queries.labels, strict=True)),
        header=("utterance", "label"),
    )
    monkeypatch.chdir(work)
    assert main(["-q", *second]) == 0
    report = json.loads((tiny_run / "evals" / "my-intents" / "report.json").read_text())
    full_way = [r for r in report["results"] if r["protocol"].startswith("full-way")]
    assert {r["dataset"] for r in full_way} == {"test.csv"} and len(full_way) == 2


# -- the real MiniLM ---------------------------------------------------------------------
@pytest.mark.slow
def test_real_minilm_full_way_on_own_files_matches_a_hand_made_loop(tmp_path):
    """Frozen MiniLM (logistic-regression head) on the shipped example files, 10 intents,
    3 examples each: the report's per-text correctness is that of adapt + predict."""
    import torch

    from metalm.config import EncoderConfig
    from metalm.learners import build_learner
    from metalm.learners.protonet import FrozenConfig
    from metalm.models.encoder import TextEncoder

    args = ["-q", "eval", f"output_dir={tmp_path}", "run_name=run", "learner.name=frozen"]
    args += ["eval.settings=[]", "eval.baselines=[{name: frozen, head: centroid}]"]
    assert main([*args, *OWN_FILES]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows_by_method = {r["method"]: r for r in report["results"]}
    assert set(rows_by_method) == {"frozen", "frozen/centroid"}

    support, queries = load_csv(EXAMPLE_SUPPORT), load_csv(EXAMPLE_QUERY)
    names = support.classes
    learner = build_learner(TextEncoder.from_config(EncoderConfig()), FrozenConfig())
    state = learner.adapt(support.texts, [names.index(y) for y in support.labels])
    with torch.no_grad():
        predicted = learner.predict(state, queries.texts).argmax(-1).tolist()
    correct = [float(names[p] == y) for p, y in zip(predicted, queries.labels, strict=True)]
    assert rows_by_method["frozen"]["per_episode"] == correct
    # a pretrained sentence encoder tells these everyday intents apart (chance is 10%)
    for row in rows_by_method.values():
        assert row["accuracy"] >= 0.7, row


def test_a_strict_run_reports_the_classes_it_left_out(tiny_model_dir, tmp_path):
    """CLINC150 -> BANKING77 with `data.classes.strict`: the report names the meta-train
    classes removed for a name shared with a test intent."""
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path / "runs",
        **{
            "train.steps": 0,
            "eval.episodes": 2,
            "data.classes.strict": "true",
            "data.classes.name_similarity": "null",
        },
    )
    assert main(["-q", "eval", *overrides]) == 0
    run_dir = tmp_path / "runs" / "run"
    removed = json.loads((run_dir / "report.json").read_text())["removed_overlap"]
    assert {"test_class": "change_pin", "train_class": "pin_change", "reason": "same words",
            "similarity": None} in removed  # fmt: skip
    assert "Strict split: " in (run_dir / "report.md").read_text()
    assert "pin_change" in (run_dir / "report.md").read_text()
