"""Where a dataset comes from: a built-in name, a CSV/JSONL path, or `hf:<name-or-dir>`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from metalm.data.dataset import (
    BUILTIN_DATASETS,
    LabeledTextDataset,
    builtin_dataset,
    from_hf,
    load_csv,
    load_jsonl,
)
from metalm.errors import MetalmError


@dataclass
class DataSource:
    """One labeled text source.

    `source` is a built-in name (`banking77`, `clinc150`), a `.csv`/`.jsonl` path, or
    `hf:<hub name or local dataset directory>`. `weight` is its share of meta-training
    episodes when `data.train` is a list of sources.

    Example:
        >>> DataSource("banking77", split="train_5").load().name
        'banking77/train_5'
    """

    source: str = "clinc150"
    split: str = "train"
    text_column: str = "text"
    label_column: str = "label"
    hf_config: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise MetalmError(f"{self.source}: a source's weight must be > 0, got {self.weight}")

    def load(self) -> LabeledTextDataset:
        return load_source(self)

    def with_split(self, split: str) -> DataSource:
        return dataclasses.replace(self, split=split)

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_DATASETS


def load_source(spec: DataSource) -> LabeledTextDataset:
    """Load `spec`; unknown names and unreadable files raise `MetalmError`."""
    if spec.source.startswith("hf:"):
        return from_hf(
            spec.source[3:], spec.split, spec.text_column, spec.label_column, spec.hf_config
        )
    if spec.is_builtin:
        return builtin_dataset(spec.source, spec.split)
    suffix = Path(spec.source).suffix.lower()
    if suffix == ".csv":
        return load_csv(spec.source, spec.text_column, spec.label_column)
    if suffix in (".jsonl", ".json"):
        return load_jsonl(spec.source, spec.text_column, spec.label_column)
    raise MetalmError(
        f"unknown dataset {spec.source!r}; give a built-in name {sorted(BUILTIN_DATASETS)}, "
        "a .csv or .jsonl file, or hf:<name or directory>"
    )


@dataclass
class EvalSource(DataSource):
    """The test data: one source, or (for the full-way protocol on files of your own) a
    `support` source and a `query` source.

    With `query`, the test texts are the query source's (`source`/`split` are then unused);
    without, they are this source's own, split `test` unless named
    (`data.test=clinc150` is CLINC150's `test` split; `{source: clinc150, split: valid}`
    its validation split). With `support`, one full-way episode is built:
    every support example against every query text (label sets must match). A plain
    string for `support`/`query` is a path or name that takes this source's columns, with
    split `train` (support) or `test` (query).

    Example:
        >>> spec = EvalSource(support="examples/intents_train_3.csv",
        ...                   query="examples/intents_test.csv")
        >>> spec.query_source().source, spec.support.text_column
        ('examples/intents_test.csv', 'text')
    """

    source: str = ""
    split: str = "test"  # the test data: `data.test=clinc150` means CLINC150's test split
    support: str | DataSource | None = None
    query: str | DataSource | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.support = self._as_source(self.support, "train")
        self.query = self._as_source(self.query, "test")
        if not self.source and self.query is None:
            raise MetalmError(
                "data.test: name the test data (data.test.source=...) or, for the "
                "full-way protocol on your own files, data.test.support=... and "
                "data.test.query=..."
            )

    def _as_source(self, value: str | DataSource | None, split: str) -> DataSource | None:
        if isinstance(value, str):
            return DataSource(value, split, self.text_column, self.label_column, self.hf_config)
        return value

    def query_source(self) -> DataSource:
        """Where the test texts come from: `query`, else this source itself."""
        if isinstance(self.query, DataSource):
            return self.query
        return DataSource(
            self.source, self.split, self.text_column, self.label_column, self.hf_config
        )
