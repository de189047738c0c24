"""Few-shot intent detection: every learner on BANKING77 and CLINC150.

For each target dataset, protonet is meta-trained on the *other* dataset (cross-domain),
then every learner is tested on the target: full-way 5- and 10-shot on the standard
splits (support = train_5/train_10, query = the whole test split) and 5-way 1-/5-shot
episodes drawn from the target's test split, all on the same tasks.

    python benchmarks/fewshot_intent.py                 # full protocol (about 40 min, 2 cores)
    python benchmarks/fewshot_intent.py --quick         # smoke run (a few minutes)

Prints a Markdown table and writes benchmarks/results/fewshot_intent.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import metalm

PAIRS = [("clinc150", "banking77"), ("banking77", "clinc150")]
PUBLISHED = {  # full-way test accuracy (%) from shared/data/README.md
    ("banking77", 5): {"RoBERTa-base + classifier": 74.04, "DNNC": 80.40, "CPFT": 80.86},
    ("clinc150", 5): {"RoBERTa-base + classifier": 87.99, "DNNC": 91.02, "CPFT": 92.34},
    ("banking77", 10): {"RoBERTa-base + classifier": 84.27, "DNNC": 86.71, "CPFT": 87.20},
    ("clinc150", 10): {"RoBERTa-base + classifier": 91.55, "DNNC": 93.76, "CPFT": 94.18},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and episodes")
    parser.add_argument("--out", default="benchmarks/results/fewshot_intent.json")
    parser.add_argument("--runs", default="runs/bench-fewshot", help="run directories")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    quick = (
        [
            "train.steps=10",
            "train.eval_every=5",
            "train.val_episodes=5",
            "eval.episodes=20",
            "eval.episodes_by_method={finetune: 3}",
        ]
        if args.quick
        else []
    )
    rows, runs = [], []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for source, target in PAIRS:
        overrides = [
            f"data.train.source={source}",
            f"data.test.source={target}",
            "data.test.split=test",
            "eval.full_way_shots=[5, 10]",
            f"output_dir={args.runs}",
            f"run_name={source}-to-{target}-{stamp}",
            *quick,
            *args.overrides,
        ]
        config = metalm.load_config(None, overrides)
        started = time.perf_counter()
        report = metalm.run(config)
        seconds = time.perf_counter() - started
        runs.append(
            {
                "source": source,
                "target": target,
                "overrides": overrides,
                "run_dir": report.run_dir,
                "train": report.train,
                "seconds": seconds,
            }
        )
        for row in report.as_dict()["results"]:
            row.pop("per_episode")
            rows.append({"meta_train": source if row["method"] == "protonet" else "-", **row})
    table = to_markdown(rows)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "command": "python benchmarks/fewshot_intent.py "
                + " ".join((["--quick"] if args.quick else []) + args.overrides),
                "machine": {
                    "cpus": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "runs": runs,
                "results": rows,
                "published_full_way": {f"{d} {k}-shot": v for (d, k), v in PUBLISHED.items()},
            },
            indent=1,
        )
    )
    print(f"\nwrote {args.out}")


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| test data | protocol | method | meta-trained on | accuracy % ± 95% CI "
        "| Δ vs frozen (paired) | episodes | adapt s/task | predict texts/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["protocol"], r["method"])):
        diff = r["vs_frozen"]
        delta = f"{100 * diff['mean']:+.2f} ± {100 * diff['ci95']:.2f}" if diff else ""
        lines.append(
            f"| {r['dataset']} | {r['protocol']} | {r['method']} | {r['meta_train']} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {delta} | {r['episodes']} | "
            f"{r['adapt_seconds']:.3f} | {r['predict_texts_per_second']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
