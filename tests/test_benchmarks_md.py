"""BENCHMARKS.md checks itself: every number with decimals in its tables comes from a
results file under `benchmarks/results/` that the table's section cites.

A section's files are those its text names (globs and `{a,b}` alternatives included, or
in a `<!-- sources: ... -->` comment), together with those of the enclosing `##` section
above it. A table number matches a file's number, ×100 (fractions shown as percent), or
what the tables derive from a file's lists of per-episode (or per-text) scores: the mean
and 95% interval of a list or of its first 10/15/20/30/40/100 values, and the paired
difference of two lists over the values both have (or their first 10/15/30), with the
intervals of `metalm.runs.accuracy.mean_ci95` (Student's t below 30 values). Numbers are
compared at the precision shown (±half a unit of the last digit)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from metalm.runs.accuracy import Z95, critical_value, mean_ci95

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:,\d{3})*(?:\.\d+)?(?![\w.])")
CITED = re.compile(r"benchmarks/results/[\w.\-*{},]+\.(?:json|md|txt|log)")
SOURCES = re.compile(r"<!--\s*sources:(.*?)-->")
TRUNCATIONS = (10, 15, 20, 30, 40, 100)
PAIRED = (10, 15, 30)  # paired differences also over these first values


@dataclass
class Section:
    heading: str
    start: int  # line index of the heading
    files: set[Path] = field(default_factory=set)
    tables: list[tuple[int, list[str]]] = field(default_factory=list)  # (line, header + rows)


def _expand(pattern: str) -> list[str]:
    """`a_{x,y}.json` → `a_x.json`, `a_y.json`."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for alt in match.group(1).split(",") for p in _expand(head + alt + tail)]


def _cited(text: str) -> set[str]:
    """The results paths `text` names (in prose, commands or sources comments)."""
    named = set(CITED.findall(text))
    for comment in SOURCES.findall(text):
        named.update(comment.split())
    return {p for pattern in named for p in _expand(pattern)}


def sections(lines: list[str]) -> list[Section]:
    """Every `##`–`####` section with its tables and the files in its scope."""
    heads = [i for i, line in enumerate(lines) if re.match(r"^#{2,4} ", line)]
    found = []
    for start, end in zip(heads, [*heads[1:], len(lines)], strict=True):
        top = max(h for h in heads if h <= start and lines[h].startswith("## "))
        section = Section(lines[start], start)
        for pattern in _cited("\n".join(lines[top:end])):
            section.files.update(sorted(ROOT.glob(pattern)) or [ROOT / pattern])
        i = start
        while i < end:
            if lines[i].startswith("|") and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
                j = i + 2
                while j < end and lines[j].startswith("|"):
                    j += 1
                section.tables.append((i, [lines[i], *lines[i + 2 : j]]))
                i = j
            else:
                i += 1
        found.append(section)
    return found


def _walk(value: object, numbers: set[float], lists: list[np.ndarray], widen: float = 1) -> None:
    """Collect the numbers and score lists of a results file. A normal interval stored
    (`ci95`) for fewer than 30 episodes also counts as its Student's t interval, which
    the tables now show (`widen`)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            numbers.add(float(value))
    elif isinstance(value, dict):
        episodes = value.get("episodes")
        if isinstance(episodes, int) and episodes >= 2:
            widen = critical_value(episodes) / Z95
        for key, item in value.items():
            if key == "ci95" and isinstance(item, float) and math.isfinite(item):
                numbers.add(item * widen)
            _walk(item, numbers, lists, widen)
    elif isinstance(value, list):
        if len(value) >= 2 and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            lists.append(np.asarray(value, dtype=float))
        for item in value:
            _walk(item, numbers, lists, widen)
    elif isinstance(value, str):
        for token in NUMBER.findall(value):
            numbers.add(float(token.replace(",", "").replace("−", "-")))


@cache
def file_numbers(path: Path) -> tuple[frozenset[float], tuple[np.ndarray, ...]]:
    """The numbers a results file holds, and its lists of scores."""
    numbers: set[float] = set()
    lists: list[np.ndarray] = []
    text = path.read_text(encoding="utf-8")
    _walk(json.loads(text) if path.suffix == ".json" else text, numbers, lists)
    return frozenset(numbers), tuple(lists)


def derived(lists: list[np.ndarray]) -> set[float]:
    """Means and intervals of the lists (and their first values) and paired differences."""
    out: set[float] = set()
    for values in lists:
        for n in {len(values), *TRUNCATIONS}:
            if 2 <= n <= len(values):
                out.update(mean_ci95(values[:n]))
    # the paired differences `a[:n] - b[:n]` of every two lists a (first) and b over the
    # n values both have and their first 10/15/30 (when both have them): `mean_ci95` of
    # each, for all the pairs of one n at once (tens of thousands of pairs per section)
    scores = [np.asarray(v, dtype=float) for v in lists if len(v) >= 5]
    lengths = np.array([len(v) for v in scores])
    for n in {*lengths.tolist(), *PAIRED}:
        rows = np.flatnonzero(lengths >= n)
        heads = np.stack([scores[r][:n] for r in rows]) if len(rows) > 1 else None
        for k in range(len(rows) - 1):
            later = heads[k + 1 :]
            if n not in PAIRED:  # only the pairs that share exactly n values
                later = later[np.minimum(lengths[rows[k + 1 :]], lengths[rows[k]]) == n]
            if not len(later):
                continue
            diffs = heads[k] - later
            means = diffs.mean(axis=1)
            cis = critical_value(n) * (diffs.std(axis=1, ddof=1) / math.sqrt(n))
            out.update(means.tolist(), (-means).tolist(), cis.tolist())
    return out


def scope_numbers(files: set[Path]) -> np.ndarray:
    numbers: set[float] = set()
    lists: list[np.ndarray] = []
    for path in sorted(files):
        found, scores = file_numbers(path)
        numbers |= found
        lists += scores
    numbers |= derived(lists)
    values = np.abs(np.array(sorted(numbers)))
    return np.concatenate([values, 100 * values])


def _cells(row: str) -> list[str]:
    """A row's cells, without bold marks and with `1.84x` read as the number 1.84."""
    cells = row.strip().strip("|").split("|")
    return [re.sub(r"(\d)x\b", r"\1 x", c.replace("**", "")).strip() for c in cells]


def _half_unit(plain: str) -> float:
    return 0.5 * 10 ** -len(plain.split(".")[1]) + 1e-9 if "." in plain else 0.5


def _ratios(table: list[str]) -> list[tuple[float, float]]:
    """The ratios a `× ...` column may show, of two values of the column to its left, each
    with how far the rounding of those values may move it."""
    header, rows = _cells(table[0]), [_cells(r) for r in table[1:]]
    out = []
    for col, name in enumerate(header):
        if col and name.startswith("×"):
            left = [_plain(m[0]) for r in rows if (m := NUMBER.findall(r[col - 1]))]
            for a in left:
                for b in left:
                    x, y = float(a), float(b)
                    if x and y:
                        slack = _half_unit(a) / x + _half_unit(b) / y
                        out.append((x / y, x / y * slack))
    return out


def unmatched(table: list[str], numbers: np.ndarray) -> list[str]:
    """The numbers with decimals in a table's rows (`table[0]` is its header; the first
    column, a row's name, aside) that match none of `numbers` (or the ratios of a `×`
    column, or a row's mean) at their shown precision."""
    ratios = _ratios(table)
    missing = []
    for row in table[1:]:
        cells = _cells(row)[1:]
        firsts = [float(_plain(m[0])) for c in cells if (m := NUMBER.findall(c)) and "." in m[0]]
        for cell in cells:
            for token in NUMBER.findall(cell):
                if "." not in token:
                    continue  # counts, steps, sizes: settings more than measurements
                plain = _plain(token)
                shown = abs(float(plain))
                half_unit = _half_unit(plain)
                found = (np.abs(numbers - shown) <= half_unit).any() or any(
                    abs(ratio - shown) <= slack + half_unit for ratio, slack in ratios
                )
                # a `mean` column: the mean of the row's other scores, as shown; a
                # difference of two of them (one full-way task: no interval)
                others = [f for f in firsts if f != float(plain)]
                mean = sum(others) / len(others) if others else math.nan
                gaps = [abs(x - y) for x in others for y in others]
                if found or abs(mean - shown) <= half_unit + 0.005:
                    continue
                if not any(abs(gap - shown) <= half_unit + 0.01 for gap in gaps):
                    missing.append(f"{token} in {cell.strip()!r}")
    return missing


def _plain(token: str) -> str:
    return token.replace(",", "").replace("−", "-").lstrip("+")


LINES = BENCHMARKS.read_text(encoding="utf-8").splitlines()
SECTIONS = sections(LINES)


def test_every_results_file_the_prose_cites_exists():
    """(Commands may name the parts of a file that was merged from them.)"""
    prose = re.sub(r"```.*?```", "", "\n".join(LINES), flags=re.DOTALL)
    missing = sorted(p for p in _cited(prose) if not list(ROOT.glob(p)))
    assert not missing, f"BENCHMARKS.md cites results files that are not there: {missing}"


@pytest.mark.parametrize(
    "section",
    [s for s in SECTIONS if s.tables],
    ids=lambda s: f"line {s.start + 1}: {s.heading.lstrip('#').strip()[:50]}",
)
def test_table_numbers_come_from_the_cited_results(section: Section):
    files = {p for p in section.files if p.exists()}
    measured = [
        t
        for t in section.tables
        if any("." in token for row in t[1][1:] for token in NUMBER.findall(row))
    ]
    if not measured:
        return
    assert files, "a table with measurements, but its section cites no results file"
    numbers = scope_numbers(files)
    problems = []
    for line, rows in measured:
        problems += [f"table at line {line + 1}: {m}" for m in unmatched(rows, numbers)]
    assert not problems, (
        "numbers not found in "
        + ", ".join(str(p.relative_to(ROOT)) for p in sorted(files))
        + ":\n"
        + "\n".join(problems)
    )


def test_the_checker_finds_a_number_that_is_not_in_the_files(tmp_path):
    """The check itself: a table number off by one unit of its last digit is caught,
    a derived paired difference is found."""
    results = tmp_path / "r.json"
    a, b = [0.8, 0.9, 1.0, 0.7, 0.9], [0.7, 0.9, 0.8, 0.7, 0.8]
    results.write_text(json.dumps({"a": {"accuracy": 0.86, "per_episode": a}, "b": b}))
    file_numbers.cache_clear()
    numbers = scope_numbers({results})
    mean, ci = mean_ci95(np.subtract(a, b))
    good = f"| a | 86.00 | +{100 * mean:.2f} ± {100 * ci:.2f} |"
    header = "| row | accuracy | Δ |"
    assert unmatched([header, good], numbers) == []
    assert unmatched([header, "| a | 86.01 |"], numbers) == ["86.01 in '86.01'"]
