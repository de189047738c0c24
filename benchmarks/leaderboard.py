"""The learner leaderboard: tables from `metalm compare` reports (compare.json).

The comparisons themselves run through the CLI (commands in BENCHMARKS.md, "Which
learner?"); this script copies their reports into benchmarks/results/ and prints the
compact tables BENCHMARKS.md shows: per learner, each head's accuracy at 5-way 1-shot
and full-way 5-shot with the paired difference to its baseline (own head: the learner
untrained; logreg head: frozen), meta-train time and adapt time per task.

    python benchmarks/leaderboard.py --copy runs/leaderboard/clinc150-test/compare.json \
        benchmarks/results/leaderboard_clinc150_test.json
    python benchmarks/leaderboard.py benchmarks/results/leaderboard_*.json
    python benchmarks/leaderboard.py --choose runs/leaderboard/clinc150-valid/compare.json \
        benchmarks/results/leaderboard_choices_clinc150.json      # heads chosen on valid
    python benchmarks/leaderboard.py benchmarks/results/leaderboard_clinc150_test.json \
        --targets benchmarks/results/leaderboard_choices_clinc150.json   # the issue's targets
    python benchmarks/leaderboard.py --readme benchmarks/results/leaderboard_clinc150_test.json \
        benchmarks/results/leaderboard_banking77_test.json \
        --targets benchmarks/results/leaderboard_choices_clinc150.json   # README's table
    python benchmarks/leaderboard.py benchmarks/results/leaderboard_icl_clinc150_test.json \
        --paired metaicl-channel-choice icl-direct \
        --paired metaicl-channel-choice baseline:metaicl-channel-choice   # any two rows
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from metalm.runs.accuracy import MethodResult
from metalm.runs.report import paired_difference


def cell(row: dict, key: str) -> str:
    r = row["result"]
    delta = row[key]
    text = f"{100 * r['accuracy']:.2f}"
    if delta is not None:
        text += f" ({100 * delta['mean']:+.2f} ± {100 * delta['ci95']:.2f})"
    return text


def table(report: dict, title: str) -> str:
    rows = report["rows"]
    protocols = list(dict.fromkeys(r["result"]["protocol"] for r in rows))
    frozen = {r["protocol"]: r for r in report["baselines"]["frozen"]}
    head = " | ".join(protocols)
    lines = [
        f"**{title}**",
        "",
        f"| learner | head | {head} | meta-train s (steps) "
        f"| adapt s/task ({' / '.join(protocols)}) |",
        "|---|---|" + "---|" * len(protocols) + "---|---|",
    ]
    cells = " | ".join(f"{100 * frozen[p]['accuracy']:.2f}" for p in protocols)
    adapt = " / ".join(f"{frozen[p]['adapt_seconds']:.3f}" for p in protocols)
    lines.append(f"| frozen | logreg | {cells} | 0 | {adapt} |")
    seen = list(dict.fromkeys((r["label"], r["head"]) for r in rows))
    for label, head_name in seen:
        mine = {
            r["result"]["protocol"]: r
            for r in rows
            if (r["label"], r["head"]) == (label, head_name)
        }
        key = "vs_same_head"
        cells = " | ".join(cell(mine[p], key) if p in mine else "" for p in protocols)
        first = next(iter(mine.values()))
        adapt = " / ".join(
            f"{mine[p]['result']['adapt_seconds']:.3f}" for p in protocols if p in mine
        )
        lines.append(
            f"| {label} | {head_name} | {cells} | {first['meta_train_seconds']:.0f} "
            f"({first['train_steps']}) | {adapt} |"
        )
    return "\n".join(lines)


def choose_heads(report: dict) -> dict[str, dict[str, str]]:
    """Per learner and protocol, the head (`own` or `logreg`) with the higher accuracy in
    `report` (a comparison on validation data)."""
    best: dict[str, dict[str, tuple[float, str]]] = {}
    for row in report["rows"]:
        protocol, accuracy = row["result"]["protocol"], row["result"]["accuracy"]
        current = best.setdefault(row["label"], {}).get(protocol)
        if current is None or accuracy > current[0]:
            best[row["label"]][protocol] = (accuracy, row["head"])
    return {label: {p: head for p, (_, head) in heads.items()} for label, heads in best.items()}


def targets(report: dict, choices: dict[str, dict[str, str]]) -> str:
    """Per learner, the head chosen on valid at each protocol, its paired difference to
    the same head untrained, and whether the 95% interval lies above 0."""
    protocols = list(dict.fromkeys(r["result"]["protocol"] for r in report["rows"]))
    lines = [
        f"| learner | {' | '.join(protocols)} |",
        "|---|" + "---|" * len(protocols),
    ]
    rows = {(r["label"], r["head"], r["result"]["protocol"]): r for r in report["rows"]}
    for label in dict.fromkeys(r["label"] for r in report["rows"]):
        cells = []
        for protocol in protocols:
            head = choices.get(label, {}).get(protocol)
            row = rows.get((label, head, protocol))
            if row is None or row["vs_same_head"] is None:
                cells.append("not chosen" if head is None else "(baseline)")
                continue
            delta = row["vs_same_head"]
            above = delta["mean"] - delta["ci95"] > 0
            cells.append(
                f"{head}: {100 * delta['mean']:+.2f} ± {100 * delta['ci95']:.2f} "
                f"{'**yes**' if above else 'no'}"
            )
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def readme_table(reports: list[dict], choices: dict[str, dict[str, str]]) -> str:
    """One row per learner, one column per (dataset, protocol) of `reports`: the chosen
    head's accuracy with its paired difference to the same head untrained; `not run`
    where a report has no such row."""
    columns = []
    for report in reports:
        dataset = report["baselines"]["frozen"][0]["dataset"]
        for protocol in dict.fromkeys(r["result"]["protocol"] for r in report["rows"]):
            columns.append((dataset, protocol, report))
    lines = [
        "| learner | " + " | ".join(f"{d} {p}" for d, p, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    frozen = [
        next(f for f in report["baselines"]["frozen"] if f["protocol"] == protocol)
        for _, protocol, report in columns
    ]
    lines.append(
        "| frozen (logreg) | " + " | ".join(f"{100 * f['accuracy']:.2f}" for f in frozen) + " |"
    )
    indexes = [
        {(r["label"], r["head"], r["result"]["protocol"]): r for r in report["rows"]}
        for _, _, report in columns
    ]
    labels = dict.fromkeys(r["label"] for report in reports for r in report["rows"])
    for label in labels:
        cells = []
        for (_, protocol, _), index in zip(columns, indexes, strict=True):
            row = index.get((label, choices.get(label, {}).get(protocol), protocol))
            cells.append("not run" if row is None else cell(row, "vs_same_head"))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def difference(a: dict, b: dict) -> tuple[float, float]:
    """`a` − `b` paired on the same episodes or texts, as `metalm compare` pairs them."""
    found = paired_difference(MethodResult.from_dict(a), MethodResult.from_dict(b))
    if found is None:
        raise SystemExit(f"{a['method']} and {b['method']} share no episodes to pair")
    return found


def result_of(report: dict, name: str, protocol: str) -> dict:
    """A learner's own-head result (`name`), or an untrained baseline's
    (`baseline:<label>`, e.g. `baseline:frozen`), at `protocol`."""
    if name.startswith("baseline:"):
        results = report["baselines"][name.removeprefix("baseline:")]
    else:
        results = [r["result"] for r in report["rows"] if (r["label"], r["head"]) == (name, "own")]
    found = [r for r in results if r["protocol"] == protocol]
    if not found:
        raise SystemExit(f"{name}: no {protocol} result in this report")
    return found[0]


def paired(report: dict, a: str, b: str) -> str:
    """`a` − `b` per protocol: mean paired difference ± 95% CI over the shared episodes."""
    lines = []
    for protocol in dict.fromkeys(r["result"]["protocol"] for r in report["rows"]):
        mine, theirs = result_of(report, a, protocol), result_of(report, b, protocol)
        mean, ci = difference(mine, theirs)
        units = min(len(mine["per_episode"]), len(theirs["per_episode"]))
        lines.append(f"{a} − {b} ({protocol}, {units}): {100 * mean:+.2f} ± {100 * ci:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="*", help="compare.json files")
    parser.add_argument("--copy", nargs=2, metavar=("COMPARE_JSON", "DEST"))
    parser.add_argument(
        "--choose",
        nargs=2,
        metavar=("VALID_COMPARE_JSON", "DEST"),
        help="write each learner's head per protocol, chosen on a validation comparison",
    )
    parser.add_argument(
        "--targets",
        metavar="CHOICES_JSON",
        help="print, for the chosen heads, the paired difference to the untrained same head",
    )
    parser.add_argument(
        "--readme",
        action="store_true",
        help="print one table over all reports with the heads of --targets (README's table)",
    )
    parser.add_argument(
        "--paired",
        nargs=2,
        action="append",
        metavar=("A", "B"),
        help="print A − B paired over the same episodes (labels, or baseline:<label>)",
    )
    args = parser.parse_args()
    if args.readme:
        if not args.targets:
            parser.error("--readme needs --targets CHOICES_JSON (the heads chosen on valid)")
        choices = json.loads(Path(args.targets).read_text(encoding="utf-8"))["heads"]
        reports = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.reports]
        print(readme_table(reports, choices))
        return
    if args.choose:
        report = json.loads(Path(args.choose[0]).read_text(encoding="utf-8"))
        record = {
            "rule": "per learner and protocol, the head with the higher accuracy on valid",
            "chosen_on": args.choose[0],
            "heads": choose_heads(report),
        }
        Path(args.choose[1]).write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(json.dumps(record["heads"], indent=1))
    if args.copy:
        Path(args.copy[1]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(*args.copy)
        args.reports.append(args.copy[1])
    for path in args.reports:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
        dataset = report["baselines"]["frozen"][0]["dataset"]
        print(table(report, f"{dataset} ({Path(path).name}; strict split: {report['strict']})"))
        print()
        if args.targets:
            choices = json.loads(Path(args.targets).read_text(encoding="utf-8"))["heads"]
            print(targets(report, choices))
            print()
        for a, b in args.paired or []:
            print(paired(report, a, b))


if __name__ == "__main__":
    main()
