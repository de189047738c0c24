"""Tests for the data layer: datasets, sources, class splits and episodes.

Everything here runs on the built-in data or on small files written to tmp_path;
no model is loaded.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
from collections import Counter, defaultdict
from functools import cache

import datasets
import pytest

from metalm.data import (
    ClassSplit,
    DataSource,
    EpisodeSampler,
    LabeledTextDataset,
    builtin_dataset,
    explicit_split,
    from_hf,
    full_way_episode,
    load_csv,
    load_jsonl,
    split_classes,
)
from metalm.errors import MetalmError

# --------------------------------------------------------------------------- helpers

BUILTIN_SIZES = {
    ("banking77", "train"): 8622,
    ("banking77", "valid"): 1540,
    ("banking77", "test"): 3080,
    ("banking77", "train_5"): 385,
    ("banking77", "train_10"): 770,
    ("clinc150", "train"): 15000,
    ("clinc150", "valid"): 3000,
    ("clinc150", "test"): 4500,
    ("clinc150", "train_5"): 750,
    ("clinc150", "train_10"): 1500,
}
N_CLASSES = {"banking77": 77, "clinc150": 150}


@cache
def _builtin(name: str, split: str) -> LabeledTextDataset:
    """The built-in datasets are immutable, so tests share one load of each."""
    return builtin_dataset(name, split)


@cache
def _class_texts(name: str, split: str) -> dict[str, Counter]:
    """Per class, the multiset of its texts in the dataset."""
    ds = _builtin(name, split)
    out: dict[str, Counter] = defaultdict(Counter)
    for text, label in zip(ds.texts, ds.labels, strict=True):
        out[label][text] += 1
    return dict(out)


def _episode_json(episodes) -> bytes:
    payload = [dataclasses.asdict(ep) for ep in episodes]
    return json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def _write_csv(path, header, rows) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_jsonl(path, objects) -> None:
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8"
    )


def _toy(counts: dict[str, int]) -> LabeledTextDataset:
    """A dataset with `counts[c]` distinct texts for each class c."""
    texts, labels = [], []
    for c, n in counts.items():
        texts += [f"{c} example {i}" for i in range(n)]
        labels += [c] * n
    return LabeledTextDataset(texts, labels, name="toy")


# --------------------------------------------------------------------------- 1. episode invariants

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
    ds = _builtin(name, split)
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
    ds = _builtin("banking77", "test")
    sampler = EpisodeSampler(ds, 5, 1, 5, seed=0)
    eps = [sampler.sample(i) for i in range(300)]
    seen = {name for ep in eps for name in ep.label_names}
    assert seen == set(ds.classes)
    # episodes are not all the same class set, nor the same class order
    assert len({tuple(sorted(ep.label_names)) for ep in eps}) > 250
    assert len({tuple(ep.support_texts) for ep in eps}) == len(eps)


def test_class_with_exactly_k_plus_q_rows_uses_every_row():
    ds = _toy({"a": 4, "b": 4, "c": 9})
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
    sampler = EpisodeSampler(_builtin("clinc150", "train"), 5, 2, 2, seed=11)
    it = iter(sampler)
    assert [next(it) for _ in range(6)] == [sampler.sample(i) for i in range(6)]


# --------------------------------------------------------------------------- 2. determinism


def test_same_seed_and_index_give_same_episode_in_any_order():
    ds = _builtin("banking77", "test")
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
    ds = _builtin("clinc150", "train")
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
    sampler = EpisodeSampler(_builtin("banking77", "test"), 5, 1, 2, seed=0)
    digest = hashlib.sha256(_episode_json([sampler.sample(0), sampler.sample(7)])).hexdigest()
    assert digest == "47b70c92941932179a37e8b34885a44e5250c4a5a48d51fcf1e25836a9a63b7d"


# --------------------------------------------------------------------------- 3. class splits

FRACTIONS = [(0.6, 0.2, 0.2), (0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (0.8, 0.1, 0.1)]


@pytest.mark.parametrize("fractions", FRACTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_split_classes_is_a_disjoint_partition(fractions, seed):
    classes = _builtin("clinc150", "train").classes
    split = split_classes(classes, fractions, seed=seed)
    parts = (split.train, split.val, split.test)
    n = len(classes)
    assert n == 150
    for a in range(3):
        assert len(set(parts[a])) == len(parts[a])  # no repeats within a part
        for b in range(a + 1, 3):
            assert not set(parts[a]) & set(parts[b])
    assert set().union(*map(set, parts)) == set(classes)
    assert sum(map(len, parts)) == n
    assert len(split.train) == round(fractions[0] * n)
    for part, fraction in zip(parts, fractions, strict=True):
        assert abs(len(part) - fraction * n) <= 1
    # same seed, same split (also from a shuffled, duplicated class list)
    assert split_classes(classes, fractions, seed=seed) == split
    noisy = list(reversed(classes)) + classes[:10]
    assert split_classes(noisy, fractions, seed=seed) == split


def test_split_classes_depends_on_seed():
    classes = _builtin("clinc150", "train").classes
    trains = {tuple(split_classes(classes, seed=seed).train) for seed in range(6)}
    assert len(trains) == 6


def test_episodes_from_a_split_stay_in_their_classes():
    ds = _builtin("clinc150", "train")
    split = split_classes(ds.classes, (0.6, 0.2, 0.2), seed=3)
    for part in (split.train, split.val, split.test):
        sampler = EpisodeSampler(ds.subset(part), 5, 1, 2, seed=0)
        for i in range(30):
            assert set(sampler.sample(i).label_names) <= set(part)


def test_explicit_split():
    classes = _builtin("banking77", "test").classes
    split = explicit_split(classes, classes[:50], classes[50:60], classes[60:])
    assert split == ClassSplit(classes[:50], classes[50:60], classes[60:])
    with pytest.raises(MetalmError, match="class split val: unknown classes"):
        explicit_split(classes, classes[:50], ["not_a_class"], classes[60:])
    with pytest.raises(MetalmError, match="in both train and test"):
        explicit_split(classes, classes[:50], classes[50:60], classes[49:])


@pytest.mark.parametrize(
    ("train", "val", "test", "pair"),
    [
        (["a", "b"], ["b", "c"], ["d"], "train and val"),
        (["a"], ["b"], ["c", "a"], "train and test"),
        (["a"], ["b", "c"], ["c"], "val and test"),
    ],
)
def test_class_split_rejects_shared_classes(train, val, test, pair):
    with pytest.raises(MetalmError, match=f"in both {pair}; meta-splits must not share"):
        ClassSplit(train, val, test)


@pytest.mark.parametrize(
    "fractions",
    [
        (0.5, 0.3, 0.3),
        (0.6, 0.2, 0.1),
        (1.2, -0.1, -0.1),
        (1.0, -0.5, 0.5),
        (0.5, 0.5),
        (0.25,) * 4,
    ],
)
def test_split_classes_rejects_bad_fractions(fractions):
    with pytest.raises(MetalmError, match="must be three non-negative numbers"):
        split_classes([f"c{i}" for i in range(10)], fractions)


# --------------------------------------------------------------------------- 4. data sources


@pytest.mark.parametrize(("name", "split"), list(BUILTIN_SIZES))
def test_builtin_dataset_sizes(name, split):
    ds = _builtin(name, split)
    assert len(ds) == BUILTIN_SIZES[name, split]
    assert len(ds.texts) == len(ds.labels)
    assert len(ds.classes) == N_CLASSES[name]
    assert ds.name == f"{name}/{split}"
    assert all(t.strip() for t in ds.texts)
    # every split has the same class set as train
    assert ds.classes == _builtin(name, "train").classes
    if split in ("train_5", "train_10"):
        shots = int(split.split("_")[1])
        assert set(ds.class_counts().values()) == {shots}
        assert len(ds) == shots * N_CLASSES[name]
        # the K-shot subsets are drawn from train
        train = _builtin(name, "train")
        assert set(zip(ds.texts, ds.labels, strict=True)) <= set(
            zip(train.texts, train.labels, strict=True)
        )
    # DataSource gives the same dataset
    assert DataSource(name, split=split).load() == ds
    assert DataSource(name).with_split(split).load() == ds


def test_csv_with_custom_columns(tmp_path):
    rows = [
        ("id1", "Hello, world", "greet"),  # comma inside a quoted field
        ("id2", 'She said "hi"\nthen left', "leave"),  # quotes and a line break
        ("id3", "naïve café 😀", "greet"),
        ("id4", "  padded  ", "7"),
    ]
    path = tmp_path / "data.csv"
    _write_csv(path, ["id", "utterance", "intent"], rows)
    ds = load_csv(path, text_column="utterance", label_column="intent")
    assert ds.texts == tuple(r[1] for r in rows)
    assert ds.labels == tuple(r[2] for r in rows)
    assert ds.classes == sorted({r[2] for r in rows})
    assert ds.name == "data.csv"
    spec = DataSource(str(path), text_column="utterance", label_column="intent")
    assert spec.load() == ds


def test_csv_default_columns_crlf_and_bom(tmp_path):
    path = tmp_path / "excel.csv"
    # what Excel writes for "CSV UTF-8": a byte-order mark and CRLF line ends
    path.write_bytes("text,label\r\nfirst,a\r\nsecond,b\r\n".encode("utf-8-sig"))
    ds = load_csv(path)
    assert ds.texts == ("first", "second")
    assert ds.labels == ("a", "b")


def test_jsonl_with_custom_columns(tmp_path):
    objects = [
        {"sentence": "first one", "y": "alpha", "extra": 1},
        {"sentence": "line\u2028separator and \u00e9", "y": "beta"},
        {"sentence": "numbers as labels", "y": 3},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(objects[0]) + "\n\n" + json.dumps(objects[1], ensure_ascii=False) + "\n"
        "   \n" + json.dumps(objects[2]),  # blank lines and no final newline
        encoding="utf-8",
    )
    ds = load_jsonl(path, text_column="sentence", label_column="y")
    assert ds.texts == tuple(o["sentence"] for o in objects)
    assert ds.labels == tuple(str(o["y"]) for o in objects)
    spec = DataSource(str(path), text_column="sentence", label_column="y")
    assert spec.load() == ds


def _hf_rows():
    ds = _builtin("banking77", "train_5")
    return list(ds.texts[:40]), list(ds.labels[:40])


def test_hf_in_memory_dataset_with_string_labels():
    texts, labels = _hf_rows()
    hf = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds = from_hf(hf)
    assert ds.texts == tuple(texts)
    assert ds.labels == tuple(labels)
    # custom columns
    hf2 = datasets.Dataset.from_dict({"utt": texts, "intent": labels})
    assert from_hf(hf2, text_column="utt", label_column="intent").labels == tuple(labels)


def test_hf_class_label_ints_become_names():
    texts, labels = _hf_rows()
    names = sorted(set(labels))
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    ints = [names.index(label) for label in labels]
    hf = datasets.Dataset.from_dict({"text": texts, "label": ints}, features=features)
    ds = from_hf(hf)
    assert ds.labels == tuple(labels)
    assert ds.classes == names


def test_hf_saved_dataset_directory(tmp_path):
    texts, labels = _hf_rows()
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(folder))
    ds = from_hf(str(folder))
    assert ds.texts == tuple(texts)
    assert ds.labels == tuple(labels)
    assert DataSource(f"hf:{folder}").load() == ds


def test_hf_saved_dataset_dict_directory(tmp_path):
    texts, labels = _hf_rows()
    names = sorted(set(labels))
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": texts[:20], "label": [names.index(x) for x in labels[:20]]},
                features=features,
            ),
            "validation": datasets.Dataset.from_dict(
                {"text": texts[20:], "label": [names.index(x) for x in labels[20:]]},
                features=features,
            ),
        }
    )
    folder = tmp_path / "saved_dict"
    dd.save_to_disk(str(folder))
    val = from_hf(str(folder), split="validation")
    assert val.texts == tuple(texts[20:])
    assert val.labels == tuple(labels[20:])
    assert from_hf(str(folder)).texts == tuple(texts[:20])  # default split is train
    assert DataSource(f"hf:{folder}", split="validation").load() == val
    with pytest.raises(
        MetalmError, match="no split 'test'; splits are \\['train', 'validation'\\]"
    ):
        DataSource(f"hf:{folder}", split="test").load()


def test_hf_missing_column():
    hf = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": ["x", "y"]})
    with pytest.raises(MetalmError, match="no column 'text'"):
        from_hf(hf)


@pytest.mark.parametrize("suffix", [".csv", ".CSV", ".jsonl", ".json", ".JSONL"])
def test_datasource_dispatches_by_suffix(tmp_path, suffix):
    texts, labels = ["one", "two", "three"], ["a", "b", "a"]
    path = tmp_path / f"data{suffix}"
    if suffix.lower() == ".csv":
        _write_csv(path, ["text", "label"], zip(texts, labels, strict=True))
    else:
        _write_jsonl(path, [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    ds = DataSource(str(path)).load()
    assert ds.texts == tuple(texts)
    assert ds.labels == tuple(labels)


def test_datasource_unknown_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,b\n", encoding="utf-8")
    with pytest.raises(MetalmError, match=r"unknown dataset .*data.txt"):
        DataSource(str(path)).load()


# --------------------------------------------------------------------------- 5. full-way protocol


@pytest.mark.parametrize("name", ["banking77", "clinc150"])
def test_full_way_episode(name):
    support, query = _builtin(name, "train_5"), _builtin(name, "test")
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
    support = _builtin("banking77", "train_5")
    dropped = support.classes[10]
    partial = support.subset([c for c in support.classes if c != dropped])
    with pytest.raises(MetalmError, match=f"\\['{dropped}'\\] have no support examples"):
        full_way_episode(partial, _builtin("banking77", "test"))


# --------------------------------------------------------------------------- 6. bad input


def test_class_too_small_for_k_plus_q():
    ds = _toy({"a": 6, "b": 6, "rare": 3, "c": 6})
    with pytest.raises(MetalmError, match="class 'rare' has 3 examples but 2-shot with 2 queries"):
        EpisodeSampler(ds, 3, 2, 2)
    # real data: banking77/valid has 20 rows per class
    with pytest.raises(MetalmError, match=r"needs 21 .*77 classes are short"):
        EpisodeSampler(_builtin("banking77", "valid"), 5, 10, 11)


def test_drop_small_classes_warns_and_drops():
    ds = _toy({"a": 6, "b": 6, "rare": 3, "c": 6})
    with pytest.warns(UserWarning, match="dropped 1 classes with fewer than 4 .*'rare'"):
        sampler = EpisodeSampler(ds, 3, 2, 2, drop_small_classes=True)
    assert sampler.dataset.classes == ["a", "b", "c"]
    for i in range(20):
        assert sorted(sampler.sample(i).label_names) == ["a", "b", "c"]
    # dropping can leave too few classes for N
    with (
        pytest.warns(UserWarning, match="dropped 1 classes"),
        pytest.raises(MetalmError, match="4-way episodes need 4 classes but it has 3"),
    ):
        EpisodeSampler(ds, 4, 2, 2, drop_small_classes=True)


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_texts_rejected(tmp_path, bad):
    with pytest.raises(MetalmError, match="row 1 has an empty or whitespace-only text"):
        LabeledTextDataset(["ok", bad], ["a", "b"])
    csv_path = tmp_path / "d.csv"
    _write_csv(csv_path, ["text", "label"], [("ok", "a"), (bad, "b")])
    with pytest.raises(MetalmError, match="row 1 has an empty or whitespace-only text"):
        load_csv(csv_path)
    jsonl_path = tmp_path / "d.jsonl"
    _write_jsonl(jsonl_path, [{"text": "ok", "label": "a"}, {"text": bad, "label": "b"}])
    with pytest.raises(MetalmError, match="row 1 has an empty or whitespace-only text"):
        load_jsonl(jsonl_path)


def test_missing_or_mismatched_labels_rejected():
    with pytest.raises(MetalmError, match="row 1 has no label"):
        LabeledTextDataset(["a", "b"], ["x", ""])
    with pytest.raises(MetalmError, match="3 texts but 2 labels"):
        LabeledTextDataset(["a", "b", "c"], ["x", "y"])
    with pytest.raises(MetalmError, match="the dataset is empty"):
        LabeledTextDataset([], [])


@pytest.mark.parametrize("missing", ["text", "label"])
def test_missing_column_in_csv_and_jsonl(tmp_path, missing):
    kept = {"text": "label", "label": "text"}[missing]
    csv_path = tmp_path / "d.csv"
    _write_csv(csv_path, [kept, "other"], [("x", "y")])
    with pytest.raises(MetalmError, match=f"row 0 has no column '{missing}'; columns are"):
        load_csv(csv_path)
    jsonl_path = tmp_path / "d.jsonl"
    _write_jsonl(jsonl_path, [{"text": "t", "label": "l"}, {kept: "x", "other": "y"}])
    with pytest.raises(MetalmError, match=f"row 1 has no column '{missing}'; columns are"):
        load_jsonl(jsonl_path)


def test_csv_row_with_extra_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,a\nunquoted, comma,b\n", encoding="utf-8")
    with pytest.raises(MetalmError, match="row 1 has more fields than the header"):
        load_csv(path)
    path.write_text("sentence,label\nunquoted, comma,b\n", encoding="utf-8")
    with pytest.raises(MetalmError, match="row 0 has more fields than the header"):
        load_csv(path, text_column="text")


def test_empty_files(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(MetalmError, match="the file has no rows"):
        load_csv(csv_path)
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(MetalmError, match="the file has no rows"):
        load_jsonl(jsonl_path)


@pytest.mark.parametrize("loader", [load_csv, load_jsonl])
def test_non_utf8_file(tmp_path, loader):
    path = tmp_path / "latin1.data"
    content = (
        "text,label\ncaf\xe9,a\n" if loader is load_csv else '{"text": "caf\xe9", "label": "a"}\n'
    )
    path.write_bytes(content.encode("latin-1"))
    start = content.encode("latin-1").index(b"\xe9")
    with pytest.raises(MetalmError, match=f"not valid UTF-8 \\(byte {start}\\)"):
        loader(path)


def test_broken_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": "broken", \n', encoding="utf-8")
    with pytest.raises(MetalmError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(path)
    path.write_text('{"text": "ok", "label": "a"}\n\n["a", "list"]\n', encoding="utf-8")
    with pytest.raises(MetalmError, match=r"d.jsonl:3: each line must be a JSON object"):
        load_jsonl(path)


@pytest.mark.parametrize("filename", ["absent.csv", "absent.jsonl"])
def test_missing_file(tmp_path, filename):
    path = tmp_path / filename
    loader = load_csv if filename.endswith(".csv") else load_jsonl
    with pytest.raises(MetalmError, match=r"absent.* no such file"):
        loader(path)
    with pytest.raises(MetalmError, match="no such file"):
        DataSource(str(path)).load()


def test_unknown_builtin_name_and_split():
    with pytest.raises(MetalmError, match="unknown dataset 'banking78'; built-in datasets are"):
        builtin_dataset("banking78")
    with pytest.raises(MetalmError, match="unknown dataset 'banking78'"):
        DataSource("banking78").load()
    with pytest.raises(MetalmError, match="unknown split 'dev' of clinc150; valid splits are"):
        builtin_dataset("clinc150", "dev")
    with pytest.raises(MetalmError, match="unknown split 'train_1'"):
        DataSource("banking77", split="train_1").load()


def test_n_way_larger_than_number_of_classes():
    with pytest.raises(MetalmError, match="78-way episodes need 78 classes but it has 77"):
        EpisodeSampler(_builtin("banking77", "test"), 78, 1, 1)


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
        EpisodeSampler(_builtin("banking77", "test"), **args)


def test_subset_with_unknown_class():
    with pytest.raises(MetalmError, match="unknown classes \\['nope'\\]"):
        _builtin("banking77", "test").subset(["nope", "card_arrival"])
