"""Files the command line reads and writes: support sets (.csv/.jsonl), texts to
classify (a file or standard input), predictions as JSON lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalm.errors import MetalmError

if TYPE_CHECKING:
    from metalm.classifier import FewShotClassifier


def read_labeled(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str]]:
    """Texts and labels of a support set in a .csv (header row) or .jsonl file."""
    from metalm.data import load_csv, load_jsonl

    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        data = load_csv(path, text_column, label_column)
    elif suffix in (".jsonl", ".json"):
        data = load_jsonl(path, text_column, label_column)
    else:
        raise MetalmError(f"{path}: the support set must be a .csv or .jsonl file")
    return list(data.texts), list(data.labels)


def _text_of_line(line: str, text_column: str) -> str:
    if line.lstrip().startswith("{"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return line
        if isinstance(row, dict) and text_column in row:
            return str(row[text_column])
    return line


def read_texts(source: str | Path, text_column: str = "text", stdin: Any = None) -> list[str]:
    """Texts to classify: a .csv (column `text_column`), a .jsonl (field `text_column`),
    or plain text / JSON lines from a file or `-` (standard input), blank lines skipped."""
    from metalm.data.dataset import parse_csv, read_text_file

    if str(source) == "-":
        raw = (stdin or sys.stdin).read()
        suffix = ""
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        raw = read_text_file(path, newline="" if suffix == ".csv" else None)
    if suffix == ".csv":
        rows = parse_csv(raw, source)
        if rows and text_column not in rows[0]:
            raise MetalmError(f"{source}: no column {text_column!r}; columns are {sorted(rows[0])}")
        short = [i for i, row in enumerate(rows) if row[text_column] is None]
        if short:
            raise MetalmError(f"{source}: row {short[0]} has no {text_column!r} field")
        return [row[text_column] for row in rows]
    lines = [line for line in raw.split("\n") if line.strip()]
    return [_text_of_line(line.rstrip("\r"), text_column) for line in lines]


def write_predictions(
    clf: FewShotClassifier, texts: Sequence[str], destination: str | Path, stdout: Any = None
) -> int:
    """One JSON line per text, `{"text", "label", "probability"}`, to a file or `-`."""
    lines = [
        json.dumps({"text": text, "label": label, "probability": round(prob, 6)})
        for text, (label, prob) in zip(texts, clf.predict_with_probability(texts), strict=True)
    ]
    body = "".join(line + "\n" for line in lines)
    if str(destination) == "-":
        out = stdout or sys.stdout
        out.write(body)
        out.flush()
    else:
        try:
            Path(destination).write_text(body, encoding="utf-8")
        except OSError as err:
            raise MetalmError(
                f"{destination}: cannot write the predictions ({err.strerror or err}); "
                "give a file path in a writable directory, or - for stdout"
            ) from None
    return len(lines)
