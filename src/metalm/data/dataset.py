"""Labeled text datasets from built-in data, CSV/JSONL files and Hugging Face `datasets`."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from metalm.errors import MetalmError

BUILTIN_DATASETS: dict[str, str] = {"banking77": "banking77", "clinc150": "clinc150"}
BUILTIN_SPLITS = ("train", "valid", "test", "train_5", "train_10")
FIELD_LIMIT = 2**31 - 1  # the largest CSV field csv accepts on every platform


@dataclass(frozen=True)
class LabeledTextDataset:
    """Texts with one string label each; validated on construction.

    Example:
        >>> ds = LabeledTextDataset(["hi", "bye"], ["greet", "leave"], name="toy")
        >>> ds.classes
        ['greet', 'leave']
    """

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    name: str = "dataset"

    def __init__(self, texts: Sequence[str], labels: Sequence[Any], name: str = "dataset"):
        texts = tuple(texts)
        labels = tuple(map(str, labels))
        if len(texts) != len(labels):
            raise MetalmError(f"{name}: {len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise MetalmError(f"{name}: the dataset is empty; give it at least one labeled text")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise MetalmError(
                    f"{name}: row {i} has an empty or whitespace-only text ({text!r}); "
                    "remove it or fill it in"
                )
            if labels[i].strip() in ("", "None", "nan"):
                raise MetalmError(f"{name}: row {i} has no label; every text needs one")
        _set_rows(self, texts, labels, name)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        """Sorted class names."""
        return sorted(set(self.labels))

    def class_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def by_class(self) -> dict[str, list[int]]:
        """Row indices per class, classes sorted, rows in file order."""
        rows: dict[str, list[int]] = {c: [] for c in self.classes}
        for i, label in enumerate(self.labels):
            rows[label].append(i)
        return rows

    def subset(self, classes: Sequence[str], name: str | None = None) -> LabeledTextDataset:
        """The rows whose label is in `classes` (unknown classes are an error)."""
        wanted = set(classes)
        unknown = wanted - set(self.labels)
        if unknown:
            raise MetalmError(
                f"{self.name}: unknown classes {sorted(unknown)[:5]}; "
                f"valid classes are e.g. {self.classes[:5]}"
            )
        keep = [i for i, label in enumerate(self.labels) if label in wanted]
        name = name or self.name
        if not keep:
            raise MetalmError(f"{name}: the dataset is empty; give it at least one labeled text")
        texts, labels = tuple(self.texts[i] for i in keep), tuple(self.labels[i] for i in keep)
        return _valid_rows(texts, labels, name)

    def drop_small_classes(self, minimum: int) -> tuple[LabeledTextDataset, list[str]]:
        """Drop classes with fewer than `minimum` rows; returns the dataset and the dropped."""
        small = [c for c, n in self.class_counts().items() if n < minimum]
        if not small:
            return self, []
        kept = [c for c in self.classes if c not in small]
        if not kept:
            raise MetalmError(f"{self.name}: every class has fewer than {minimum} examples")
        return self.subset(kept), small


def _set_rows(
    dataset: LabeledTextDataset, texts: tuple[str, ...], labels: tuple[str, ...], name: str
) -> None:
    for field, value in (("texts", texts), ("labels", labels), ("name", name)):
        object.__setattr__(dataset, field, value)  # a frozen dataclass


def _valid_rows(texts: tuple[str, ...], labels: tuple[str, ...], name: str) -> LabeledTextDataset:
    """A dataset of rows already checked (a subset of a dataset), without checking again."""
    dataset = object.__new__(LabeledTextDataset)
    _set_rows(dataset, texts, labels, name)
    return dataset


def builtin_dataset(name: str, split: str = "train") -> LabeledTextDataset:
    """A dataset shipped with metalm (`banking77`, `clinc150`); see `metalm datasets`.

    Example:
        >>> builtin_dataset("banking77", "train_5").class_counts()["card_arrival"]
        5
    """
    if name not in BUILTIN_DATASETS:
        raise MetalmError(
            f"unknown dataset {name!r}; built-in datasets are {sorted(BUILTIN_DATASETS)}, "
            "or give a .csv/.jsonl path or hf:<name>"
        )
    if split not in BUILTIN_SPLITS:
        raise MetalmError(f"unknown split {split!r} of {name}; valid splits are {BUILTIN_SPLITS}")
    return _read_builtin(name, split)


@cache  # ten files, read once per process (a dataset is immutable)
def _read_builtin(name: str, split: str) -> LabeledTextDataset:
    folder = resources.files("metalm.data").joinpath("builtin", BUILTIN_DATASETS[name], split)
    texts = folder.joinpath("seq.in").read_text(encoding="utf-8").splitlines()
    labels = folder.joinpath("label").read_text(encoding="utf-8").splitlines()
    return LabeledTextDataset(texts, labels, name=f"{name}/{split}")


def read_text_file(path: Path, newline: str | None = None) -> str:
    """A UTF-8 text file (a byte-order mark is accepted), or a clear error. `newline=""`
    keeps line endings as they are (CSV: a quoted field keeps its own)."""
    try:
        # utf-8-sig: also accept the byte-order mark that Excel and Notepad write.
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except FileNotFoundError:
        raise MetalmError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise MetalmError(
            f"{path}: not valid UTF-8 (byte {err.start}); re-save the file as UTF-8"
        ) from None
    except OSError as err:
        raise MetalmError(f"{path}: cannot read the file ({err.strerror or err})") from None


def _columns(rows: list[dict[str, Any]], path: Path, *columns: str) -> list[list[Any]]:
    """The values of each of `columns`, row by row; a missing column is an error."""
    if not rows:
        raise MetalmError(f"{path}: the file has no rows")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise MetalmError(
                f"{path}: row {i} has no column {missing[0]!r}; columns are {sorted(row)}; "
                "set data.*.text_column / data.*.label_column"
            )
    return [[row[c] for row in rows] for c in columns]


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header row, as mappings."""
    return parse_csv(read_text_file(path, newline=""), path)


def parse_csv(raw: str, where: str | Path) -> list[dict[str, Any]]:
    """The rows of CSV text with a header row, as mappings; a header naming a column
    twice, a row longer than the header, or broken quoting raise a MetalmError."""
    # newline="": quoted fields keep their line breaks (str.splitlines would drop them).
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)  # long documents are texts too (default: 128 KiB)
    try:
        header = reader.fieldnames or []
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise MetalmError(
                f"{where}: the header names column {twice[0]!r} more than once; "
                "rename or drop one of them"
            )
        rows = list(reader)
    except csv.Error as err:
        raise MetalmError(f"{where}: broken CSV ({err}); check its quotes") from None
    for i, row in enumerate(rows):
        if None in row:  # DictReader puts fields beyond the header under the key None
            raise MetalmError(
                f"{where}: row {i} has more fields than the header {reader.fieldnames}; "
                "quote texts that contain commas"
            )
    return rows


def read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, one per non-blank line."""
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other separators raw.
    for number, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MetalmError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise MetalmError(f"{path}:{number}: each line must be a JSON object")
        rows.append(row)
    return rows


def load_csv(path: str | Path, text_column: str = "text", label_column: str = "label"):
    """A dataset from a CSV file with a header row."""
    path = Path(path)
    texts, labels = _columns(read_csv_rows(path), path, text_column, label_column)
    return LabeledTextDataset(texts, labels, name=path.name)


def load_jsonl(path: str | Path, text_column: str = "text", label_column: str = "label"):
    """A dataset from a JSON-lines file, one object per line."""
    path = Path(path)
    texts, labels = _columns(read_jsonl_rows(path), path, text_column, label_column)
    return LabeledTextDataset(texts, labels, name=path.name)


def load_hf_split(source: str, split: str = "train", config_name: str | None = None):
    """One split of a Hugging Face dataset: a hub name or a `save_to_disk` directory."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and (
            (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        ):
            loaded: Any = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(source, config_name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise MetalmError(f"cannot load Hugging Face dataset {source!r}: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MetalmError(f"{source}: no split {split!r}; splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def check_hf_columns(loaded: Any, name: str, *columns: str) -> None:
    for column in columns:
        if column not in loaded.column_names:
            raise MetalmError(
                f"{name}: no column {column!r}; columns are {loaded.column_names}; "
                "set data.*.text_column / data.*.label_column"
            )


def from_hf(
    source: Any,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    config_name: str | None = None,
) -> LabeledTextDataset:
    """A dataset from Hugging Face `datasets`: a hub name, a local directory or a `Dataset`.

    Integer labels of a `ClassLabel` column become their names.

    Example:
        >>> import datasets
        >>> d = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]})
        >>> from_hf(d).classes
        ['x', 'y']
    """
    import datasets

    name = source if isinstance(source, str) else "hf-dataset"
    loaded = load_hf_split(source, split, config_name) if isinstance(source, str) else source
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MetalmError(f"{name}: no split {split!r}; splits are {sorted(loaded)}")
        loaded = loaded[split]
    check_hf_columns(loaded, name, text_column, label_column)
    labels = loaded[label_column]
    feature = loaded.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        labels = [feature.int2str(int(v)) for v in labels]
    return LabeledTextDataset(list(loaded[text_column]), labels, name=name)
