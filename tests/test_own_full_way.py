"""The full-way protocol on files of your own: `data.test.support` + `data.test.query`.

Config parsing and pool building load no model; the `metalm eval` runs use the tiny
random BERT of conftest; one slow test checks the protocol on the real MiniLM against a
hand-made adapt/predict loop.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import tiny_overrides

from metalm.cli import main
from metalm.config import load_config, save_config
from metalm.data import DataSource, load_csv
from metalm.errors import MetalmError
from metalm.tasks import build_pools

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SUPPORT = REPO_ROOT / "examples" / "intents_train_3.csv"
EXAMPLE_QUERY = REPO_ROOT / "examples" / "intents_test.csv"
OWN_FILES = [f"data.test.support={EXAMPLE_SUPPORT}", f"data.test.query={EXAMPLE_QUERY}"]


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows(classes: dict[str, int], tag: str) -> list[tuple[str, str]]:
    return [(f"{tag} text {i} about {c}", c) for c, n in classes.items() for i in range(n)]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# -- config ------------------------------------------------------------------------------
def test_support_and_query_take_the_test_columns_and_round_trip(tmp_path):
    config = load_config(
        None,
        [
            "data.test.support=train_5.csv",
            "data.test.query=test.jsonl",
            "data.test.text_column=utterance",
            "data.test.label_column=intent",
        ],
    )
    test = config.data.test
    assert test.support == DataSource("train_5.csv", "train", "utterance", "intent")
    assert test.query == DataSource("test.jsonl", "test", "utterance", "intent")
    assert test.query_source() == test.query
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    # a mapping keeps its own columns and split
    config = load_config(
        None, ["data.test.support={source: hf:org/intents, split: train_5, text_column: q}"]
    )
    assert config.data.test.support == DataSource("hf:org/intents", "train_5", "q")
    # without query, the test texts are data.test's own
    assert config.data.test.query_source() == DataSource("banking77", "test")


def test_support_without_any_test_texts_is_an_error():
    with pytest.raises(MetalmError, match=r"data\.test\.query="):
        load_config(None, ["data.test=null", "data.test.support=train_5.csv"])


# -- pools -------------------------------------------------------------------------------
def test_own_files_make_one_full_way_episode(tmp_path):
    support = write_csv(
        tmp_path / "train_3.csv",
        rows({"alarm": 3, "music": 3, "timer": 4}, "s"),
        header=("utterance", "intent"),
    )
    query = tmp_path / "test.jsonl"
    query.write_text(
        "".join(
            json.dumps({"utterance": t, "intent": y}) + "\n"
            for t, y in rows({"alarm": 2, "music": 5, "timer": 1}, "q")
        ),
        encoding="utf-8",
    )
    config = load_config(
        None,
        [
            f"data.test.support={support}",
            f"data.test.query={query}",
            "data.test.text_column=utterance",
            "data.test.label_column=intent",
        ],
    )
    pools = build_pools(config.data, config.eval.full_way_shots)
    assert list(pools.full_way) == [3]  # 10 examples over 3 classes, as reports count K
    episode = pools.full_way[3]
    assert episode.label_names == ["alarm", "music", "timer"]
    assert len(episode.support_texts) == 10 and len(episode.query_texts) == 8
    for texts, labels in (
        (episode.support_texts, episode.support_labels),
        (episode.query_texts, episode.query_labels),
    ):
        assert all(t.endswith(episode.label_names[y]) for t, y in zip(texts, labels, strict=True))
    # the test pool (episodic settings) is the query file; meta-training is untouched
    assert pools.test.name == pools.test_source_name == "test.jsonl"
    assert len(pools.test) == 8
    assert pools.train.name == "clinc150/train[meta-train]"


def test_query_file_that_is_also_the_training_source_keeps_only_test_classes(tmp_path):
    classes = {f"intent{c}": 8 for c in range(10)}
    source = write_csv(tmp_path / "all.csv", rows(classes, "a"))
    support = write_csv(tmp_path / "support.csv", rows({c: 2 for c in classes}, "s"))
    config = load_config(
        None,
        [
            f"data.train.source={source}",
            "data.classes.fractions=[0.6, 0.2, 0.2]",
            f"data.test.support={support}",
            f"data.test.query={source}",
        ],
    )
    pools = build_pools(config.data)
    (episode,) = pools.full_way.values()
    assert sorted(episode.label_names) == sorted(pools.split.test) and len(pools.split.test) == 2
    assert not set(episode.label_names) & set(pools.split.train)
    assert len(episode.query_texts) == 16 and len(episode.support_texts) == 4


def test_different_label_sets_name_the_labels_missing_on_each_side(tmp_path, capsys):
    support = write_csv(tmp_path / "train_5.csv", rows({"a": 2, "b": 2, "only_support": 2}, "s"))
    query = write_csv(tmp_path / "test.csv", rows({"a": 2, "b": 2, "only_query": 2}, "q"))
    config = load_config(None, [f"data.test.support={support}", f"data.test.query={query}"])
    with pytest.raises(MetalmError) as err:
        build_pools(config.data)
    message = str(err.value)
    assert "['only_query'] have no support examples in train_5.csv" in message
    assert "['only_support'] have no query texts in test.csv" in message
    # on the command line: one line, exit 2, nothing written
    out = tmp_path / "runs"
    args = ["-q", "eval", f"output_dir={out}", "learner.name=frozen", "eval.settings=[]"]
    assert main([*args, f"data.test.support={support}", f"data.test.query={query}"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "only_query" in err_text and "only_support" in err_text
    assert not out.exists()


def test_hf_directories_as_support_and_query(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {
        "train_2": rows({"x": 2, "y": 2}, "s"),
        "test": rows({"x": 3, "y": 1}, "q"),
    }
    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"sentence": [t for t, _ in part], "tag": [y for _, y in part]}
            )
            for name, part in splits.items()
        }
    ).save_to_disk(str(tmp_path / "hf"))
    source = f"hf:{tmp_path / 'hf'}"
    config = load_config(
        None,
        [
            f"data.test.support={{source: '{source}', split: train_2}}",
            f"data.test.query={source}",
            "data.test.text_column=sentence",
            "data.test.label_column=tag",
        ],
    )
    assert config.data.test.support.text_column == "text"  # a mapping has its own columns
    config = load_config(
        None,
        [
            f"data.test.support={{source: '{source}', split: train_2, text_column: sentence,"
            " label_column: tag}",
            f"data.test.query={source}",
            "data.test.text_column=sentence",
            "data.test.label_column=tag",
        ],
    )
    pools = build_pools(config.data)
    assert list(pools.full_way) == [2]
    episode = pools.full_way[2]
    assert len(episode.support_texts) == 4 and len(episode.query_texts) == 4
    assert [episode.label_names[y] for y in episode.query_labels] == ["x", "x", "x", "y"]


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


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny meta-training run (CLINC150 -> BANKING77), named as in the README."""
    root = tmp_path_factory.mktemp("own-files")
    overrides = tiny_overrides(tiny_model_dir, root / "runs", run_name="protonet-20261123-120000")
    assert main(["-q", "train", *overrides]) == 0
    return root / "runs" / "protonet-20261123-120000"


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
