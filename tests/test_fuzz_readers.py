"""Fuzzing the file readers (CSV, JSONL, plain text) with Hypothesis: generated files
with odd encodings, byte-order marks, quotes, empty and huge fields, NUL bytes, ragged
rows and duplicate headers either load as a valid dataset or raise one MetalmError; and
well-formed files round-trip exactly, whatever characters their fields hold."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fuzzing import EXAMPLES, fuzz_settings, valid_or_metalm_error, write_temp
from hypothesis import given
from hypothesis import strategies as st

from metalm.data import load_csv, load_jsonl
from metalm.data.dataset import LabeledTextDataset
from metalm.data.unlabeled import UnlabeledConfig, load_texts
from metalm.errors import MetalmError
from metalm.textfiles import read_labeled, read_texts

SPECIAL = ["\x00", '"', "'", ",", ";", "\t", "\r", "\n", "\r\n", "\ufeff", "\u2028", "\\", " "]
field = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from([*SPECIAL, "a", "text", "label", "é", "😀"]), max_size=12).map(
        "".join
    ),
    st.just(""),
    st.integers(100_000, 250_000).map(lambda n: "x" * n),  # over csv's default field limit
)
column = st.one_of(
    st.sampled_from(["text", "label", "Text", " text", "text ", "", "\ufefftext"]),
    st.text(max_size=8),
)
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]


@st.composite
def csv_bytes(draw: st.DrawFn) -> bytes:
    """A CSV-ish file: a header (maybe with duplicates) and ragged rows, quoted one of
    several ways or joined raw, in one of several encodings, maybe with junk bytes."""
    header = draw(st.lists(column, max_size=4))
    rows = draw(st.lists(st.lists(field, max_size=4), max_size=6))
    style = draw(st.sampled_from(["minimal", "all", "raw"]))
    if style == "raw":
        text = "\n".join(",".join(row) for row in [header, *rows])
    else:
        out = io.StringIO(newline="")
        quoting = csv.QUOTE_ALL if style == "all" else csv.QUOTE_MINIMAL
        writer = csv.writer(out, quoting=quoting)
        writer.writerows([header, *rows])
        text = out.getvalue()
    data = text.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    return data


@st.composite
def jsonl_bytes(draw: st.DrawFn) -> bytes:
    """JSON lines: objects with odd keys and values, other JSON values, broken lines."""
    value = st.one_of(
        field, st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers())
    )
    obj = st.dictionaries(column, value, max_size=3)
    line = st.one_of(
        obj.map(json.dumps),
        st.builds(lambda t, lb: json.dumps({"text": t, "label": lb}), field, value),
        st.one_of(value, st.lists(value)).map(json.dumps),
        st.text(max_size=20),
    )
    lines = draw(st.lists(line, max_size=6))
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    return sep.join(lines).encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


def check_dataset(result: object) -> None:
    """A loaded dataset is valid: texts are non-blank strings, every one has a label."""
    if result is None:
        return
    assert isinstance(result, LabeledTextDataset)
    assert len(result) >= 1 and len(result.texts) == len(result.labels)
    assert all(isinstance(t, str) and t.strip() for t in result.texts)
    assert all(isinstance(label, str) and label.strip() for label in result.labels)


def read_everything(path: Path) -> None:
    """Every reader of `path`: valid results or one MetalmError each."""
    check_dataset(valid_or_metalm_error(lambda: load_csv(path)))
    check_dataset(valid_or_metalm_error(lambda: load_jsonl(path)))
    labeled = valid_or_metalm_error(lambda: read_labeled(path))
    if labeled is not None:
        texts, labels = labeled
        assert len(texts) == len(labels) and all(isinstance(t, str) for t in texts)
    texts = valid_or_metalm_error(lambda: read_texts(path))
    if texts is not None:
        assert all(isinstance(t, str) for t in texts)
    unlabeled = valid_or_metalm_error(lambda: load_texts(UnlabeledConfig(source=str(path))))
    if unlabeled is not None:
        assert len(unlabeled) >= 2 and all(isinstance(t, str) and t.strip() for t in unlabeled)


def fuzz_every_reader(examples: int, files: st.SearchStrategy[bytes], suffixes: list[str]) -> None:
    """`examples` files drawn from `files`, each saved with one of `suffixes`, through
    `read_everything`."""

    @fuzz_settings(examples)
    @given(data=files, suffix=st.sampled_from(suffixes))
    def check(data: bytes, suffix: str) -> None:
        path = write_temp(data, suffix)
        try:
            read_everything(path)
        finally:
            path.unlink()

    check()


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_csv_files_load_or_raise_metalm_error(examples: int) -> None:
    """Odd CSV files, read as .csv, .jsonl and .txt by every reader."""
    fuzz_every_reader(examples, csv_bytes(), [".csv", ".jsonl", ".txt"])


@pytest.mark.slow
@pytest.mark.parametrize("examples", EXAMPLES)
def test_jsonl_files_load_or_raise_metalm_error(examples: int) -> None:
    """Odd JSON-lines files, read as .jsonl, .csv and .txt by every reader."""
    fuzz_every_reader(examples, jsonl_bytes(), [".jsonl", ".csv", ".txt"])


good_text = st.text(min_size=1, max_size=40).filter(lambda t: t.strip() != "")
good_label = good_text.filter(lambda t: t.strip() not in ("None", "nan"))


@pytest.mark.parametrize("examples", EXAMPLES)
def test_well_formed_files_round_trip(examples: int) -> None:
    """What csv.writer / json.dumps write (UTF-8, with or without a BOM), the readers
    give back exactly: quotes, separators, line breaks and NULs inside fields."""

    @fuzz_settings(examples)
    @given(
        rows=st.lists(st.tuples(good_text, good_label), min_size=1, max_size=8),
        bom=st.booleans(),
        kind=st.sampled_from(["csv", "jsonl"]),
    )
    def check(rows: list[tuple[str, str]], bom: bool, kind: str) -> None:
        if kind == "csv":
            out = io.StringIO(newline="")
            writer = csv.writer(out)
            writer.writerows([("text", "label"), *rows])
            body = out.getvalue()
        else:
            body = "".join(json.dumps({"text": t, "label": lb}) + "\n" for t, lb in rows)
        path = write_temp(body.encode("utf-8-sig" if bom else "utf-8"), f".{kind}")
        try:
            dataset = (load_csv if kind == "csv" else load_jsonl)(path)
            assert list(dataset.texts) == [t for t, _ in rows]
            assert list(dataset.labels) == [lb for _, lb in rows]
            if kind == "csv":
                assert read_texts(path) == [t for t, _ in rows]
        finally:
            path.unlink()

    check()


def test_duplicate_header_is_an_error(tmp_path: Path) -> None:
    """A header naming a column twice is refused (which of the two is meant?)."""
    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\nhello,a,other\n", encoding="utf-8")
    with pytest.raises(MetalmError, match="more than once"):
        load_csv(path)


def test_huge_field_loads(tmp_path: Path) -> None:
    """A field over csv's default 128 KiB limit loads (a long document is a text too)."""
    path = tmp_path / "big.csv"
    path.write_text(f"text,label\n{'y' * 300_000},a\n", encoding="utf-8")
    assert len(load_csv(path).texts[0]) == 300_000
    assert len(read_texts(path)[0]) == 300_000
