"""`metalm.data.episodes`: N-way K-shot and full-way episodes, their invariants and
determinism, variable way/shot, all-way and hard-negative episodes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter, defaultdict
from functools import cache

import numpy as np
import pytest
import torch
from learner_tools import BUILTIN_SIZES, N_CLASSES, cached_builtin, toy_dataset

from metalm.data import (
    EpisodeSampler,
    LabeledTextDataset,
    builtin_dataset,
    full_way_episode,
)
from metalm.data.mixture import MixtureSampler
from metalm.errors import MetalmError


@cache
def _class_texts(name: str, split: str) -> dict[str, Counter]:
    """Per class, the multiset of its texts in the dataset."""
    ds = cached_builtin(name, split)
    out: dict[str, Counter] = defaultdict(Counter)
    for text, label in zip(ds.texts, ds.labels, strict=True):
        out[label][text] += 1
    return dict(out)


def _episode_json(episodes) -> bytes:
    payload = [dataclasses.asdict(ep) for ep in episodes]
    return json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


SAMPLER_CASES = [
    # (dataset, split, n_way, k_shot, q_queries, number of episodes checked)
    ("banking77", "test", 5, 1, 5, 200),
    ("banking77", "test", 10, 5, 10, 100),
    ("banking77", "test", 77, 10, 30, 10),  # every class; 40 of 40 rows per class used
    ("clinc150", "train", 5, 5, 15, 200),
    ("clinc150", "train", 20, 1, 3, 100),
]


@pytest.mark.parametrize(("name", "split", "n", "k", "q", "episodes"), SAMPLER_CASES)
def test_episode_invariants_on_builtin_data(name, split, n, k, q, episodes):
    ds = cached_builtin(name, split)
    class_texts = _class_texts(name, split)
    sampler = EpisodeSampler(ds, n, k, q, seed=3)
    for index in range(episodes):
        ep = sampler.sample(index)

        # N distinct classes, all real classes of the dataset
        assert ep.n_way == n
        assert len(set(ep.label_names)) == n
        assert set(ep.label_names) <= set(ds.classes)

        # K support and Q query per class, labels exactly 0..N-1
        assert len(ep.support_texts) == len(ep.support_labels) == n * k
        assert len(ep.query_texts) == len(ep.query_labels) == n * q
        assert Counter(ep.support_labels) == dict.fromkeys(range(n), k)
        assert Counter(ep.query_labels) == dict.fromkeys(range(n), q)

        # label_names maps each label back to the original class of every text
        per_class: dict[int, list[str]] = defaultdict(list)
        support_by_class: dict[int, set[str]] = defaultdict(set)
        for text, label in zip(ep.support_texts, ep.support_labels, strict=True):
            assert text in class_texts[ep.label_names[label]], (index, text)
            per_class[label].append(text)
            support_by_class[label].add(text)
        for text, label in zip(ep.query_texts, ep.query_labels, strict=True):
            assert text in class_texts[ep.label_names[label]], (index, text)
            per_class[label].append(text)

        for label, texts in per_class.items():
            available = class_texts[ep.label_names[label]]
            # Never more copies of a text than the class has rows: support and query
            # are distinct rows even where the data holds duplicate texts.
            assert not Counter(texts) - available, (index, ep.label_names[label])
            if all(count == 1 for count in available.values()):
                # no duplicate texts in this class, so no text may repeat in the episode
                assert len(set(texts)) == len(texts) == k + q
                queries = {
                    t
                    for t, lab in zip(ep.query_texts, ep.query_labels, strict=True)
                    if lab == label
                }
                assert not support_by_class[label] & queries


def test_episodes_cover_all_classes_and_vary():
    ds = cached_builtin("banking77", "test")
    sampler = EpisodeSampler(ds, 5, 1, 5, seed=0)
    eps = [sampler.sample(i) for i in range(300)]
    seen = {name for ep in eps for name in ep.label_names}
    assert seen == set(ds.classes)
    # episodes are not all the same class set, nor the same class order
    assert len({tuple(sorted(ep.label_names)) for ep in eps}) > 250
    assert len({tuple(ep.support_texts) for ep in eps}) == len(eps)


def test_class_with_exactly_k_plus_q_rows_uses_every_row():
    ds = toy_dataset({"a": 4, "b": 4, "c": 9})
    sampler = EpisodeSampler(ds, 3, 1, 3, seed=1)
    for index in range(20):
        ep = sampler.sample(index)
        for label, name in enumerate(ep.label_names):
            got = [
                t
                for t, lab in zip(ep.support_texts, ep.support_labels, strict=True)
                if lab == label
            ]
            got += [
                t for t, lab in zip(ep.query_texts, ep.query_labels, strict=True) if lab == label
            ]
            own = [t for t, c in zip(ds.texts, ds.labels, strict=True) if c == name]
            assert len(got) == 4
            assert set(got) <= set(own)
            if len(own) == 4:
                assert sorted(got) == sorted(own)


def test_iteration_yields_consecutive_indices():
    sampler = EpisodeSampler(cached_builtin("clinc150", "train"), 5, 2, 2, seed=11)
    it = iter(sampler)
    assert [next(it) for _ in range(6)] == [sampler.sample(i) for i in range(6)]


def test_same_seed_and_index_give_same_episode_in_any_order():
    ds = cached_builtin("banking77", "test")
    a = EpisodeSampler(ds, 5, 2, 3, seed=7)
    # a second instance, on a separately built dataset object
    b = EpisodeSampler(builtin_dataset("banking77", "test"), 5, 2, 3, seed=7)
    indices = list(range(40))
    forward = {i: a.sample(i) for i in indices}
    shuffled = indices[:]
    random.Random(5).shuffle(shuffled)
    for i in shuffled:
        assert b.sample(i) == forward[i]
    for i in reversed(indices):
        assert a.sample(i) == forward[i]  # resampling on the same instance too
    # and different indices give different episodes
    assert len({_episode_json([ep]) for ep in forward.values()}) == len(indices)


def test_different_seeds_give_different_episodes():
    ds = cached_builtin("clinc150", "train")
    by_seed = {
        seed: [EpisodeSampler(ds, 5, 1, 5, seed=seed).sample(i) for i in range(5)]
        for seed in (0, 1, 2, 12345)
    }
    keys = {seed: _episode_json(eps) for seed, eps in by_seed.items()}
    assert len(set(keys.values())) == len(keys)
    for i in range(5):
        assert by_seed[0][i] != by_seed[1][i]


def test_episode_sampling_is_pinned_across_machines():
    # Episode i is drawn from numpy.random.default_rng([seed, i]): the SeedSequence hashes the
    # integer list with a fixed, documented algorithm, PCG64 is a fixed bit generator, and
    # Generator.choice works on integers only, so the result does not depend on the platform,
    # the word size, the Python hash seed, or the order episodes are asked for. This pin
    # therefore holds on every machine; if it fails after a numpy upgrade (numpy does not
    # promise Generator.choice streams across versions) or a change to EpisodeSampler,
    # published episode-based numbers are no longer reproducible and that must be a
    # deliberate, documented change.
    sampler = EpisodeSampler(cached_builtin("banking77", "test"), 5, 1, 2, seed=0)
    digest = hashlib.sha256(_episode_json([sampler.sample(0), sampler.sample(7)])).hexdigest()
    assert digest == "47b70c92941932179a37e8b34885a44e5250c4a5a48d51fcf1e25836a9a63b7d"


@pytest.mark.parametrize("name", ["banking77", "clinc150"])
def test_full_way_episode(name):
    support, query = cached_builtin(name, "train_5"), cached_builtin(name, "test")
    ep = full_way_episode(support, query)
    n = N_CLASSES[name]
    assert ep.n_way == n
    assert ep.label_names == support.classes
    assert len(ep.support_texts) == len(ep.support_labels) == 5 * n
    assert Counter(ep.support_labels) == dict.fromkeys(range(n), 5)
    assert len(ep.query_texts) == len(ep.query_labels) == BUILTIN_SIZES[name, "test"]
    assert list(ep.support_texts) == list(support.texts)
    assert list(ep.query_texts) == list(query.texts)
    assert [ep.label_names[i] for i in ep.support_labels] == list(support.labels)
    assert [ep.label_names[i] for i in ep.query_labels] == list(query.labels)
    assert set(ep.query_labels) == set(range(n))


def test_full_way_episode_rejects_query_classes_without_support():
    support = cached_builtin("banking77", "train_5")
    dropped = support.classes[10]
    partial = support.subset([c for c in support.classes if c != dropped])
    with pytest.raises(MetalmError, match=f"\\['{dropped}'\\] have no support examples"):
        full_way_episode(partial, cached_builtin("banking77", "test"))


def test_class_too_small_for_k_plus_q():
    ds = toy_dataset({"a": 6, "b": 6, "rare": 3, "c": 6})
    with pytest.raises(MetalmError, match="class 'rare' has 3 examples but 2-shot with 2 queries"):
        EpisodeSampler(ds, 3, 2, 2)
    # real data: banking77/valid has 20 rows per class
    with pytest.raises(MetalmError, match=r"needs 21 .*77 classes are short"):
        EpisodeSampler(cached_builtin("banking77", "valid"), 5, 10, 11)


def test_n_way_larger_than_number_of_classes():
    with pytest.raises(MetalmError, match="78-way episodes need 78 classes but it has 77"):
        EpisodeSampler(cached_builtin("banking77", "test"), 78, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_shot": 0}, "k_shot must be an integer >= 1, got 0"),
        ({"k_shot": -1}, "k_shot must be an integer >= 1"),
        ({"n_way": 1}, "n_way must be an integer >= 2, got 1"),
        ({"q_queries": 0}, "q_queries must be an integer >= 1, got 0"),
        ({"k_shot": 1.5}, "k_shot must be an integer >= 1, got 1.5"),
    ],
)
def test_bad_episode_shape(kwargs, message):
    args = {"n_way": 5, "k_shot": 1, "q_queries": 1} | kwargs
    with pytest.raises(MetalmError, match=message):
        EpisodeSampler(cached_builtin("banking77", "test"), **args)


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


def test_all_way_episodes_hold_every_class():
    ds = builtin_dataset("banking77", "test")
    sampler = EpisodeSampler(ds, "all", 1, 2, seed=0)
    for i in range(3):
        episode = sampler.sample(i)
        assert sorted(episode.label_names) == ds.classes
        assert Counter(episode.query_labels) == dict.fromkeys(range(77), 2)


def test_variable_way_and_shot_cover_their_ranges_and_are_deterministic():
    ds = toy_dataset({f"c{i}": 12 for i in range(20)})
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
    ds = toy_dataset({f"c{i}": 6 for i in range(6)})
    fixed = EpisodeSampler(ds, 4, 2, 1, seed=1)
    ranged = EpisodeSampler(ds, [4, 4], [2, 2], 1, seed=1)
    assert [fixed.sample(i) for i in range(10)] == [ranged.sample(i) for i in range(10)]
    capped = EpisodeSampler(ds, [3, 50], 1, 1, seed=0)  # only 6 classes
    assert max(capped.sample(i).n_way for i in range(100)) == 6
    with pytest.raises(MetalmError, match="needs 7"):  # the largest K + Q must fit
        EpisodeSampler(ds, 3, [1, 5], 2)


def test_hard_negative_episodes_are_nearest_classes_of_an_anchor():
    ds = toy_dataset({f"c{i}": 6 for i in range(30)})
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
    ds = toy_dataset({f"c{i}": 6 for i in range(30)})
    embed, calls = _line_embed(ds)
    sampler = EpisodeSampler(ds, 3, 1, 1, seed=2, hard_negatives=0.5, refresh_every=5)
    for step in range(12):
        sampler.on_step(step, embed)
    assert len(calls) == 3  # steps 0, 5, 10
    near = sum(np.ptp([int(n[1:]) for n in sampler.sample(i).label_names]) <= 8 for i in range(400))
    # about half hard (span <= 8 always), half random (span <= 8 about 8% of the time)
    assert 0.45 < near / 400 < 0.65


def test_hard_negative_state_round_trips_to_identical_episodes():
    ds = toy_dataset({f"c{i}": 6 for i in range(30)})
    embed, _ = _line_embed(ds)
    a = EpisodeSampler(ds, 4, 1, 1, seed=0, hard_negatives=0.7, refresh_every=10)
    a.on_step(0, embed)
    b = EpisodeSampler(ds, 4, 1, 1, seed=0, hard_negatives=0.7, refresh_every=10)
    b.load_state_dict(a.state_dict())
    b.on_step(3, embed)  # not a refresh step: keeps the loaded neighbours
    assert [a.sample(i) for i in range(30)] == [b.sample(i) for i in range(30)]
    mix = MixtureSampler([a, EpisodeSampler(ds, 3, 1, 1, seed=4)], [1, 1])
    assert set(mix.state_dict()) == {"0.neighbours"}


def test_a_negative_episode_index_is_a_clear_error(capsys):
    from metalm.cli import main

    sampler = EpisodeSampler(builtin_dataset("banking77", "test"), 3, 1, 1)
    with pytest.raises(MetalmError, match="episode index must be >= 0, got -1"):
        sampler.sample(-1)
    assert main(["-q", "sample", "--index", "-1"]) == 2
    assert "episode index must be >= 0" in capsys.readouterr().err
