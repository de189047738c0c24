"""Tasks from texts without labels: loading, instance tasks, k-means cluster tasks, and
meta-training on them (tiny model; the real MiniLM in the slow lane)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from metalm.config import load_config
from metalm.data.unlabeled import (
    ClusterTaskSampler,
    InstanceTaskSampler,
    NeighbourTaskSampler,
    UnlabeledConfig,
    kmeans,
    load_texts,
    nearest_neighbours,
    word_dropout,
)
from metalm.errors import MetalmError

TOPICS = ["card", "loan", "travel", "music", "weather", "alarm"]


def _texts(per_topic: int = 30) -> list[str]:
    return [f"{topic} question number {i} please" for topic in TOPICS for i in range(per_topic)]


def _topic_embed(noise: float = 0.05, seed: int = 0):
    """Each topic is a direction; a text's embedding is its topic's plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(len(TOPICS), 16, generator=generator))
    calls = []

    def embed(texts):
        calls.append(len(texts))
        rows = torch.stack([directions[TOPICS.index(t.split()[0])] for t in texts])
        jitter = torch.randn(rows.shape, generator=torch.Generator().manual_seed(len(texts)))
        return rows + noise * jitter

    return embed, calls


# ------------------------------------------------------------------------------ loading


def test_load_texts_from_every_kind_of_source(tmp_path):
    (tmp_path / "t.txt").write_text("first ticket\n\n  \nsecond ticket\nfirst ticket\n")
    (tmp_path / "t.csv").write_text("body,other\nfirst ticket,x\nsecond ticket,y\n")
    (tmp_path / "t.jsonl").write_text('{"body": "first ticket"}\n{"body": "second ticket"}\n')
    datasets.Dataset.from_dict({"body": ["first ticket", "second ticket"]}).save_to_disk(
        str(tmp_path / "hf")
    )
    with pytest.warns(UserWarning, match="skipped 2 empty texts"):
        assert load_texts(UnlabeledConfig(source=str(tmp_path / "t.txt"))) == [
            "first ticket",
            "second ticket",
        ]
    for source in ("t.csv", "t.jsonl"):
        config = UnlabeledConfig(source=str(tmp_path / source), text_column="body")
        assert load_texts(config) == ["first ticket", "second ticket"]
    config = UnlabeledConfig(source=f"hf:{tmp_path / 'hf'}", text_column="body")
    assert load_texts(config) == ["first ticket", "second ticket"]
    banking = load_texts(UnlabeledConfig(source="banking77", split="train"))
    assert 8000 < len(banking) <= 8622 and len(set(banking)) == len(banking)


def test_bad_unlabeled_sources_say_what_to_fix(tmp_path):
    (tmp_path / "one.txt").write_text("only one\n")
    (tmp_path / "t.csv").write_text("text\nhello\n")
    cases = [
        (UnlabeledConfig(source=str(tmp_path / "one.txt")), "give at least 2"),
        (UnlabeledConfig(source=str(tmp_path / "t.csv"), text_column="body"), "no column 'body'"),
        (UnlabeledConfig(source=str(tmp_path / "missing.txt")), "no such file"),
        (UnlabeledConfig(source=str(tmp_path / "t.parquet")), "unknown unlabeled source"),
        (UnlabeledConfig(source=""), "source is empty"),
    ]
    for config, message in cases:
        with pytest.raises(MetalmError, match=message):
            load_texts(config)
    for override, message in (
        ("data.unlabeled.tasks=all", "must be one of"),
        ("data.unlabeled.tasks=cluster+cluster", "must be one of"),
        ("data.unlabeled.neighbours=0", "neighbours must be >= 1"),
        ("data.unlabeled.n_way=1", "n_way must be >= 2"),
        ("data.unlabeled.weight=0", "weight must be > 0"),
        ("data.unlabeled.word_dropout=1.0", "word_dropout"),
    ):
        with pytest.raises(MetalmError, match=message):
            load_config(None, ["data.unlabeled=banking77", override])
    assert load_config(None, ["data.unlabeled=t.txt"]).data.unlabeled.source == "t.txt"


# ------------------------------------------------------------------------ instance tasks


def test_word_dropout_keeps_words_in_order_and_at_least_one():
    rng = np.random.default_rng(0)
    text = "please freeze my card right now"
    for _ in range(200):
        view = word_dropout(text, rng, 0.5).split()
        assert view and all(w in text.split() for w in view)
        positions = [text.split().index(w) for w in view]
        assert positions == sorted(positions)
    assert word_dropout(text, rng, 0.0) == text
    assert word_dropout("card", rng, 0.9) == "card"


def test_instance_tasks_pair_two_views_of_each_text():
    texts = _texts()
    tasks = InstanceTaskSampler(texts, n_way=10, seed=3, augment="words", dropout=0.3)
    changed = 0
    for i in range(50):
        episode = tasks.sample(i)
        assert episode.support_labels == episode.query_labels == list(range(10))
        for name, s, q in zip(
            episode.label_names, episode.support_texts, episode.query_texts, strict=True
        ):
            original = texts[int(name.split("-")[1])]
            assert set(s.split()) <= set(original.split()) >= set(q.split())
            changed += s != q
        assert len(set(episode.label_names)) == 10
    assert changed > 100  # the views differ most of the time at p=0.3
    again = InstanceTaskSampler(texts, n_way=10, seed=3, augment="words", dropout=0.3)
    assert again.sample(17) == tasks.sample(17)
    plain = InstanceTaskSampler(texts, n_way=10, seed=3, augment="none").sample(0)
    assert plain.support_texts == plain.query_texts
    with pytest.raises(MetalmError, match=r"lower data\.unlabeled\.n_way"):
        InstanceTaskSampler(texts[:5], n_way=10)


# ------------------------------------------------------------------------- cluster tasks


def test_kmeans_recovers_separated_clusters_deterministically():
    embed, _ = _topic_embed()
    texts = _texts(20)
    assignments = kmeans(embed(texts), len(TOPICS), seed=0)
    truth = [TOPICS.index(t.split()[0]) for t in texts]
    # every found cluster is one topic and every topic one cluster
    pairs = set(zip(assignments.tolist(), truth, strict=True))
    assert len(pairs) == len(TOPICS) == len(set(assignments.tolist()))
    assert torch.equal(assignments, kmeans(embed(texts), len(TOPICS), seed=0))


def test_cluster_tasks_follow_the_clusters_and_refresh_on_schedule():
    embed, calls = _topic_embed()
    tasks = ClusterTaskSampler(_texts(), clusters=6, n_way=4, k_shot=2, q_queries=3, seed=0,
                               refresh_every=10)  # fmt: skip
    with pytest.raises(MetalmError, match="after clustering"):
        tasks.sample(0)
    for step in range(25):
        tasks.on_step(step, embed)
    assert calls == [180, 180, 180]  # steps 0, 10, 20
    for i in range(30):
        episode = tasks.sample(i)
        assert episode.n_way == 4 and len(episode.support_texts) == 8
        topics = {}
        for text, label in zip(
            episode.support_texts + episode.query_texts,
            episode.support_labels + episode.query_labels,
            strict=True,
        ):
            topics.setdefault(label, set()).add(text.split()[0])
        # a pseudo-class is one topic, and different pseudo-classes are different topics
        assert all(len(t) == 1 for t in topics.values())
        assert len({next(iter(t)) for t in topics.values()}) == 4

    restored = ClusterTaskSampler(_texts(), clusters=6, n_way=4, k_shot=2, q_queries=3, seed=0)
    restored.load_state_dict(tasks.state_dict())
    assert [restored.sample(i) for i in range(10)] == [tasks.sample(i) for i in range(10)]


def test_cluster_tasks_default_count_and_errors():
    texts = _texts(30)  # 180 texts -> 6 clusters by default (one per 30)
    assert ClusterTaskSampler(texts).clusters == 6
    subset = ClusterTaskSampler(texts, max_texts=100)
    assert len(subset.texts) == 100 and set(subset.texts) <= set(texts)
    with pytest.raises(MetalmError, match=r"lower data\.unlabeled\.clusters"):
        ClusterTaskSampler(texts[:5], clusters=10)
    embed, _ = _topic_embed()
    tiny = ClusterTaskSampler(texts[:12], clusters=6, n_way=2, k_shot=5, q_queries=5)
    with pytest.raises(MetalmError, match="fewer than 2 clusters"):
        tiny.on_step(0, embed)


# ------------------------------------------------------------------------ neighbour tasks


def test_nearest_neighbours_exclude_self_and_come_nearest_first():
    x = torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.8, 0.2], [0.0, 1.0]])
    table = nearest_neighbours(x, 2, chunk=3)  # chunks must not change the answer
    assert table.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert nearest_neighbours(x, 10).shape == (4, 3)  # at most n - 1


def test_neighbour_tasks_pair_each_anchor_with_a_near_text_of_its_topic():
    embed, calls = _topic_embed()
    texts = _texts()
    tasks = NeighbourTaskSampler(texts, n_way=6, neighbours=5, seed=1, refresh_every=4,
                                 augment="none")  # fmt: skip
    with pytest.raises(MetalmError, match="after the neighbours"):
        tasks.sample(0)
    for step in range(9):
        tasks.on_step(step, embed)
    assert calls == [180, 180, 180]  # steps 0, 4, 8
    for i in range(40):
        episode = tasks.sample(i)
        assert episode.support_labels == episode.query_labels == list(range(6))
        for anchor, partner in zip(episode.support_texts, episode.query_texts, strict=True):
            assert anchor != partner and anchor.split()[0] == partner.split()[0]
    restored = NeighbourTaskSampler(texts, n_way=6, neighbours=5, seed=1, augment="none")
    restored.load_state_dict(tasks.state_dict())
    assert [restored.sample(i) for i in range(5)] == [tasks.sample(i) for i in range(5)]
    config = UnlabeledConfig(source="x.txt", tasks="cluster+neighbours")
    assert config.task_kinds == ["cluster", "neighbours"]


# ------------------------------------------------------------ meta-training with them


@pytest.mark.slow
def test_meta_training_on_labeled_mixture_plus_unlabeled_tasks(tiny_model_dir, tmp_path):
    from conftest import tiny_overrides

    import metalm

    tickets = tmp_path / "tickets.txt"
    tickets.write_text("\n".join(_texts(10)))
    emails = tmp_path / "emails.txt"
    emails.write_text("\n".join(_texts(5)[:24]))
    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{
            "train.steps": 6,
            "data.train": "[clinc150, {source: examples/intents.csv, weight: 0.5}]",
            # two sources of texts without labels, each with its own cluster tasks
            "data.unlabeled": f"[{{source: {tickets}, clusters: 6, n_way: 4, refresh_every: 3}}, "
            f"{{source: {emails}, clusters: 3, n_way: 3, weight: 0.5}}]",
            "episode.hard_negatives": 0.5,
            "episode.hard_refresh_every": 2,
            "episode.q_queries": 1,
        },
    )
    report = metalm.run(load_config(None, overrides), progress=False)
    run_dir = tmp_path / "run"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in log)
    saved = run_dir / "checkpoint" / "samplers.safetensors"
    from safetensors.torch import load_file

    state = load_file(saved)
    # hard-negative neighbours of both labeled sources, and each source's cluster assignments
    assert {"0.neighbours", "1.neighbours", "2.assignments", "3.assignments"} <= set(state)
    assert state["2.assignments"].shape == (60,) and state["3.assignments"].shape == (24,)
    assert set(state["3.assignments"].tolist()) <= {0, 1, 2}
    assert report.find("protonet", "3-way 1-shot") is not None


@pytest.mark.slow
def test_real_minilm_meta_trains_on_a_mixture_and_unlabeled_banking_texts(tmp_path):
    from conftest import run_real_minilm_briefly
    from safetensors.torch import load_file

    intents = Path(__file__).parents[2] / "examples" / "intents.csv"
    run_real_minilm_briefly(
        "protonet",
        [
            f"data.train=[clinc150, {{source: {intents}, weight: 0.5}}]",
            "data.unlabeled={source: banking77, split: train, max_texts: 400, clusters: 20,"
            " n_way: 5, refresh_every: 1, tasks: cluster+neighbours}",
            "episode.hard_negatives=1.0",
        ],
        tmp_path,
    )
    state = load_file(Path(tmp_path) / "run" / "checkpoint" / "samplers.safetensors")
    # both labeled sources' neighbour tables, the clusters and the text neighbours
    assert set(state) == {"0.neighbours", "1.neighbours", "2.assignments", "3.neighbours"}
    assert state["2.assignments"].shape == (400,) and state["3.neighbours"].shape == (400, 10)


@pytest.mark.slow
def test_meta_pretraining_on_unlabeled_texts_alone_then_adapting(tiny_model_dir, tmp_path):
    """No labels at all: meta-train on tickets, export, then adapt from the first labels."""
    from conftest import tiny_overrides

    import metalm
    from metalm import FewShotClassifier
    from metalm.runs.existing import export_run

    tickets = tmp_path / "tickets.txt"
    tickets.write_text("\n".join(_texts(20)))
    extra = {
        "train.steps": 4,
        "data.train": "[]",
        "data.test": "null",
        "eval.settings": "[]",
        "data.unlabeled": f"{{source: {tickets}, clusters: 6, n_way: 4}}",
    }
    report = metalm.run(load_config(None, tiny_overrides(tiny_model_dir, tmp_path, **extra)),
                        progress=False)  # fmt: skip
    assert report.results == []
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    export_run(tmp_path / "run", tmp_path / "model")
    clf = FewShotClassifier.from_pretrained(tmp_path / "model")
    clf.adapt(["card question", "loan question", "card help", "loan help"], ["c", "l", "c", "l"])
    assert clf.predict(["card please"])[0] in ("c", "l")
    # without labeled sources or unlabeled texts there is nothing to meta-train on
    with pytest.raises(MetalmError, match=r"data\.unlabeled to meta-train"):
        load_config(None, ["data.train=[]"])
    with pytest.raises(MetalmError, match="no test data"):
        extra["eval.settings"] = "[{n_way: 2}]"
        metalm.run(load_config(None, tiny_overrides(tiny_model_dir, tmp_path / "x", **extra)))
