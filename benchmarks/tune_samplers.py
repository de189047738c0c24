"""Random search versus TPE versus Gaussian-process Bayesian optimization on the same
budget: best meta-val accuracy after each trial, per sampler and seed.

    OMP_NUM_THREADS=1 python benchmarks/tune_samplers.py            # MiniLM, CPU-sized space
    python benchmarks/tune_samplers.py --table a.json b.json        # several runs' seeds together
    python benchmarks/tune_samplers.py --quick                      # tiny random BERT: smoke

Prints a Markdown table and writes benchmarks/results/tune_samplers.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from tune_warmstart import QUICK, curve, tiny_model, write_record

from metalm.tune import TuneOptions, load_tune_config, tune


def print_table(rows: list[dict], samplers: list[str], trials: int) -> None:
    """Mean best-so-far meta-val accuracy (%) after a third, two thirds and all trials."""
    checkpoints = sorted({max(1, trials // 3), max(1, 2 * trials // 3), trials})
    head = " | ".join(f"best after {n}" for n in checkpoints)
    print(f"\n| sampler | seeds | {head} | minutes per study |")
    print("|---|---|" + "---|" * len(checkpoints) + "---|")
    for sampler in samplers:
        mine = [r for r in rows if r["sampler"] == sampler]
        cells = []
        for n in checkpoints:
            at = [100 * r["curve"][min(n, len(r["curve"])) - 1] for r in mine]
            cells.append(f"{statistics.mean(at):.2f}")
        minutes = statistics.mean(r["seconds"] for r in mine) / 60
        print(f"| {sampler} | {len(mine)} | {' | '.join(cells)} | {minutes:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/tune_protonet_cpu.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few trials")
    parser.add_argument("--samplers", nargs="+", default=["random", "tpe", "gp"])
    parser.add_argument("--trials", type=int, default=10, help="trials per study (the budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--startup-trials", type=int, default=3, help="random trials before tpe/gp model"
    )
    parser.add_argument("--runs", default="runs/bench-samplers")
    parser.add_argument("--out", default="benchmarks/results/tune_samplers.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print these runs' table")
    args = parser.parse_args()
    if args.table:
        rows = [r for f in args.table for r in json.loads(Path(f).read_text())["rows"]]
        print_table(rows, args.samplers, args.trials)
        return
    overrides = list(args.overrides)
    scratch = None
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="metalm-tiny-"))
        overrides = [f"model.name_or_path={tiny_model(scratch)}", *QUICK, *overrides]
    runs = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    base, space = load_tune_config(args.config, overrides)
    rows = []
    for seed in args.seeds:  # round-robin over samplers, so machine load hits them alike
        for sampler in args.samplers:
            name = f"{sampler}-{seed}"
            began = time.time()
            options = TuneOptions(
                study_name=name, sampler=sampler, pruner="none", seed=seed, final=False,
                startup_trials=args.startup_trials,
            )  # fmt: skip
            result = tune(
                base, space, args.trials, runs / name, options,
                printer=lambda line, name=name, **_: print(f"[{name}] {line}", flush=True),
            )  # fmt: skip
            values = curve(result.study)
            rows.append(
                {
                    "sampler": sampler,
                    "seed": seed,
                    "best": values[-1],
                    "curve": values,
                    "best_params": result.best_params,
                    "seconds": time.time() - began,
                }
            )
    print_table(rows, args.samplers, args.trials)
    record = {
        "config": args.config,
        "overrides": ["<tiny random BERT>", *QUICK, *args.overrides] if args.quick else overrides,
        "quick": args.quick,
        "trials": args.trials,
        "startup_trials": args.startup_trials,
        "seeds": args.seeds,
        "rows": rows,
    }
    write_record(args.out, record)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
