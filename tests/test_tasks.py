"""`metalm.tasks`: own support/query files as one full-way task, and the label checks."""

from __future__ import annotations

import json

import pytest
from run_tools import tagged_rows, write_csv

from metalm.cli import main
from metalm.config import load_config, save_config
from metalm.data import DataSource
from metalm.errors import MetalmError
from metalm.tasks import build_pools


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
        tagged_rows({"alarm": 3, "music": 3, "timer": 4}, "s"),
        header=("utterance", "intent"),
    )
    query = tmp_path / "test.jsonl"
    query.write_text(
        "".join(
            json.dumps({"utterance": t, "intent": y}) + "\n"
            for t, y in tagged_rows({"alarm": 2, "music": 5, "timer": 1}, "q")
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
    source = write_csv(tmp_path / "all.csv", tagged_rows(classes, "a"))
    support = write_csv(tmp_path / "support.csv", tagged_rows({c: 2 for c in classes}, "s"))
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
    support = write_csv(
        tmp_path / "train_5.csv", tagged_rows({"a": 2, "b": 2, "only_support": 2}, "s")
    )
    query = write_csv(tmp_path / "test.csv", tagged_rows({"a": 2, "b": 2, "only_query": 2}, "q"))
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
        "train_2": tagged_rows({"x": 2, "y": 2}, "s"),
        "test": tagged_rows({"x": 3, "y": 1}, "q"),
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


def test_unlabeled_texts_that_are_test_texts_are_counted_in_a_warning(tmp_path):
    """Meta-training on unlabeled texts that include test texts warns with how many; a
    pool that shares none stays silent."""
    import warnings

    classes = {f"intent{c}": 6 for c in range(10)}
    rows = tagged_rows(classes, "a")
    source = write_csv(tmp_path / "all.csv", rows)
    overrides = [f"data.train.source={source}", "data.classes.fractions=[0.6, 0.2, 0.2]"]
    config = load_config(None, overrides)
    test_texts = build_pools(config.data).test.texts
    shared = sorted(set(test_texts))[:3]
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join([*shared, "a text of no class", "another one"]) + "\n")
    config = load_config(None, [*overrides, f"data.unlabeled={pool}"])
    with pytest.warns(UserWarning, match=rf"pool.txt: 3 of the {len(set(test_texts))} test texts"):
        build_pools(config.data)
    pool.write_text("a text of no class\nanother one\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_pools(config.data)
