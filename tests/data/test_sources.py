"""`metalm.data.sources`: a dataset source by built-in name, file suffix or `hf:`."""

from __future__ import annotations

import csv
import json

import pytest

from metalm.data import (
    DataSource,
)
from metalm.errors import MetalmError


def _write_csv(path, header, rows) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_jsonl(path, objects) -> None:
    path.write_text(
        "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8"
    )


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
