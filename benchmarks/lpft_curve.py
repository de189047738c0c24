"""Is test-time fine-tuning (`learner.head=lpft`) worth its time? Accuracy vs adapt seconds.

On the `valid` splits only (never `test`): full-way 5-shot, support = the standard
`train_5` split, query = the whole `valid` split, for BANKING77 and CLINC150, with the
protonet encoder meta-trained for each without its labels (BANKING77:
`runs/leaderboard/clinc150-valid`, CLINC150 labels + BANKING77 texts; CLINC150:
`runs/leaderboard/banking77-trainsplit`, the other way round). Rows:

  logreg              the linear probe alone (`learner.head=logreg`)
  lpft all/10         `lpft` as before: every weight, 10 steps (`lpft_blocks=0`)
  lpft top-k/s        the top k layers only (`lpft_blocks=k`, `metalm.learners.lpft`), s steps
  lpft top-k/ES≤s     the same, the step count (≤ s) chosen by leave-one-shot-out

For each: valid accuracy, the paired difference to `logreg` over the same query texts
(± 95% CI, `mean_ci95` of the per-text differences), and the wall time of the whole
`adapt` of the full-way task (embedding the support texts included, no embedding cache;
median of up to `--repeats`, fewer for slow rows), at ONE torch thread (`--threads`).
Predictions of top-k rows run only the top layers on the query texts' cached lower
hidden states (checked against `learner.predict` on a sample: `fast_predict_max_diff`).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/lpft_curve.py
    python benchmarks/lpft_curve.py --datasets banking77 --grid 1:5,10 2:10 --early 1:20

Prints a Markdown table and writes benchmarks/results/lpft_curve.json and .png (the JSON
is rewritten after every row, so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from metalm.data import builtin_dataset, full_way_episode
from metalm.learners.base import encoder_params, head_logits
from metalm.learners.lpft import TopBlockInputs
from metalm.runs.accuracy import mean_ci95
from metalm.runs.existing import load_trained_learner

RUNS = {
    "banking77": "runs/leaderboard/clinc150-valid/learners/protonet",  # CLINC150 labels
    "clinc150": "runs/leaderboard/banking77-trainsplit/learners/protonet",  # BANKING77 labels
}
RESULTS = Path(__file__).parent / "results"


class _Chosen(logging.Handler):
    """Collects the step counts `adapt_top_blocks` logs when it stops early."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.steps: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.match(r"lpft early stopping: (\d+) steps", record.getMessage())
        if found:
            self.steps.append(int(found.group(1)))


def parse_grid(items: list[str]) -> list[tuple[int, int]]:
    """`["1:5,10", "2:10"]` → `[(1, 5), (1, 10), (2, 10)]` (blocks, steps)."""
    out = []
    for item in items:
        blocks, steps = item.split(":")
        out += [(int(blocks), int(s)) for s in steps.split(",")]
    return out


def rows_of(args) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = [("logreg", {"head": "logreg"})]
    if args.today:
        rows.append(("lpft all/10", {"head": "lpft", "lpft_blocks": 0, "lpft_steps": 10}))
    for blocks, steps in parse_grid(args.grid):
        rows.append((f"lpft top-{blocks}/{steps}", {"lpft_blocks": blocks, "lpft_steps": steps}))
    for blocks, steps in parse_grid(args.early):
        name = f"lpft top-{blocks}/ES≤{steps}"
        rows.append((name, {"lpft_blocks": blocks, "lpft_steps": steps, "lpft_early_stop": True}))
    return rows


def predict_fast(inputs: TopBlockInputs, state: dict, chunk: int = 256) -> torch.Tensor:
    params = encoder_params(state)
    parts = []
    with torch.no_grad():
        for start in range(0, len(inputs.hidden), chunk):
            rows = range(start, min(start + chunk, len(inputs.hidden)))
            parts.append(head_logits(state, inputs.features(rows, params).float()))
    return torch.cat(parts)


def measure(dataset: str, args, records: list[dict], save) -> None:
    _, learner = load_trained_learner(RUNS[dataset], ["learner.head=lpft", "model.device=cpu"])
    learner.eval()
    episode = full_way_episode(
        builtin_dataset(dataset, "train_5"), builtin_dataset(dataset, "valid")
    )
    truth = torch.tensor(episode.query_labels)
    base = learner.config
    query_inputs: dict[int, TopBlockInputs] = {}
    chosen = _Chosen()
    logging.getLogger("metalm.learners.lpft").addHandler(chosen)
    logging.getLogger("metalm.learners.lpft").setLevel(logging.INFO)
    reference = None
    base_correct = torch.zeros(0)
    n_layers = len(learner.encoder.model.encoder.layer)
    for name, change in rows_of(args):
        config = dataclasses.replace(base, **{"head": "lpft", **change})
        learner.config = config
        chosen.steps.clear()
        seconds = []
        began = time.perf_counter()
        state = learner.adapt(episode.support_texts, episode.support_labels)
        seconds.append(time.perf_counter() - began)
        repeats = args.repeats if seconds[0] < 5 else 2 if seconds[0] < 15 else 1
        for _ in range(repeats - 1):
            began = time.perf_counter()
            learner.adapt(episode.support_texts, episode.support_labels)
            seconds.append(time.perf_counter() - began)
        blocks = config.lpft_blocks if config.head == "lpft" else 0
        check = None
        if config.head == "lpft" and blocks and encoder_params(state):
            if blocks not in query_inputs:
                query_inputs[blocks] = TopBlockInputs.compute(
                    learner.encoder, episode.query_texts, blocks
                )
            logits = predict_fast(query_inputs[blocks], state)
            sample = list(range(0, len(episode.query_texts), max(1, len(truth) // 64)))
            slow = learner.predict(state, [episode.query_texts[i] for i in sample])
            check = float((slow - logits[sample]).abs().max())
        elif config.head == "lpft" and encoder_params(state):
            logits = learner.predict(state, episode.query_texts)
        else:  # no encoder tensor adapted: the frozen embeddings
            if reference is None:
                reference = learner.encoder.embed(episode.query_texts)
            logits = head_logits(state, reference)
        correct = (logits.argmax(-1) == truth).double()
        if name == "logreg":
            base_correct = correct
        mean, half = mean_ci95((correct - base_correct).tolist())
        record = {
            "dataset": dataset,
            "row": name,
            "blocks": blocks if blocks else (n_layers if config.head == "lpft" else None),
            "embeddings_adapted": config.head == "lpft" and blocks == 0,
            "steps": config.lpft_steps if config.head == "lpft" else 0,
            "early_stop": bool(config.head == "lpft" and config.lpft_early_stop),
            "chosen_steps": chosen.steps[0] if chosen.steps else None,
            "accuracy": round(100 * float(correct.mean()), 2),
            "delta_vs_logreg": round(100 * mean, 2),
            "delta_ci95": round(100 * half, 2) if half == half else None,
            "adapt_seconds": round(statistics.median(seconds), 3),
            "adapt_seconds_all": [round(s, 3) for s in seconds],
            "fast_predict_max_diff": check,
            "n_way": episode.n_way,
            "n_support": len(episode.support_texts),
            "n_query": len(episode.query_texts),
        }
        records.append(record)
        print(
            f"| {dataset} | {name} | {record['accuracy']:.2f} | "
            f"{record['delta_vs_logreg']:+.2f} ± {record['delta_ci95'] or 0:.2f} | "
            f"{record['adapt_seconds']:.2f} | {record['chosen_steps'] or ''} |",
            flush=True,
        )
        save()
    logging.getLogger("metalm.learners.lpft").removeHandler(chosen)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in records if r["dataset"] == dataset]
        for r in rows:
            marker = "s" if r["row"] == "logreg" else "^" if r["early_stop"] else "o"
            ax.errorbar(
                r["adapt_seconds"], r["accuracy"], yerr=r["delta_ci95"] or 0, fmt=marker, capsize=3
            )
            ax.annotate(r["row"].replace("lpft ", ""), (r["adapt_seconds"], r["accuracy"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("adapt seconds (1 thread, full-way task)")
        ax.set_ylabel("valid accuracy (%), bars: 95% CI of Δ vs logreg")
        ax.set_title(f"{dataset}: full-way 5-shot, valid")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["banking77", "clinc150"])
    parser.add_argument("--grid", nargs="*", default=["1:5,10,20,40", "2:5,10,20", "6:5"])
    parser.add_argument("--early", nargs="*", default=["1:20", "1:40", "2:20"])
    parser.add_argument("--today", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "lpft_curve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    records: list[dict] = []
    began = time.time()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "protocol": "full-way 5-shot; support train_5, query the whole valid split",
            "encoders": RUNS,
            "timing": f"adapt wall seconds at {args.threads} torch thread(s), CPU, "
            "support embedding included, no embedding cache; median of the repeats",
            "threads": args.threads,
            "lpft_lr": 3e-5,
            "lpft_head_lr": 1e-3,
            "batch_size": 64,
            "machine": platform.platform(),
            "torch": torch.__version__,
            "wall_seconds": round(time.time() - began, 1),
            "records": records,
        }
        args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    print("| dataset | row | valid acc | Δ vs logreg ± 95% CI | adapt s | ES steps |")
    print("|---|---|---|---|---|---|")
    for dataset in args.datasets:
        measure(dataset, args, records, save)
        plot(records, args.out.with_suffix(".png"))
    save()


if __name__ == "__main__":
    main()
