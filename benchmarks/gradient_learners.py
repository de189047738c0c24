"""Accuracy of every gradient-based learner beside `frozen`, on the same episodes.

Each learner is meta-trained from its own config (configs/<learner>.yaml: CLINC150
training classes) with a CPU-sized budget, then tested on BANKING77's test split:
5-way 1-shot and 5-shot episodes and full-way 5-shot (support = train_5, query = the
whole test split). `frozen` (the pretrained encoder, prototype head) is evaluated on the
very same episodes in each run, so `Δ vs frozen` is a paired difference with its 95% CI.
Meta-training time and adapt time per task are measured in the same process.

    python benchmarks/gradient_learners.py                       # see --steps / --episodes
    python benchmarks/gradient_learners.py --learners maml anil --steps 20 --episodes 20

Prints a Markdown table and writes benchmarks/results/gradient_learners.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import metalm
from metalm.runs.accuracy import Z95, critical_value

LEARNERS = ["maml", "fomaml", "anil", "metasgd", "reptile", "proximal"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learners", nargs="+", default=LEARNERS)
    parser.add_argument("--steps", type=int, default=60, help="meta-training steps")
    parser.add_argument("--episodes", type=int, default=100, help="test episodes per setting")
    parser.add_argument("--val-episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/gradient_learners.json")
    parser.add_argument("--runs", default="runs/bench-gradient", help="run directories")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="only print the table of results files"
    )
    parser.add_argument("--merge", metavar="OUT", help="with --table: also merge them into OUT")
    args = parser.parse_args()
    if args.table:  # runs split over several processes: one table, one file
        parts = [json.loads(Path(p).read_text()) for p in args.table]
        commands = [c for p in parts for c in ([p["command"]] if isinstance(p["command"], str)
                                                 else p["command"])]  # fmt: skip
        merged = {
            "command": commands,
            "machine": parts[0]["machine"],
            "runs": [r for p in parts for r in p["runs"]],
            "results": [r for p in parts for r in p["results"]],
        }
        print("\n".join(f"`{c}`" for c in commands) + "\n")
        print(to_markdown(merged["results"]))
        if args.merge:
            Path(args.merge).write_text(json.dumps(merged, indent=1))
        return
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(["benchmarks/gradient_learners.py", *sys.argv[1:]])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows, runs = [], []
    for name in args.learners:
        overrides = [
            f"train.steps={args.steps}",
            f"train.eval_every={args.steps}",  # one validation, at the end
            f"train.val_episodes={args.val_episodes}",
            f"train.warmup_steps={max(1, args.steps // 10)}",
            f"train.checkpoint_every={args.steps}",
            "train.tensorboard=false",
            f"eval.episodes={args.episodes}",
            "eval.baselines=[{name: frozen}]",
            f"output_dir={args.runs}",
            f"run_name={name}-{stamp}",
            *args.overrides,
        ]
        config = metalm.load_config(f"configs/{name}.yaml", overrides)
        started = time.perf_counter()
        report = metalm.run(config, progress=False)
        seconds = time.perf_counter() - started
        train_seconds = report.seconds.get("train", 0.0)  # the recipe's train stage
        runs.append(
            {
                "learner": name,
                "config": f"configs/{name}.yaml",
                "overrides": overrides,
                "train": report.train,
                "train_seconds": train_seconds,
                "seconds": seconds,
            }
        )
        for row in report.as_dict()["results"]:
            row.pop("per_episode")
            row["run"] = name
            row["train_seconds"] = train_seconds if row["method"] == name else 0.0
            rows.append(row)
        print(f"[{name}] {seconds:.0f} s (meta-training {train_seconds:.0f} s)", file=sys.stderr)
        write(args, command, rows, runs)  # after each learner: partial results survive
    print(f"\n`{command}`\n")
    print(to_markdown(rows))
    print(f"\nwrote {args.out}")


def write(args: argparse.Namespace, command: str, rows: list[dict], runs: list[dict]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": {
                    "threads": torch.get_num_threads(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "runs": runs,
                "results": rows,
            },
            indent=1,
        )
    )


def to_markdown(rows: list[dict]) -> str:
    """One row per (learner, protocol): the learner, frozen on the same episodes, and the
    paired difference."""
    lines = [
        "| learner | protocol | accuracy % ± 95% CI | frozen % ± 95% CI "
        "| Δ vs frozen (paired) | episodes | meta-train s | adapt s/task |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] != r["run"]:
            continue
        base = next(
            (b for b in rows if b["run"] == r["run"] and b["method"] == "frozen"
             and b["protocol"] == r["protocol"]),
            None,
        )  # fmt: skip
        diff = r["vs_frozen"]
        # the stored intervals are normal ones: Student's t below 30 episodes
        widen = critical_value(r["episodes"]) / Z95 if r["episodes"] > 1 else 1.0
        if diff:
            delta = f"{100 * diff['mean']:+.2f} ± {100 * diff['ci95'] * widen:.2f}"
        elif base:  # full-way: one task, the same for both, so no interval
            delta = f"{100 * (r['accuracy'] - base['accuracy']):+.2f} (1 task)"
        else:
            delta = "-"
        frozen = f"{100 * base['accuracy']:.2f} ± {100 * base['ci95'] * widen:.2f}" if base else "-"
        lines.append(
            f"| {r['method']} | {r['protocol']} | "
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95'] * widen:.2f} | {frozen} | {delta} | "
            f"{r['episodes']} | {r['train_seconds']:.0f} | {r['adapt_seconds']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
