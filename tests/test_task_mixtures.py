"""Task mixtures, many-way and variable-shape episodes, hard-negative class sampling."""

from __future__ import annotations

import csv
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from metalm.config import load_config
from metalm.data import EpisodeSampler, LabeledTextDataset, builtin_dataset
from metalm.data.mixture import MixtureSampler, mixture
from metalm.errors import MetalmError
from metalm.tasks import build_pools


def _toy(counts: dict[str, int]) -> LabeledTextDataset:
    texts, labels = [], []
    for name, n in counts.items():
        texts += [f"{name} example {i}" for i in range(n)]
        labels += [name] * n
    return LabeledTextDataset(texts, labels, name="toy")


def _write_csv(path: Path, classes: int, per_class: int, prefix: str) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for c in range(classes):
            for i in range(per_class):
                writer.writerow([f"{prefix} text {i} of class {c}", f"{prefix}-{c}"])
    return path


# --------------------------------------------------------------------------- mixtures


def test_mixture_config_splits_each_source_and_keeps_episodes_in_one_label_space(tmp_path):
    other = _write_csv(tmp_path / "other.csv", classes=10, per_class=8, prefix="o")
    config = load_config(
        None,
        [
            f"data.train=[clinc150, {{source: {other}, weight: 3}}]",
            "data.classes.fractions=[0.6, 0.2, 0.2]",
            "episode.n_way=3",
            "episode.k_shot=2",
            "episode.q_queries=2",
        ],
    )
    pools = build_pools(config.data)
    (clinc, w1), (mine, w3) = pools.train_parts
    assert (w1, w3) == (1.0, 3.0)
    assert len(pools.val_parts) == 2
    for train_part, val_part in zip([clinc, mine], pools.val_parts, strict=True):
        assert train_part.classes and val_part.classes
        assert not set(train_part.classes) & set(val_part.classes)  # class-disjoint per source
    # the test set is another dataset (banking77): no source keeps a test share
    assert len(clinc.classes) + len(pools.val_parts[0].classes) == 150
    assert len(mine.classes) + len(pools.val_parts[1].classes) == 10

    sampler = pools.train_sampler(config.episode, seed=0)
    assert isinstance(sampler, MixtureSampler)
    sources = Counter()
    for i in range(800):
        episode = sampler.sample(i)
        names = set(episode.label_names)
        inside = [names <= set(part.classes) for part in (clinc, mine)]
        assert sum(inside) == 1, episode.label_names  # all classes from exactly one source
        sources[inside.index(True)] += 1
    # weights 1:3 -> a quarter of the episodes from CLINC150 (binomial sd ~ 0.015)
    assert abs(sources[0] / 800 - 0.25) < 0.06


def test_mixture_is_deterministic_in_seed_and_index():
    a = _toy({f"a{i}": 6 for i in range(8)})
    b = _toy({f"b{i}": 6 for i in range(5)})

    def build():
        return MixtureSampler(
            [EpisodeSampler(a, 3, 1, 2, seed=0), EpisodeSampler(b, 4, 1, 1, seed=1)], [1, 2], 7
        )

    first, second = build(), build()
    indices = list(range(60))
    forward = [first.sample(i) for i in indices]
    random.Random(0).shuffle(indices)
    for i in indices:
        assert second.sample(i) == forward[i]
    other_seed = MixtureSampler(second.samplers, [1, 2], seed=8)
    assert [other_seed.source_of(i) for i in range(60)] != [first.source_of(i) for i in range(60)]


def test_one_source_gives_the_same_episodes_as_before():
    config = load_config(None, ["episode.n_way=5", "episode.k_shot=1", "episode.q_queries=2"])
    pools = build_pools(config.data)
    sampler = pools.train_sampler(config.episode, seed=3)
    plain = EpisodeSampler(pools.train, 5, 1, 2, seed=3)
    assert isinstance(sampler, EpisodeSampler)  # no mixture wrapper for a single source
    assert [sampler.sample(i) for i in range(20)] == [plain.sample(i) for i in range(20)]
    assert mixture([plain], [5.0]) is plain


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=[]"], "empty list"),
        (["data.train=[clinc150, banking77]", "data.val={source: clinc150}"], "drop data.val"),
        (["data.train=[{source: clinc150, weight: 0}]"], "weight must be > 0"),
        (["data.train=[clinc150]", "data.train.3.weight=2"], "index it with data.train.0"),
    ],
)
def test_bad_mixture_configs(overrides, message):
    with pytest.raises(MetalmError, match=message):
        load_config(None, overrides)


def test_listed_classes_must_exist_in_some_source(tmp_path):
    other = _write_csv(tmp_path / "other.csv", classes=4, per_class=6, prefix="o")
    config = load_config(
        None,
        [f"data.train=[clinc150, {other}]", "data.classes.train=[o-0, o-1, balance, nope]"],
    )
    with pytest.raises(MetalmError, match="nope"):
        build_pools(config.data)


# ---------------------------------------------------------------- many-way, variable shapes


def test_all_way_episodes_hold_every_class():
    ds = builtin_dataset("banking77", "test")
    sampler = EpisodeSampler(ds, "all", 1, 2, seed=0)
    for i in range(3):
        episode = sampler.sample(i)
        assert sorted(episode.label_names) == ds.classes
        assert Counter(episode.query_labels) == dict.fromkeys(range(77), 2)


def test_variable_way_and_shot_cover_their_ranges_and_are_deterministic():
    ds = _toy({f"c{i}": 12 for i in range(20)})
    sampler = EpisodeSampler(ds, [3, 8], [1, 4], 2, seed=5)
    ways, shots = set(), set()
    for i in range(300):
        episode = sampler.sample(i)
        n = episode.n_way
        k = len(episode.support_texts) // n
        assert 3 <= n <= 8 and 1 <= k <= 4
        assert Counter(episode.support_labels) == dict.fromkeys(range(n), k)
        assert len(episode.query_texts) == 2 * n
        ways.add(n)
        shots.add(k)
    assert ways == set(range(3, 9)) and shots == {1, 2, 3, 4}
    again = EpisodeSampler(ds, [3, 8], [1, 4], 2, seed=5)
    assert [again.sample(i) for i in (7, 3, 250)] == [sampler.sample(i) for i in (7, 3, 250)]


def test_a_fixed_range_equals_the_fixed_size_and_ranges_are_capped():
    ds = _toy({f"c{i}": 6 for i in range(6)})
    fixed = EpisodeSampler(ds, 4, 2, 1, seed=1)
    ranged = EpisodeSampler(ds, [4, 4], [2, 2], 1, seed=1)
    assert [fixed.sample(i) for i in range(10)] == [ranged.sample(i) for i in range(10)]
    capped = EpisodeSampler(ds, [3, 50], 1, 1, seed=0)  # only 6 classes
    assert max(capped.sample(i).n_way for i in range(100)) == 6
    with pytest.raises(MetalmError, match="needs 7"):  # the largest K + Q must fit
        EpisodeSampler(ds, 3, [1, 5], 2)


def test_episode_config_accepts_all_and_ranges():
    config = load_config(None, ["episode.n_way=all", "episode.k_shot=[1, 5]"])
    assert config.episode.n_way == "all" and config.episode.k_shot == [1, 5]
    for bad, message in (("episode.n_way=most", "'all'"), ("episode.k_shot=[4, 2]", "min <= max")):
        with pytest.raises(MetalmError, match=message):
            load_config(None, [bad])


# --------------------------------------------------------------------------- hard negatives


def _line_embed(ds: LabeledTextDataset):
    """Class c's texts sit at angle c·3° on a circle: class c's nearest are c±1, c±2, ..."""
    angle = {name: np.deg2rad(3.0 * int(name[1:])) for name in ds.classes}
    by_text = dict(zip(ds.texts, ds.labels, strict=True))
    calls = []

    def embed(texts):
        calls.append(len(texts))
        rows = [[np.cos(angle[by_text[t]]), np.sin(angle[by_text[t]])] for t in texts]
        return torch.tensor(rows, dtype=torch.float32)

    return embed, calls


def test_hard_negative_episodes_are_nearest_classes_of_an_anchor():
    ds = _toy({f"c{i}": 6 for i in range(30)})
    embed, _ = _line_embed(ds)
    sampler = EpisodeSampler(ds, 4, 1, 1, seed=0, hard_negatives=1.0, refresh_every=10)
    before = [sampler.sample(i) for i in range(50)]
    spans_before = [np.ptp([int(n[1:]) for n in ep.label_names]) for ep in before]
    sampler.on_step(0, embed)
    spans = []
    for i in range(200):
        ids = sorted(int(n[1:]) for n in sampler.sample(i).label_names)
        # one anchor plus 3 among its 6 nearest: every class within 6 steps of another
        assert any(all(abs(c - a) <= 6 for c in ids) for a in ids), ids
        spans.append(np.ptp(ids))
    assert np.mean(spans) < 7 < np.mean(spans_before)  # random episodes spread out


def test_hard_negative_share_and_refresh_schedule():
    ds = _toy({f"c{i}": 6 for i in range(30)})
    embed, calls = _line_embed(ds)
    sampler = EpisodeSampler(ds, 3, 1, 1, seed=2, hard_negatives=0.5, refresh_every=5)
    for step in range(12):
        sampler.on_step(step, embed)
    assert len(calls) == 3  # steps 0, 5, 10
    near = sum(np.ptp([int(n[1:]) for n in sampler.sample(i).label_names]) <= 8 for i in range(400))
    # about half hard (span <= 8 always), half random (span <= 8 about 8% of the time)
    assert 0.45 < near / 400 < 0.65


def test_hard_negative_state_round_trips_to_identical_episodes():
    ds = _toy({f"c{i}": 6 for i in range(30)})
    embed, _ = _line_embed(ds)
    a = EpisodeSampler(ds, 4, 1, 1, seed=0, hard_negatives=0.7, refresh_every=10)
    a.on_step(0, embed)
    b = EpisodeSampler(ds, 4, 1, 1, seed=0, hard_negatives=0.7, refresh_every=10)
    b.load_state_dict(a.state_dict())
    b.on_step(3, embed)  # not a refresh step: keeps the loaded neighbours
    assert [a.sample(i) for i in range(30)] == [b.sample(i) for i in range(30)]
    mix = MixtureSampler([a, EpisodeSampler(ds, 3, 1, 1, seed=4)], [1, 1])
    assert set(mix.state_dict()) == {"0.neighbours"}
