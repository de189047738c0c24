"""Meta-pretraining ablation: which tasks make meta-training matter on unseen intents.

Leave-one-dataset-out: meta-train on one intent dataset's labels (CLINC150 or
BANKING77) plus the *other* dataset's `train` texts without their labels, then test on
the other dataset: 600 fixed 5-way 1-shot episodes of its test split and full-way 5- and
10-shot (support = the standard `train_5`/`train_10`, query = the whole test split).

Rows (each ingredient alone on top of today's protonet, then combined):
  frozen          the pretrained encoder, no training
  protonet        today's recipe: 5-way 5-shot episodes of the labeled source
  manyway         + every class of the source in each episode (n_way=all)
  hard            + hard-negative episodes (nearest classes under the current encoder)
  instance        + instance tasks from the unlabeled texts (two word-dropout views)
  cluster         + k-means cluster tasks from the unlabeled texts
  neighbours      + nearest-neighbour tasks from the unlabeled texts
  all             many-way + hard + instance + cluster tasks

Every trained encoder is scored with both heads (`centroid`, `logreg`); `Δ` is the paired
difference to `frozen` with the same head, on the same episodes / the same test texts,
with its 95% interval. Test accuracy is also measured every `--curve-every` steps for the
plot of accuracy against meta-training steps (not used to pick a checkpoint: the best
checkpoint is chosen on meta-val classes of the labeled source, as in every metalm run).

    python benchmarks/meta_pretraining.py                              # both directions, all rows
    python benchmarks/meta_pretraining.py --direction clinc150 --rows frozen combined
    python benchmarks/meta_pretraining.py --quick                      # tiny budget smoke run
    python benchmarks/meta_pretraining.py --table benchmarks/results/meta_pretraining*.json

Prints a Markdown table, writes benchmarks/results/meta_pretraining.json and a plot
(benchmarks/results/meta_pretraining_curve.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from metalm.config import RunConfig, load_config
from metalm.learners import MetaLearner, build_learner
from metalm.models.encoder import TextEncoder
from metalm.runs.accuracy import MethodResult, mean_ci95
from metalm.runs.recipe import evaluate_learner
from metalm.tasks import build_pools, validation_sampler
from metalm.trainer import MetaTrainer

DIRECTIONS = {"clinc150": "banking77", "banking77": "clinc150"}
HEADS = ("centroid", "logreg")
UNLABELED = "data.unlabeled={{source: {target}, split: train, tasks: {tasks}, n_way: 64}}"
ROWS: dict[str, list[str]] = {
    "frozen": ["learner.name=frozen"],
    "protonet": [],
    "manyway": ["episode.n_way=all", "episode.k_shot=1", "episode.q_queries=1"],
    "hard": [
        "episode.n_way=20",
        "episode.k_shot=1",
        "episode.q_queries=2",
        "episode.hard_negatives=0.5",
    ],
    "instance": ["@instance"],
    "cluster": ["@cluster"],
    "neighbours": ["@neighbours"],
    "all": [
        "episode.n_way=all",
        "episode.k_shot=1",
        "episode.q_queries=1",
        "episode.hard_negatives=0.5",
        "@cluster+instance",
    ],
}


def base_overrides(source: str, target: str, steps: int, quick: bool) -> list[str]:
    """The protocol: `source` labeled, `target` tested; budget and evaluation."""
    overrides = [
        f"data.train={{source: {source}, split: train}}",
        f"data.test={{source: {target}, split: test}}",
        "data.classes.fractions=[0.8, 0.2, 0.0]",
        "learner.name=protonet",
        f"train.steps={steps}",
        f"train.warmup_steps={max(1, steps // 10)}",
        f"train.eval_every={max(1, steps // 6)}",
        f"train.checkpoint_every={steps}",
        "train.val_episodes=100",
        "train.tensorboard=false",
        "eval.episodes=600",
        "eval.settings=[{n_way: 5, k_shot: 1}]",
        "eval.full_way_shots=[5, 10]",
        "eval.baselines=[]",
    ]
    if quick:
        overrides += ["train.val_episodes=5", "eval.episodes=20", "model.max_length=32"]
    return overrides


def row_overrides(row: str, target: str) -> list[str]:
    out = []
    for item in ROWS[row]:
        if item.startswith("@"):
            out.append(UNLABELED.format(target=target, tasks=item[1:]))
        else:
            out.append(item)
    return out


def with_head(learner: MetaLearner, head: str) -> MetaLearner:
    """The same weights, adapting with another head."""
    other = build_learner(learner.encoder, dataclasses.replace(learner.config, head=head))
    other.load_state_dict(learner.state_dict())
    return other


def score(learner: MetaLearner, name: str, config: RunConfig, pools) -> dict[str, MethodResult]:
    """Every protocol under every head: {"<head> <protocol>": result}. The test texts are
    embedded once for all of them (so adapt times here are not what a user meets: see
    benchmarks/logreg_head.py and the README for those)."""
    texts = list(pools.test.texts)
    for episode in pools.full_way.values():
        texts += episode.support_texts
    out = {}
    with learner.encoder.cached_embeddings(texts):
        for head in HEADS:
            scored = with_head(learner, head)
            results = evaluate_learner(scored, name, config, pools, progress=False)
            out.update({f"{head} {r.protocol}": r for r in results})
    return out


def summary(results: dict[str, MethodResult], frozen: dict[str, MethodResult] | None) -> dict:
    rows = {}
    for key, result in results.items():
        row = {"accuracy": result.accuracy, "ci95": result.ci95, "units": len(result.per_episode)}
        if frozen is not None:
            base = np.asarray(frozen[key].per_episode)
            mine = np.asarray(result.per_episode)
            n = min(len(base), len(mine))
            mean, ci = mean_ci95(mine[:n] - base[:n])
            row["vs_frozen"] = {"mean": mean, "ci95": ci}
        rows[key] = row
    return rows


def run_row(source: str, row: str, args: argparse.Namespace, frozen) -> dict:
    target = DIRECTIONS[source]
    overrides = base_overrides(source, target, args.steps, args.quick)
    extra = list(args.overrides)
    if row == "frozen":  # learner.* overrides are for the meta-trained rows
        extra = [o for o in extra if not o.startswith("learner.")]
    overrides += row_overrides(row, target) + extra
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides.append(f"output_dir={args.runs}")
    overrides.append(f"run_name={source}-{row}-{stamp}")
    config = load_config(None, overrides)
    torch.manual_seed(config.seed)
    learner = build_learner(TextEncoder.from_config(config.model), config.learner)
    pools = build_pools(config.data, config.eval.full_way_shots)
    curve: list[dict] = []
    train_seconds = 0.0
    if row != "frozen":
        drop = config.data.drop_small_classes
        sampler = pools.train_sampler(config.episode, config.seed, drop)
        val = validation_sampler(pools, config.train, config.seed + 1, drop)
        paused = [0.0]

        def on_validation(step: int, val_accuracy: float) -> None:
            began = time.perf_counter()
            point = {"step": step, "val_accuracy": val_accuracy}
            point.update(
                {k: r.accuracy for k, r in score(learner, row, curve_config, pools).items()}
            )
            curve.append(point)
            print(f"  {row} step {step}: {point}", flush=True)
            learner.train()
            paused[0] += time.perf_counter() - began

        curve_config = dataclasses.replace(
            config, eval=dataclasses.replace(config.eval, episodes=args.curve_episodes)
        )
        run_dir = Path(args.runs) / config.run_name
        trainer = MetaTrainer(
            learner,
            sampler,
            val,
            config.train,
            run_dir,
            progress=not args.quiet,
            on_validation=[on_validation] if args.curve else [],
        )
        began = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - began - paused[0]
    results = score(learner, row, config, pools)
    return {
        "row": row,
        "source": source,
        "target": target,
        "overrides": overrides,
        "train_seconds": train_seconds,
        "curve": curve,
        "results": summary(results, frozen),
        "_raw": results,
    }


def to_markdown(records: list[dict]) -> str:
    keys = [
        f"{h} {p}" for h in HEADS for p in ("5-way 1-shot", "full-way 5-shot", "full-way 10-shot")
    ]
    lines = [
        "| test data | row | " + " | ".join(keys) + " | meta-train s |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for rec in records:
        cells = []
        for key in keys:
            r = rec["results"].get(key)
            if r is None:
                cells.append("")
                continue
            cell = f"{100 * r['accuracy']:.2f}"
            diff = r.get("vs_frozen")
            if diff is not None and rec["row"] != "frozen":
                cell += f" ({100 * diff['mean']:+.2f} ± {100 * diff['ci95']:.2f})"
            cells.append(cell)
        lines.append(
            f"| {rec['target']} | {rec['row']} | "
            + " | ".join(cells)
            + f" | {rec['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in records if r["curve"]]
    if not curves:
        return
    keys = ["centroid 5-way 1-shot", "logreg full-way 5-shot", "logreg full-way 10-shot"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for rec in curves:
            frozen = next(
                (r for r in records if r["row"] == "frozen" and r["target"] == rec["target"]), None
            )
            steps = [0] + [p["step"] for p in rec["curve"]]
            start = frozen["results"][key]["accuracy"] if frozen else np.nan
            values = [start] + [p[key] for p in rec["curve"]]
            ax.plot(
                steps,
                [100 * v for v in values],
                marker="o",
                label=f"{rec['row']} → {rec['target']}",
            )
        ax.set_title(key)
        ax.set_xlabel("meta-training steps")
        ax.set_ylabel("test accuracy %")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--direction",
        nargs="+",
        default=list(DIRECTIONS),
        help="labeled source(s): clinc150 (-> banking77), banking77 (-> clinc150)",
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--curve", action="store_true", help="test accuracy at each validation")
    parser.add_argument("--curve-episodes", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--runs", default="runs/bench-meta-pretraining")
    parser.add_argument("--out", default="benchmarks/results/meta_pretraining.json")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print these results")
    parser.add_argument(
        "overrides", nargs="*", help="extra key=value overrides (learner.*: trained rows only)"
    )
    args = parser.parse_args()
    if args.table:
        records = [
            rec for path in args.table for rec in json.loads(Path(path).read_text())["records"]
        ]
        print(to_markdown(records))
        plot(records, Path(args.out).with_name(Path(args.out).stem + "_curve.png"))
        return
    records = []
    for source in args.direction:
        frozen_raw = None
        for row in args.rows:
            started = time.perf_counter()
            record = run_row(source, row, args, frozen_raw)
            record["seconds"] = time.perf_counter() - started
            if row == "frozen":
                frozen_raw = record["_raw"]
            record.pop("_raw")
            records.append(record)
            print(to_markdown([record]).splitlines()[-1], flush=True)
            write(records, args)
    print(to_markdown(records))
    plot(records, Path(args.out).with_name(Path(args.out).stem + "_curve.png"))


def write(records: list[dict], args: argparse.Namespace) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python benchmarks/meta_pretraining.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("table", "out", "runs", "overrides") and v not in (False, None)
        )
        + " "
        + " ".join(args.overrides),
        "machine": {
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "records": records,
    }
    Path(args.out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
