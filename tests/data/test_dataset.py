"""`metalm.data.dataset`: built-in, CSV, JSONL and Hugging Face datasets, and the clear
errors bad files get."""

from __future__ import annotations

import json

import datasets
import pytest
from learner_tools import (
    BUILTIN_SIZES,
    N_CLASSES,
    cached_builtin,
    toy_dataset,
    write_jsonl,
)
from run_tools import write_csv

from metalm.data import (
    DataSource,
    EpisodeSampler,
    LabeledTextDataset,
    builtin_dataset,
    from_hf,
    load_csv,
    load_jsonl,
)
from metalm.errors import MetalmError


def _hf_rows():
    ds = cached_builtin("banking77", "train_5")
    return list(ds.texts[:40]), list(ds.labels[:40])


@pytest.mark.parametrize(("name", "split"), list(BUILTIN_SIZES))
def test_builtin_dataset_sizes(name, split):
    ds = cached_builtin(name, split)
    assert len(ds) == BUILTIN_SIZES[name, split]
    assert len(ds.texts) == len(ds.labels)
    assert len(ds.classes) == N_CLASSES[name]
    assert ds.name == f"{name}/{split}"
    assert all(t.strip() for t in ds.texts)
    # every split has the same class set as train
    assert ds.classes == cached_builtin(name, "train").classes
    if split in ("train_5", "train_10"):
        shots = int(split.split("_")[1])
        assert set(ds.class_counts().values()) == {shots}
        assert len(ds) == shots * N_CLASSES[name]
        # the K-shot subsets are drawn from train
        train = cached_builtin(name, "train")
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
    write_csv(path, rows, ["id", "utterance", "intent"])
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


def test_drop_small_classes_warns_and_drops():
    ds = toy_dataset({"a": 6, "b": 6, "rare": 3, "c": 6})
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
    write_csv(csv_path, [("ok", "a"), (bad, "b")])
    with pytest.raises(MetalmError, match="row 1 has an empty or whitespace-only text"):
        load_csv(csv_path)
    jsonl_path = tmp_path / "d.jsonl"
    write_jsonl(jsonl_path, [{"text": "ok", "label": "a"}, {"text": bad, "label": "b"}])
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
    write_csv(csv_path, [("x", "y")], [kept, "other"])
    with pytest.raises(MetalmError, match=f"row 0 has no column '{missing}'; columns are"):
        load_csv(csv_path)
    jsonl_path = tmp_path / "d.jsonl"
    write_jsonl(jsonl_path, [{"text": "t", "label": "l"}, {kept: "x", "other": "y"}])
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


def test_subset_with_unknown_class():
    with pytest.raises(MetalmError, match="unknown classes \\['nope'\\]"):
        cached_builtin("banking77", "test").subset(["nope", "card_arrival"])
