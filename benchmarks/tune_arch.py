"""Architecture search on the pretrained encoder: how many layers to keep, attention
heads per layer, pooling and max sequence length, with two objectives (few-shot meta-val
accuracy, and encoder parameters or latency). Prints every trial with both measurements
and the Pareto front.

    OMP_NUM_THREADS=1 python benchmarks/tune_arch.py --trials 10     # MiniLM
    python benchmarks/tune_arch.py --quick                           # tiny random BERT: smoke

Latency is the median time to encode a fixed batch of 32 meta-val texts on this machine
(1 thread under OMP_NUM_THREADS=1). Writes benchmarks/results/tune_arch.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState
from tune_warmstart import QUICK, tiny_model, write_record

from metalm.tune import TuneOptions, load_tune_config, tune
from metalm.tune.arch import arch_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="benchmarks/tune_protonet_cpu.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few trials")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--objectives", default="accuracy,params")
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--startup-trials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/bench-arch")
    parser.add_argument("--out", default="benchmarks/results/tune_arch.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    overrides = list(args.overrides)
    scratch = None
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="metalm-tiny-"))
        overrides = [f"model.name_or_path={tiny_model(scratch)}", *QUICK, *overrides]
    base, _search = load_tune_config(args.config, overrides)  # the search: section is unused
    began = time.time()
    options = TuneOptions(
        study_name="arch", sampler=args.sampler, pruner="none", seed=args.seed,
        objectives=args.objectives, final=False, startup_trials=args.startup_trials,
    )  # fmt: skip
    result = tune(
        base, arch_space(base), args.trials, Path(args.runs) / time.strftime("%Y%m%d-%H%M%S"),
        options, printer=lambda line, **_: print(f"[arch] {line}", flush=True),
    )  # fmt: skip
    front = {row["trial"] for row in result.pareto}
    rows = [
        {
            "trial": t.number,
            "accuracy": t.values[0],
            "latency_ms": t.user_attrs.get("latency"),
            "params_m": t.user_attrs.get("params"),
            "pareto": t.number in front,
            **t.params,
        }
        for t in result.study.get_trials(states=(TrialState.COMPLETE,))
    ]
    rows.sort(key=lambda r: (r["params_m"], -r["accuracy"]))
    print(f"\nobjectives: {args.objectives} (Pareto-optimal trials marked *)\n")
    print(
        "| trial | layers | heads | pooling | max_length | meta-val acc % | params (M) "
        "| latency ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = "*" if r["pareto"] else ""
        print(
            f"| {r['trial']}{mark} | {r['model.num_layers']} | {r['model.num_heads']} "
            f"| {r['model.pooling']} "
            f"| {r['model.max_length']} | {100 * r['accuracy']:.2f} | {r['params_m']:.2f} "
            f"| {r['latency_ms']:.1f} |"
        )
    record = {
        "config": args.config,
        "overrides": ["<tiny random BERT>", *QUICK, *args.overrides] if args.quick else overrides,
        "quick": args.quick,
        "objectives": args.objectives,
        "sampler": args.sampler,
        "trials": args.trials,
        "rows": rows,
        "seconds": time.time() - began,
        "study_dir": str(result.study_dir),
    }
    write_record(args.out, record)
    print(f"plots in {result.study_dir}")
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
