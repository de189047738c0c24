"""Which L2 rule should the logistic-regression head use? Chosen on `valid`, scored on
`test` once.

Every candidate rule fits `metalm.learners.heads.fit_logreg` on the same embeddings
(frozen all-MiniLM-L6-v2 by default, or `--model DIR`) and is scored on:

  full-way K-shot   support = the standard `train_K`, query = the whole `--split`
  5-way K-shot      `--episodes` fixed episodes drawn from the `--split` texts

of BANKING77 and CLINC150. The rules:

  fixed:X        the same L2 strength X for every task
  C:X            scikit-learn's scaling, l2 = 1 / (X * n) with n support texts
                 (LogisticRegression(C=X) minimises C * sum CE + |W|^2 / 2)
  loo:GRID       leave-one-shot-out held-out log-likelihood over GRID (the rule until now
                 with GRID = 3e-5,1e-4,3e-4; 1 shot: 1e-4)
  sklearn:C=X    scikit-learn's own LogisticRegression(C=X, max_iter=1000) (the
                 reference the default head must match)

    python benchmarks/logreg_l2_rule.py --split valid            # choose
    python benchmarks/logreg_l2_rule.py --split test --rules fixed:1e-4 \
        loo:3e-5,1e-4,3e-4 sklearn:C=10 --out benchmarks/results/logreg_l2_rule_test.json

Prints a Markdown table (accuracy, paired difference to `--reference` ± 95% CI) and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from metalm.data import EpisodeSampler, builtin_dataset, full_way_episode
from metalm.data.episodes import Episode
from metalm.learners.heads import FIT_ITER, LBFGS_TOL, fit_logreg
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.runs.accuracy import mean_ci95

DEFAULT_RULES = [
    "fixed:1e-5",
    "fixed:3e-5",
    "fixed:1e-4",
    "fixed:3e-4",
    "fixed:1e-3",
    "fixed:3e-3",
    "C:3",
    "C:10",
    "C:30",
    "C:100",
    "loo:3e-5,1e-4,3e-4",
    "loo:1e-5,3e-5,1e-4,3e-4,1e-3,3e-3,1e-2",
    "sklearn:C=10",
]


SOLVER = {"max_iter": FIT_ITER, "tol": LBFGS_TOL}  # metalm's L-BFGS stopping rule


def fit(rule: str, x: torch.Tensor, y: torch.Tensor, n_way: int):
    """(weight, bias) of `rule` on support features `x`, labels `y`."""
    kind, _, value = rule.partition(":")
    if kind == "sklearn":
        from sklearn.linear_model import LogisticRegression

        c = float(value.split("=")[1])
        model = LogisticRegression(C=c, max_iter=1000).fit(x.numpy(), y.numpy())
        if n_way == 2:  # sklearn's binary form: one row
            w = torch.tensor(model.coef_, dtype=torch.float32)
            b = torch.tensor(model.intercept_, dtype=torch.float32)
            return torch.cat([-w / 2, w / 2]), torch.cat([-b / 2, b / 2])
        return torch.tensor(model.coef_, dtype=torch.float32), torch.tensor(
            model.intercept_, dtype=torch.float32
        )
    if kind == "fixed":
        head = fit_logreg(x, y, n_way, l2=float(value), **SOLVER)
    elif kind == "C":
        head = fit_logreg(x, y, n_way, l2=1.0 / (float(value) * len(y)), **SOLVER)
    elif kind == "loo":
        grid = tuple(float(v) for v in value.split(","))
        head = fit_logreg(x, y, n_way, grid=grid, **SOLVER)
    else:
        raise SystemExit(f"unknown rule {rule!r}")
    return head["head.weight"], head["head.bias"]


def correct(rule: str, table: dict[str, torch.Tensor], episode: Episode) -> np.ndarray:
    x = torch.stack([table[t] for t in episode.support_texts])
    q = torch.stack([table[t] for t in episode.query_texts])
    y = torch.tensor(episode.support_labels)
    weight, bias = fit(rule, x, y, episode.n_way)
    predicted = (q @ weight.T + bias).argmax(-1)
    return (predicted == torch.tensor(episode.query_labels)).double().numpy()


def tasks(dataset: str, split: str, args) -> dict[str, list[Episode]]:
    query = builtin_dataset(dataset, split)
    out = {
        f"full-way {k}-shot": [full_way_episode(builtin_dataset(dataset, f"train_{k}"), query)]
        for k in args.full_way_shots
    }
    for k in args.episode_shots:
        sampler = EpisodeSampler(query, 5, k, 15, seed=args.seed)
        out[f"5-way {k}-shot"] = [sampler.sample(i) for i in range(args.episodes)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="valid")
    parser.add_argument("--rules", nargs="+", default=DEFAULT_RULES)
    parser.add_argument("--reference", default="sklearn:C=10")
    parser.add_argument("--datasets", nargs="+", default=["banking77", "clinc150"])
    parser.add_argument("--full-way-shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--episode-shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", default="", help="an encoder directory (default: MiniLM)")
    parser.add_argument("--max-iter", type=int, default=SOLVER["max_iter"], help="L-BFGS steps")
    parser.add_argument("--tol", type=float, default=SOLVER["tol"], help="L-BFGS gradient tol")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    SOLVER.update(max_iter=args.max_iter, tol=args.tol)
    if args.reference not in args.rules:
        args.rules.append(args.reference)

    encoder = TextEncoder.from_config(EncoderConfig(name_or_path=args.model))
    rows = []
    for dataset in args.datasets:
        by_setting = tasks(dataset, args.split, args)
        texts = sorted(
            {
                t
                for eps in by_setting.values()
                for ep in eps
                for t in ep.support_texts + ep.query_texts
            }
        )
        began = time.perf_counter()
        table = dict(zip(texts, encoder.embed(texts).float(), strict=True))
        print(f"{dataset}: {len(texts)} texts embedded in {time.perf_counter() - began:.0f} s")
        for setting, episodes in by_setting.items():
            scores = {}
            for rule in args.rules:
                began = time.perf_counter()
                per = [correct(rule, table, ep) for ep in episodes]
                seconds = time.perf_counter() - began
                units = per[0] if len(per) == 1 else np.array([p.mean() for p in per])
                scores[rule] = (units, seconds)
            reference = scores[args.reference][0]
            for rule, (units, seconds) in scores.items():
                diff = mean_ci95(units - reference) if rule != args.reference else (0.0, 0.0)
                rows.append(
                    {
                        "dataset": dataset,
                        "split": args.split,
                        "setting": setting,
                        "rule": rule,
                        "accuracy": float(units.mean()),
                        "vs_reference": {"mean": diff[0], "ci95": diff[1]},
                        "units": len(units),
                        "fit_seconds": seconds / len(episodes),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(markdown(rows, args))
    out = Path(args.out or f"benchmarks/results/logreg_l2_rule_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "logreg_l2_rule",
        "encoder": args.model or "all-MiniLM-L6-v2 (frozen)",
        "split": args.split,
        "reference": args.reference,
        "episodes": args.episodes,
        "solver": dict(SOLVER),
        "machine": platform.platform(),
        "command": "python benchmarks/logreg_l2_rule.py " + " ".join(_argv()),
        "results": rows,
    }
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print(f"\nwritten {out}")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def markdown(rows: list[dict], args) -> str:
    settings = list(dict.fromkeys((r["dataset"], r["setting"]) for r in rows))
    head = " | ".join(f"{d} {s}" for d, s in settings)
    lines = [f"| rule | {head} | mean |", "|---|" + "---|" * (len(settings) + 1)]
    for rule in args.rules:
        cells, accs = [], []
        for d, s in settings:
            r = next(
                x for x in rows if x["dataset"] == d and x["setting"] == s and x["rule"] == rule
            )
            accs.append(r["accuracy"])
            v = r["vs_reference"]
            delta = (
                ""
                if rule == args.reference
                else f" ({100 * v['mean']:+.2f} ± {100 * v['ci95']:.2f})"
            )
            cells.append(f"{100 * r['accuracy']:.2f}{delta}")
        lines.append(f"| {rule} | {' | '.join(cells)} | {100 * np.mean(accs):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
