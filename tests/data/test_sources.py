"""`metalm.data.sources`: a dataset source by built-in name, file suffix or `hf:`."""

from __future__ import annotations

import pytest
from learner_tools import write_jsonl
from run_tools import write_csv

from metalm.data import (
    DataSource,
)
from metalm.errors import MetalmError


@pytest.mark.parametrize("suffix", [".csv", ".CSV", ".jsonl", ".json", ".JSONL"])
def test_datasource_dispatches_by_suffix(tmp_path, suffix):
    texts, labels = ["one", "two", "three"], ["a", "b", "a"]
    path = tmp_path / f"data{suffix}"
    if suffix.lower() == ".csv":
        write_csv(path, zip(texts, labels, strict=True))
    else:
        write_jsonl(path, [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    ds = DataSource(str(path)).load()
    assert ds.texts == tuple(texts)
    assert ds.labels == tuple(labels)


def test_datasource_unknown_suffix(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,b\n", encoding="utf-8")
    with pytest.raises(MetalmError, match=r"unknown dataset .*data.txt"):
        DataSource(str(path)).load()
