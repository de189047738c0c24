"""Task heads on frozen MiniLM, full-way: nearest centroid vs logistic regression.

For BANKING77 and CLINC150, 5- and 10-shot (support = the standard `train_5`/`train_10`
split, query = the whole `test` split), on the real all-MiniLM-L6-v2 with every text set
embedded once: the fit time of each head (median of `--repeats`, per torch thread count
in `--threads`) and its test accuracy, with the paired difference to the centroid over
the same test texts (± 95% CI):

  centroid      nearest class centroid (the prototype head)
  logreg LOO    `fit_logreg` with L2 chosen by leave-one-shot-out on the support set
  logreg l2=X   `fit_logreg` at a fixed L2 strength

The leave-one-shot-out scores of each grid value (held-out NLL and accuracy on the
support folds) are saved too, to compare selection criteria. Then the whole `adapt` of
the `frozen` learner (embedding the 385 BANKING77 support texts + the fit) per head.

    OMP_NUM_THREADS=2 python benchmarks/logreg_head.py
    python benchmarks/logreg_head.py --threads 1 2 --repeats 5

Prints a Markdown table and writes benchmarks/results/logreg_head.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from metalm.data import builtin_dataset, full_way_episode
from metalm.learners import FrozenConfig, build_learner
from metalm.learners.heads import L2_GRID, fit_logreg, loo_scores, prototype_head
from metalm.models.encoder import EncoderConfig, TextEncoder
from metalm.runs.accuracy import mean_ci95

FIXED_L2 = (1e-5, *L2_GRID, 1e-3)


def timed(fn, repeats: int) -> tuple[object, float]:
    """The result of `fn()` and its median wall time over `repeats` calls (+1 warm-up)."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - began)
    return result, statistics.median(seconds)


def correct(weight: torch.Tensor, bias: torch.Tensor, query: torch.Tensor, truth: torch.Tensor):
    return ((query @ weight.T + bias).argmax(-1) == truth).double().numpy()


def measure(dataset: str, shots: int, encoder: TextEncoder, args) -> list[dict]:
    episode = full_way_episode(
        builtin_dataset(dataset, f"train_{shots}"), builtin_dataset(dataset, "test")
    )
    support = encoder.embed(episode.support_texts)
    query = encoder.embed(episode.query_texts)
    labels = torch.tensor(episode.support_labels)
    truth = torch.tensor(episode.query_labels)
    n_way = episode.n_way
    heads: dict[str, dict] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        fits = {"centroid": lambda: prototype_head(support, labels, n_way)}
        fits["logreg LOO"] = lambda: fit_logreg(support, labels, n_way)
        for l2 in FIXED_L2:
            fits[f"logreg l2={l2:g}"] = lambda l2=l2: fit_logreg(support, labels, n_way, l2=l2)
        for method, fn in fits.items():
            head, seconds = timed(fn, args.repeats)
            row = heads.setdefault(method, {"head": head, "fit_seconds": {}})
            row["fit_seconds"][str(threads)] = round(seconds, 4)
    base = correct(*heads["centroid"]["head"], query, truth)
    nll, held_out_accuracy = loo_scores(support, labels, n_way)
    rows = []
    for method, row in heads.items():
        head = row["head"]
        if isinstance(head, dict):
            mine = correct(head["head.weight"], head["head.bias"], query, truth)
            l2 = float(head["head.l2"])
        else:
            mine, l2 = base, None
        diff = mean_ci95(mine - base)
        rows.append(
            {
                "dataset": dataset,
                "shots": shots,
                "ways": n_way,
                "support_texts": len(episode.support_texts),
                "test_texts": len(episode.query_texts),
                "method": method,
                "l2": l2,
                "fit_seconds": row["fit_seconds"],
                "accuracy": round(float(mine.mean()), 4),
                "vs_centroid": None
                if method == "centroid"
                else {"mean": round(diff[0], 4), "ci95": round(diff[1], 4)},
            }
        )
        if method == "logreg LOO":
            rows[-1]["loo"] = {
                "grid": list(L2_GRID),
                "held_out_nll": [round(v, 4) for v in nll.tolist()],
                "held_out_accuracy": [round(v, 4) for v in held_out_accuracy.tolist()],
            }
        print(json.dumps(rows[-1]), flush=True)
    return rows


def adapt_seconds(encoder: TextEncoder, args) -> list[dict]:
    """The `frozen` learner's whole adapt (embedding + head) on BANKING77 train_5."""
    support = builtin_dataset("banking77", "train_5")
    index = {name: i for i, name in enumerate(support.classes)}
    texts, labels = list(support.texts), [index[v] for v in support.labels]
    out = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for head in ("centroid", "logreg"):
            learner = build_learner(encoder, FrozenConfig(head=head))
            _, seconds = timed(lambda learner=learner: learner.adapt(texts, labels), args.repeats)
            out.append({"head": head, "threads": threads, "adapt_seconds": round(seconds, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def table(rows: list[dict], threads: list[int]) -> str:
    fit_columns = " | ".join(f"fit s ({t} thr)" for t in threads)
    lines = [
        f"| data | K | head | l2 | {fit_columns} | accuracy % | Δ vs centroid (paired) |",
        "|---|---|---|---|" + "---|" * len(threads) + "---|---|",
    ]
    for r in rows:
        fits = " | ".join(f"{r['fit_seconds'][str(t)]:.3f}" for t in threads)
        delta = r["vs_centroid"]
        delta = "" if delta is None else f"{100 * delta['mean']:+.2f} ± {100 * delta['ci95']:.2f}"
        l2 = "" if r["l2"] is None else f"{r['l2']:g}"
        lines.append(
            f"| {r['dataset']} | {r['shots']} | {r['method']} | {l2} | {fits} | "
            f"{100 * r['accuracy']:.2f} | {delta} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--datasets", nargs="+", default=["banking77", "clinc150"])
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--out", default="benchmarks/results/logreg_head.json")
    args = parser.parse_args()

    encoder = TextEncoder.from_config(EncoderConfig())
    rows = []
    for dataset in args.datasets:
        for shots in args.shots:
            torch.set_num_threads(min(args.threads))  # embedding: not measured here
            rows += measure(dataset, shots, encoder, args)
    adapt = adapt_seconds(encoder, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "logreg_head",
        "encoder": "all-MiniLM-L6-v2 (frozen)",
        "protocol": "full-way: support train_K, query the whole test split",
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "results": rows,
        "adapt_banking77_5shot": adapt,
    }
    out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print()
    print(table(rows, args.threads))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
