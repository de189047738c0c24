"""Hypergradient descent on the learning rate versus a fixed rate chosen by search.

Three protonet runs on the same meta-test episodes (class-disjoint from meta-val):
  searched   the fixed `train.lr` that TPE found best on meta-val in `--trials` trials
  start      the fixed starting rate `--lr`, untuned (the control)
  hypergrad  the same starting rate, adapted during meta-training by hypergradient
             descent (`train.hypergradient_lr=--beta`), in a single run

    python benchmarks/tune_hypergrad.py                 # MiniLM, configs/protonet.yaml
    python benchmarks/tune_hypergrad.py --quick         # tiny random BERT: a smoke run

Prints a Markdown table and writes benchmarks/results/tune_hypergrad.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from tune_warmstart import QUICK, tiny_model, write_record

from metalm import load_config, run
from metalm.tune import TuneOptions, parse_space, tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/protonet.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few trials")
    parser.add_argument("--trials", type=int, default=12, help="trials of the lr search")
    parser.add_argument("--lr", type=float, default=2e-5, help="starting (and control) rate")
    parser.add_argument(
        "--beta", type=float, default=0.5, help="hypergradient step (multiplicative rule)"
    )
    parser.add_argument("--low", type=float, default=1e-6)
    parser.add_argument("--high", type=float, default=1e-3)
    parser.add_argument("--runs", default="runs/bench-hypergrad")
    parser.add_argument("--out", default="benchmarks/results/tune_hypergrad.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    overrides = ["train.schedule=constant", "eval.baselines=[]", *args.overrides]
    scratch = None
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="metalm-tiny-"))
        overrides = [
            f"model.name_or_path={tiny_model(scratch)}",
            *QUICK,
            "eval.episodes=50",
            "eval.settings=[{n_way: 3, k_shot: 2}]",
            "eval.full_way_shots=[]",
            *overrides,
        ]
    runs = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    base = load_config(args.config, [*overrides, f"output_dir={runs}"])
    protocol = f"{base.eval.settings[-1].n_way}-way {base.eval.settings[-1].k_shot}-shot"
    rows = []

    def test(name: str, config, seconds: float, **extra) -> None:
        began = time.time()
        config.output_dir, config.run_name = str(runs), name
        report = run(config, progress=False)
        result = report.find(config.learner.name, protocol)
        rows.append(
            {
                "method": name,
                "lr": config.train.lr,
                "hypergradient_lr": config.train.hypergradient_lr,
                "test_accuracy": result.accuracy,
                "ci95": result.ci95,
                "best_val_accuracy": report.train.get("best_val_accuracy"),
                "seconds": seconds + time.time() - began,
                **extra,
            }
        )

    began = time.time()
    space = parse_space({"train.lr": {"low": args.low, "high": args.high, "log": True}}, base)
    searched = tune(
        base, space, args.trials, runs / "search",
        TuneOptions(sampler="tpe", pruner="none", seed=0, final=False),
        printer=lambda line, **_: print(f"[search] {line}", flush=True),
    )  # fmt: skip
    test("searched", searched.best_config, time.time() - began, runs_trained=args.trials + 1)
    start = load_config(args.config, [*overrides, f"train.lr={args.lr}"])
    test("start", start, 0.0, runs_trained=1)
    hyper = load_config(
        args.config, [*overrides, f"train.lr={args.lr}", f"train.hypergradient_lr={args.beta}"]
    )
    test("hypergrad", hyper, 0.0, runs_trained=1)
    log = runs / "hypergrad" / "log.jsonl"
    rates = [json.loads(line)["lr"] for line in log.read_text().splitlines()]
    rows[-1]["final_lr"] = rates[-1]

    print(f"\n| method | lr | test {protocol} | best val | training runs | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lr = f"{r['lr']:.2e}" + (f" → {r['final_lr']:.2e}" if "final_lr" in r else "")
        print(
            f"| {r['method']} | {lr} | {100 * r['test_accuracy']:.2f} ± {100 * r['ci95']:.2f} "
            f"| {r['best_val_accuracy']} | {r['runs_trained']} | {r['seconds']:.0f} |"
        )
    record = {
        "config": args.config,
        "quick": args.quick,
        "overrides": args.overrides,
        "beta": args.beta,
        "trials": args.trials,
        "rows": rows,
    }
    write_record(args.out, record)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
