"""Warm start across tasks: trials that TPE needs to come within 1 accuracy point of the
best validation accuracy found on a task, cold versus warm-started from a study of a
related task, over several seeds.

The source task and the target task differ in their class split (`data.classes.seed`
0 versus 1: other meta-train and meta-val classes). The source study runs once (cold
TPE); then, per seed, the target is tuned cold and warm (the source's best configs
queued first). The reference is the best value any target run found.

    python benchmarks/tune_warmstart.py                 # MiniLM, configs/tune_protonet.yaml
    python benchmarks/tune_warmstart.py --quick         # tiny random BERT: a smoke run

Prints a Markdown table and writes benchmarks/results/tune_warmstart.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from metalm.tune import TuneOptions, load_tune_config, tune

QUICK = [
    "model.max_length=16",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.eval_every=3",
    "train.val_episodes=8",
    "train.checkpoint_every=6",
    "episode.n_way=3",
    "episode.q_queries=2",
]


def tiny_model(directory: Path) -> Path:
    """The 2-layer, 32-wide random BERT of the tests."""
    from metalm.models.tiny import save_tiny_bert

    return save_tiny_bert(directory)


def curve(study) -> list[float]:
    """Best value so far after each finished trial, in trial order."""
    best, out = float("-inf"), []
    for t in sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        best = max(best, t.value)
        out.append(best)
    return out


def write_record(out: str | Path, record: dict) -> Path:
    """Write a benchmark's JSON record (with the machine it ran on) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "machine": platform.platform()}
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"\nwritten {out}")
    return out


def trials_needed(values: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(values) if v >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tune_protonet.yaml")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few trials")
    parser.add_argument("--trials", type=int, default=20, help="trials per target run")
    parser.add_argument("--source-trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--top", type=int, default=3, help="source configs queued")
    parser.add_argument("--pruner", default="none")
    parser.add_argument(
        "--startup-trials", type=int, default=3, help="random trials before tpe/gp model"
    )
    parser.add_argument("--runs", default="runs/bench-warmstart")
    parser.add_argument("--out", default="benchmarks/results/tune_warmstart.json")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    overrides = list(args.overrides)
    scratch = None
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="metalm-tiny-"))
        overrides = [f"model.name_or_path={tiny_model(scratch)}", *QUICK, *overrides]
    runs = Path(args.runs) / time.strftime("%Y%m%d-%H%M%S")
    began = time.time()

    def study(name: str, seed: int, classes_seed: int, trials: int, warm=()):
        base, space = load_tune_config(
            args.config, [*overrides, f"data.classes.seed={classes_seed}"]
        )
        options = TuneOptions(
            study_name=name, sampler="tpe", pruner=args.pruner, seed=seed,
            warm_start_from=warm, warm_start_top=args.top,
            startup_trials=args.startup_trials, final=False,
        )  # fmt: skip
        result = tune(
            base, space, trials, runs / name, options,
            printer=lambda line, **_: print(f"[{name}] {line}", flush=True),
        )  # fmt: skip
        return result.study

    study("source", 0, 0, args.source_trials)
    curves = {}
    for seed in args.seeds:
        curves[("cold", seed)] = curve(study(f"cold-{seed}", seed, 1, args.trials))
        curves[("warm", seed)] = curve(
            study(f"warm-{seed}", seed, 1, args.trials, warm=[str(runs / "source")])
        )
    reference = max(max(c) for c in curves.values())
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for mode in ("cold", "warm"):
            values = curves[(mode, seed)]
            row[f"{mode}_trials_needed"] = trials_needed(values, reference - 0.01)
            row[f"{mode}_best"] = max(values)
            row[f"{mode}_curve"] = values
        rows.append(row)

    def show(n):
        return str(n) if n is not None else f">{args.trials}"

    print(f"\nreference (best val accuracy on the target, any run): {reference:.4f}")
    print(
        "| seed | cold: trials to within 1 pt | warm: trials to within 1 pt "
        "| cold best | warm best |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {show(r['cold_trials_needed'])} | {show(r['warm_trials_needed'])} "
            f"| {r['cold_best']:.4f} | {r['warm_best']:.4f} |"
        )
    record = {
        "config": args.config,
        "overrides": overrides
        if not args.quick
        else ["<tiny random BERT>", *QUICK, *args.overrides],
        "quick": args.quick,
        "trials": args.trials,
        "startup_trials": args.startup_trials,
        "source_trials": args.source_trials,
        "top": args.top,
        "pruner": args.pruner,
        "reference": reference,
        "rows": rows,
        "seconds": time.time() - began,
    }
    write_record(args.out, record)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
