"""A leaderboard fix against the learner it fixes, on the same validation episodes.

Reads a fix's run (`metalm compare -c benchmarks/leaderboard_fixes.yaml`, on `valid`) and
the original learner's run from the leaderboard's validation comparison, and prints (and
writes as JSON) each head's accuracy with the paired differences: fix − original, and
fix − `frozen` (logreg head).

    python benchmarks/leaderboard_fix_ablation.py --fix runs/leaderboard/clinc150-valid-fixes \
        reptile-all --original runs/leaderboard/clinc150-valid reptile \
        --out benchmarks/results/leaderboard_fix_reptile_all_valid.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from leaderboard import difference  # benchmarks/leaderboard.py, beside this script


def results(path: Path) -> dict[str, dict]:
    return {r["protocol"]: r for r in json.loads(path.read_text())["results"]}


def paired(a: dict, b: dict) -> dict[str, float]:
    mean, ci = difference(a, b)
    return {"mean": mean, "ci95": ci}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fix", nargs=2, metavar=("COMPARE_DIR", "LABEL"), required=True)
    parser.add_argument("--original", nargs=2, metavar=("COMPARE_DIR", "LABEL"), required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    fix_dir, fix_label = Path(args.fix[0]), args.fix[1]
    orig_dir, orig_label = Path(args.original[0]), args.original[1]
    frozen = results(orig_dir / "baselines" / "frozen" / "report.json")
    rows = []
    for head, name in (("own", "report.json"), ("logreg", "logreg_head.json")):
        if head == "logreg" and not (fix_dir / "learners" / fix_label / name).exists():
            continue  # a learner without embeddings (metaicl) has no logreg row
        mine = results(fix_dir / "learners" / fix_label / name)
        theirs = results(orig_dir / "learners" / orig_label / name)
        for protocol, result in mine.items():
            row = {
                "head": head,
                "protocol": protocol,
                "fix": fix_label,
                "accuracy": result["accuracy"],
                "original_accuracy": theirs[protocol]["accuracy"],
                "fix_minus_original": paired(result, theirs[protocol]),
                "fix_minus_frozen": paired(result, frozen[protocol]),
                "original_minus_frozen": paired(theirs[protocol], frozen[protocol]),
            }
            rows.append(row)
            text = {k: f"{100 * v['mean']:+.2f} ± {100 * v['ci95']:.2f}"
                    for k, v in row.items() if isinstance(v, dict)}  # fmt: skip
            print(
                f"{fix_label} {head} {protocol}: {100 * result['accuracy']:.2f} "
                f"(original {100 * theirs[protocol]['accuracy']:.2f}); "
                + "; ".join(f"{k} {v}" for k, v in text.items())
            )
    if args.out:
        args.out.write_text(json.dumps({"fix": args.fix, "original": args.original,
                                        "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
